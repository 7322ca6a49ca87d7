import { rename, rm } from 'node:fs/promises'
import { join } from 'node:path'
import KeyvSqlite from '@keyv/sqlite'
import Keyv from 'keyv'

/** One cached layer file: the unit of accounting and eviction. */
export interface BlobEntry {
  /** The layer digest; also the file's name. */
  digest: string
  size: number
  /** Milliseconds since the epoch. */
  lastAccess: number
  hits: number
  createdAt: number
}

/** Which layer a manifest digest resolves to, so a hit needs no registry round trip. */
export interface ManifestEntry {
  digest: string
  layerDigest: string
  layerMediaType: string
}

const BLOB = 'blob'
const MANIFEST = 'manifest'

/**
 * The durable index of the cache, in SQLite through keyv, with a complete in-memory mirror.
 *
 * SQLite is the record that survives restarts; the mirror answers every lookup so a hit never
 * waits on the database. Structural changes (an entry added or removed) are written through
 * and awaited before they count. Access times and hit counts change on every hit, so they are
 * only marked dirty and written in batches ({@link flush}), never once per request.
 */
export class CacheIndex {
  readonly #keyv: Keyv
  readonly #store: KeyvSqlite
  readonly #blobs = new Map<string, BlobEntry>()
  readonly #manifests = new Map<string, ManifestEntry>()
  readonly #byLayer = new Map<string, Set<string>>()
  readonly #dirty = new Set<string>()
  #bytes = 0
  #closed = false

  private constructor(store: KeyvSqlite, keyv: Keyv) {
    this.#store = store
    this.#keyv = keyv
  }

  /**
   * Opens (creating if needed) `<directory>/index.sqlite` and loads the mirror. A file that is
   * not a database or is corrupt (a torn disk, a stray write) would otherwise stop every start,
   * and the cache volume outlives the container, so the pod would crash-loop for good: it is
   * moved aside to `index.sqlite.corrupt` (the previous such copy is replaced) and a fresh index
   * is created. Reconciliation then re-adopts every blob file that still hashes to its name;
   * only the manifest-to-layer rows are lost, and each costs one registry request to relearn.
   * `onRebuilt` hears of it. Other errors (permissions, a full disk) are passed on.
   */
  static async open(
    directory: string,
    onError: (err: unknown) => void = () => undefined,
    onRebuilt: (err: unknown) => void = () => undefined,
  ): Promise<CacheIndex> {
    const path = join(directory, 'index.sqlite')
    try {
      return await CacheIndex.#open(path, onError)
    } catch (err) {
      if (!isCorrupt(err)) throw err
      onRebuilt(err)
      await rename(path, `${path}.corrupt`)
      // The WAL and shared-memory files belong to the file moved aside; replayed against a new
      // database they would be refused or, worse, applied.
      await rm(`${path}-wal`, { force: true })
      await rm(`${path}-shm`, { force: true })
      return await CacheIndex.#open(path, onError)
    }
  }

  static async #open(path: string, onError: (err: unknown) => void): Promise<CacheIndex> {
    const store = new KeyvSqlite({ uri: `sqlite://${path}`, busyTimeout: 5000 })
    store.on('error', onError)
    try {
      // WAL + NORMAL: a commit is one fsync-free append, and readers never block the writer.
      // A crash can lose the last few commits, which restart reconciliation repairs.
      await store.query('PRAGMA journal_mode=WAL')
      await store.query('PRAGMA synchronous=NORMAL')
      const keyv = new Keyv({ store, throwOnErrors: true, namespace: 'rpp' })
      keyv.on('error', onError)
      const index = new CacheIndex(store, keyv)
      await index.#load()
      return index
    } catch (err) {
      await store.close().catch(() => undefined)
      throw err
    }
  }

  async #load(): Promise<void> {
    const rows = (await this.#store.query('SELECT key, value FROM keyv WHERE key LIKE ?', 'rpp:%')) as Array<{ key: string; value: string }>
    for (const row of rows) {
      let value: unknown
      try {
        value = (JSON.parse(row.value) as { value?: unknown }).value
      } catch {
        continue
      }
      const key = row.key.slice('rpp:'.length)
      if (key.startsWith(`${BLOB}:`) && isBlobEntry(value)) this.#addBlob(value)
      else if (key.startsWith(`${MANIFEST}:`) && isManifestEntry(value)) this.#addManifest(value)
    }
  }

  #addBlob(entry: BlobEntry): void {
    const old = this.#blobs.get(entry.digest)
    if (old) this.#bytes -= old.size
    this.#blobs.set(entry.digest, entry)
    this.#bytes += entry.size
  }

  #addManifest(entry: ManifestEntry): void {
    this.#manifests.set(entry.digest, entry)
    let set = this.#byLayer.get(entry.layerDigest)
    if (!set) this.#byLayer.set(entry.layerDigest, (set = new Set()))
    set.add(entry.digest)
  }

  /** Bytes of all indexed blobs. */
  get usedBytes(): number {
    return this.#bytes
  }

  get blobCount(): number {
    return this.#blobs.size
  }

  blob(digest: string): BlobEntry | undefined {
    return this.#blobs.get(digest)
  }

  manifest(digest: string): ManifestEntry | undefined {
    return this.#manifests.get(digest)
  }

  blobs(): BlobEntry[] {
    return [...this.#blobs.values()]
  }

  manifestsOf(layerDigest: string): string[] {
    return [...(this.#byLayer.get(layerDigest) ?? [])]
  }

  /** Manifest rows whose layer has no blob row. */
  danglingManifests(): string[] {
    return [...this.#manifests.values()].filter((m) => !this.#blobs.has(m.layerDigest)).map((m) => m.digest)
  }

  /** Records a verified blob file; awaited before the file may be served as a hit. */
  async putBlob(entry: BlobEntry): Promise<void> {
    await this.#keyv.set(`${BLOB}:${entry.digest}`, entry)
    this.#addBlob({ ...entry })
  }

  async putManifest(entry: ManifestEntry): Promise<void> {
    const known = this.#manifests.get(entry.digest)
    if (known && known.layerDigest === entry.layerDigest) return
    await this.#keyv.set(`${MANIFEST}:${entry.digest}`, entry)
    this.#addManifest({ ...entry })
  }

  /**
   * Forgets a blob and every manifest that resolves to it. The row goes before the file
   * (the caller unlinks after this resolves): a crash in between leaves an orphan file, which
   * start-up reconciliation verifies or deletes, never a row without its file being trusted.
   */
  async removeBlob(digest: string): Promise<BlobEntry | undefined> {
    const entry = this.#blobs.get(digest)
    const manifests = this.manifestsOf(digest)
    await this.#keyv.deleteMany([`${BLOB}:${digest}`, ...manifests.map((m) => `${MANIFEST}:${m}`)])
    if (entry) {
      this.#blobs.delete(digest)
      this.#bytes -= entry.size
    }
    for (const m of manifests) this.#manifests.delete(m)
    this.#byLayer.delete(digest)
    this.#dirty.delete(digest)
    return entry
  }

  /** Drops a manifest row whose layer is gone. */
  async removeManifest(digest: string): Promise<void> {
    const entry = this.#manifests.get(digest)
    if (!entry) return
    await this.#keyv.delete(`${MANIFEST}:${digest}`)
    this.#manifests.delete(digest)
    this.#byLayer.get(entry.layerDigest)?.delete(digest)
  }

  /** Counts a hit in memory; {@link flush} persists it later. */
  touch(digest: string, now = Date.now()): void {
    const entry = this.#blobs.get(digest)
    if (!entry) return
    entry.lastAccess = Math.max(entry.lastAccess, now)
    entry.hits++
    this.#dirty.add(digest)
  }

  /** Writes the batched access times and hit counts. */
  async flush(): Promise<void> {
    if (this.#dirty.size === 0 || this.#closed) return
    const batch = [...this.#dirty]
    this.#dirty.clear()
    const entries = batch.map((d) => this.#blobs.get(d)).filter((e): e is BlobEntry => e !== undefined)
    await this.#keyv.setMany(entries.map((e) => ({ key: `${BLOB}:${e.digest}`, value: { ...e } })))
  }

  get closed(): boolean {
    return this.#closed
  }

  get dirtyCount(): number {
    return this.#dirty.size
  }

  async close(): Promise<void> {
    if (this.#closed) return
    await this.flush()
    this.#closed = true
    await this.#store.close()
  }
}

/** SQLite's verdict that the file is not (or no longer) a usable database. */
function isCorrupt(err: unknown): boolean {
  const code = (err as { code?: unknown } | null)?.code
  return code === 'SQLITE_NOTADB' || code === 'SQLITE_CORRUPT'
}

function isBlobEntry(v: unknown): v is BlobEntry {
  const e = v as BlobEntry | null
  return typeof e === 'object' && e !== null && typeof e.digest === 'string' && Number.isSafeInteger(e.size) && typeof e.lastAccess === 'number'
}

function isManifestEntry(v: unknown): v is ManifestEntry {
  const e = v as ManifestEntry | null
  return typeof e === 'object' && e !== null && typeof e.digest === 'string' && typeof e.layerDigest === 'string'
}

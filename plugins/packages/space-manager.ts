import type { BlobStore } from './blob-store.js'
import type { CacheIndex } from './cache-index.js'
import type { PackageLogger } from './package-service.js'

/** Space promised to one fill; `ready` settles when the space is really free on disk. */
export interface Reservation {
  readonly size: number
  readonly ready: Promise<void>
  /** The fill was committed: its bytes now count as used instead of reserved. */
  commit(): void
  /** The fill ended without a commit (or after one): returns anything still reserved. */
  release(): void
}

/**
 * Keeps the bytes on disk within the limit, always, not just between sweeps.
 *
 * A fill reserves its size (known from the manifest) before writing a byte. If the space is
 * not free, least recently used entries that nobody is reading are chosen, synchronously, and
 * unlinked; the fill writes only after those, and every eviction already under way, are gone.
 * So at any instant: committed files + bytes written by fills <= limit. No lock is held across
 * I/O; all bookkeeping is synchronous on the event loop, which is what makes it race-free.
 */
export class SpaceManager {
  #used: number
  #reserved = 0
  #doomed = 0
  readonly #inFlight = new Set<Promise<void>>()
  readonly #pins = new Map<string, number>()
  readonly #evicting = new Set<string>()
  readonly #deferred = new Set<string>()
  evictions = 0
  evictedBytes = 0

  constructor(
    private readonly index: CacheIndex,
    private readonly store: BlobStore,
    readonly limit: number,
    private readonly log: PackageLogger,
    private readonly onEvict: (digest: string, bytes: number) => void = () => undefined,
  ) {
    this.#used = index.usedBytes
  }

  get usedBytes(): number {
    return this.#used
  }

  get reservedBytes(): number {
    return this.#reserved
  }

  /** Marks a cached file as being read: it will not be evicted until {@link unpin}. */
  pin(digest: string): void {
    this.#pins.set(digest, (this.#pins.get(digest) ?? 0) + 1)
  }

  unpin(digest: string): void {
    const n = (this.#pins.get(digest) ?? 0) - 1
    if (n > 0) {
      this.#pins.set(digest, n)
      return
    }
    this.#pins.delete(digest)
    // A removal requested while the file was being read happens now, unless it was re-cached.
    if (this.#deferred.delete(digest) && !this.index.blob(digest)) {
      void this.#track(this.#unlink(digest, this.#deferredSize.get(digest) ?? 0))
    }
    this.#deferredSize.delete(digest)
  }

  readonly #deferredSize = new Map<string, number>()

  /**
   * Reserves `size` bytes, evicting LRU entries as needed. Undefined when the object is larger
   * than the limit or the space is held by entries being read: the caller streams through.
   */
  reserve(size: number): Reservation | undefined {
    if (size > this.limit) return undefined
    let free = this.limit - (this.#used - this.#doomed) - this.#reserved
    const victims: Array<{ digest: string; size: number }> = []
    if (free < size) {
      const candidates = this.index
        .blobs()
        .filter((b) => !this.#pins.has(b.digest) && !this.#evicting.has(b.digest))
        .sort((a, b) => a.lastAccess - b.lastAccess)
      for (const c of candidates) {
        if (free >= size) break
        victims.push(c)
        free += c.size
      }
      if (free < size) return undefined
    }
    this.#reserved += size
    // Wait for our victims and for every eviction already running: their bytes were counted as
    // free when earlier reservations were granted, but are on disk until unlinked.
    const waits = [...this.#inFlight, ...victims.map((v) => this.#evict(v.digest, v.size))]
    const ready = Promise.all(waits).then(() => undefined)
    let state: 'reserved' | 'committed' | 'released' = 'reserved'
    return {
      size,
      ready,
      commit: () => {
        if (state !== 'reserved') return
        state = 'committed'
        this.#reserved -= size
        this.#used += size
      },
      release: () => {
        if (state !== 'reserved') return
        state = 'released'
        this.#reserved -= size
      },
    }
  }

  #track(p: Promise<void>): Promise<void> {
    this.#inFlight.add(p)
    p.then(
      () => this.#inFlight.delete(p),
      () => this.#inFlight.delete(p),
    )
    return p
  }

  #evict(digest: string, size: number): Promise<void> {
    this.#evicting.add(digest)
    this.#doomed += size
    const p = (async () => {
      try {
        await this.index.removeBlob(digest)
      } catch (err) {
        this.#evicting.delete(digest)
        this.#doomed -= size
        throw err
      }
      this.#doomed -= size
      await this.#unlink(digest, size)
      this.#evicting.delete(digest)
      this.evictions++
      this.evictedBytes += size
      this.onEvict(digest, size)
    })()
    return this.#track(p)
  }

  /** Unlinks a file whose row is gone; its bytes stop counting only once it is really gone. */
  async #unlink(digest: string, size: number): Promise<void> {
    try {
      await this.store.remove(digest)
    } catch (err) {
      this.log.error({ err: { code: (err as NodeJS.ErrnoException).code }, layer: digest }, 'cannot delete an evicted cache file')
    } finally {
      this.#used -= size
    }
  }

  /**
   * Removes one entry on request (DELETE /cache/{digest}). The row goes at once so no new
   * request hits it; the file goes when its last reader finishes.
   */
  async evict(digest: string): Promise<boolean> {
    const entry = this.index.blob(digest)
    if (!entry || this.#evicting.has(digest)) return false
    if (!this.#pins.has(digest)) {
      await this.#evict(digest, entry.size)
      return true
    }
    await this.index.removeBlob(digest)
    this.#deferred.add(digest)
    this.#deferredSize.set(digest, entry.size)
    return true
  }

  /** Evicts LRU entries until the cache fits `limit` (the limit may have shrunk since the last run). */
  async trim(): Promise<number> {
    let removed = 0
    const lru = this.index.blobs().sort((a, b) => a.lastAccess - b.lastAccess)
    for (const b of lru) {
      if (this.#used <= this.limit) break
      await this.#evict(b.digest, b.size)
      removed++
    }
    return removed
  }
}

import type { ManifestBytes } from '../packages/peer-port.js'
import { getRecent } from '../packages/cache/recent-map.js'
import type { LoadedManifests, ManifestFiles } from './manifest-files.js'

/** Manifests are a few KiB; this holds thousands of them in bounded memory (and as many on disk). */
export const DEFAULT_MEMO_BYTES = 16 * 1024 * 1024

/**
 * Verified manifests by digest, least recently used first out, so this replica can hand them
 * to a peer that cannot reach the registry. Only bytes that hashed to their digest are put
 * here, and the peer verifies them again: the memo can be stale, never wrong.
 *
 * With {@link attach}ed files (in the cache directory) every entry is also kept on disk, so a
 * replica restarted while the registry is down still has them for its peers. The files follow
 * the memory: written when an entry comes in, deleted when it is evicted, bounded alike. Disk
 * work runs in the background, one operation at a time in the order the entries changed (a
 * write and a later delete of one digest never swap); a failure is reported and costs only
 * that file, never a request.
 */
export class ManifestMemo {
  readonly #entries = new Map<string, ManifestBytes>()
  readonly #limit: number
  #bytes = 0
  #files: ManifestFiles | undefined
  #onError: (err: unknown) => void = () => undefined
  #queue: Promise<void> = Promise.resolve()

  constructor(limitBytes = DEFAULT_MEMO_BYTES) {
    this.#limit = limitBytes
  }

  /** Reads back what `files` holds (verified there), then keeps every later change on disk too. */
  async attach(files: ManifestFiles, onError: (err: unknown) => void): Promise<LoadedManifests> {
    const loaded = await files.load(this.#limit)
    for (const { digest, manifest } of loaded.manifests) this.#insert(digest, manifest)
    this.#files = files
    this.#onError = onError
    return loaded
  }

  get(digest: string): ManifestBytes | undefined {
    return getRecent(this.#entries, digest)
  }

  put(digest: string, m: ManifestBytes): void {
    if (m.body.length > this.#limit) return
    const old = this.#entries.get(digest)
    // Verified bytes of one digest are the same bytes: only the recency changes, not the file.
    const same = old !== undefined && old.mediaType === m.mediaType && old.body.equals(m.body)
    this.#insert(digest, m)
    if (!same) this.#disk((f) => f.write(digest, m))
  }

  /** Resolves once the disk has caught up with every change so far (shutdown, tests). */
  async settled(): Promise<void> {
    await this.#queue
  }

  #insert(digest: string, m: ManifestBytes): void {
    const old = this.#entries.get(digest)
    if (old) {
      this.#bytes -= old.body.length
      this.#entries.delete(digest)
    }
    this.#entries.set(digest, m)
    this.#bytes += m.body.length
    for (const [key, value] of this.#entries) {
      if (this.#bytes <= this.#limit) break
      this.#entries.delete(key)
      this.#bytes -= value.body.length
      this.#disk((f) => f.remove(key))
    }
  }

  #disk(op: (files: ManifestFiles) => Promise<void>): void {
    const files = this.#files
    if (!files) return
    this.#queue = this.#queue.then(() => op(files)).catch((err: unknown) => this.#onError(err))
  }
}

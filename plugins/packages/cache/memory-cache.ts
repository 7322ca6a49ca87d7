import { getRecent } from './recent-map.js'

/**
 * Small cached layers kept in memory, least recently used out first.
 *
 * A hit from disk costs an open, reads and a close on libuv's thread pool per request; for
 * the small packages most nodes fetch, that is most of the work. Keeping them as Buffers makes
 * a hit one socket write. The disk file stays the source of truth: entries are loaded from it
 * and dropped when it is removed.
 *
 * A layer is loaded once however many requests want it at the same moment ({@link load}):
 * a herd of 100 nodes after a restart shares one read, not 100 copies of the file.
 */
export class HotCache {
  readonly #entries = new Map<string, Buffer>()
  readonly #loading = new Map<string, Promise<Buffer | undefined>>()
  #bytes = 0

  constructor(
    readonly maxBytes: number,
    readonly maxEntryBytes: number,
  ) {}

  get bytes(): number {
    return this.#bytes
  }

  /** Whether a layer of `size` bytes would be kept here. */
  accepts(size: number): boolean {
    return size <= this.maxEntryBytes && size <= this.maxBytes
  }

  get(digest: string): Buffer | undefined {
    return getRecent(this.#entries, digest)
  }

  /**
   * The layer's bytes from memory, or from `read` (once for all concurrent callers), kept if
   * `keep` still says so when the read ends (the entry may have been removed meanwhile).
   * Undefined when the read gives nothing (the file vanished, or failed its check).
   */
  load(digest: string, read: () => Promise<Buffer | undefined>, keep: () => boolean): Promise<Buffer | undefined> {
    const hit = this.get(digest)
    if (hit) return Promise.resolve(hit)
    let pending = this.#loading.get(digest)
    if (!pending) {
      pending = read()
        .then((data) => {
          if (data && keep()) this.put(digest, data)
          return data
        })
        .finally(() => this.#loading.delete(digest))
      this.#loading.set(digest, pending)
    }
    return pending
  }

  put(digest: string, data: Buffer): void {
    if (!this.accepts(data.length)) return
    this.delete(digest)
    while (this.#bytes + data.length > this.maxBytes) {
      const oldest = this.#entries.keys().next()
      if (oldest.done) break
      this.delete(oldest.value)
    }
    this.#entries.set(digest, data)
    this.#bytes += data.length
  }

  delete(digest: string): void {
    const old = this.#entries.get(digest)
    if (!old) return
    this.#entries.delete(digest)
    this.#bytes -= old.length
  }
}

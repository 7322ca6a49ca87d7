import { getRecent } from './recent-map.js'

/** Bytes of a layer in memory, held for one response until it is released. */
export interface HotUse {
  buffer: Buffer
  /** Idempotent. */
  release: () => void
}

interface Slot {
  data: Buffer
  /** Responses still sending these bytes. */
  users: number
  /** Still an entry (not evicted or deleted). */
  live: boolean
}

/**
 * Cached layers kept in memory, least recently used out first, within one byte budget.
 *
 * A hit from disk costs reads on libuv's thread pool and a copy through user space per request;
 * from memory it is one socket write. Small layers (up to `maxEntryBytes`) are kept once read.
 * A large one (up to half the budget) is kept only while a herd wants it ({@link admitsLarge}:
 * the caller decides when), so one big package fetched now and then does not push out the
 * small ones. The disk file stays the source of truth: entries are loaded from it and dropped
 * when it is removed.
 *
 * The budget counts what is really in memory: an entry evicted or deleted while responses are
 * still writing it stays counted ({@link held}) until the last of them lets go, as removed
 * files do in the disk cache, so a churn of large entries under slow clients cannot pile
 * buffers up beyond it. A layer is loaded once however many requests want it at the same
 * moment ({@link load}): a herd of 100 nodes after a restart shares one read.
 */
export class HotCache {
  readonly #entries = new Map<string, Slot>()
  readonly #loading = new Map<string, Promise<Buffer | undefined>>()
  #bytes = 0
  #held = 0
  #reserved = 0

  constructor(
    readonly maxBytes: number,
    readonly maxEntryBytes: number,
  ) {}

  /** Bytes of live entries. */
  get bytes(): number {
    return this.#bytes
  }

  /** Bytes of entries no longer live that responses are still sending. */
  get held(): number {
    return this.#held
  }

  /** Whether a layer of `size` bytes is kept here whenever it is read. */
  accepts(size: number): boolean {
    return size <= this.maxEntryBytes && size <= this.maxBytes
  }

  /** Whether a layer of `size` bytes too large for {@link accepts} may be kept (while in demand). */
  admitsLarge(size: number): boolean {
    return size > this.maxEntryBytes && size <= this.maxBytes / 2
  }

  /**
   * Whether `size` bytes could be kept now, evicting entries no response is sending (bytes
   * being sent or loaded cannot be made room from).
   */
  hasRoomFor(size: number): boolean {
    let freeable = 0
    for (const slot of this.#entries.values()) if (slot.users === 0) freeable += slot.data.length
    return this.#bytes - freeable + this.#held + this.#reserved + size <= this.maxBytes
  }

  /** Bytes of loads under way: read into memory, not yet entries. */
  get reserved(): number {
    return this.#reserved
  }

  has(digest: string): boolean {
    return this.#entries.has(digest)
  }

  /** The bytes, made the most recently used; no hold (for a caller that only looks). */
  get(digest: string): Buffer | undefined {
    return getRecent(this.#entries, digest)?.data
  }

  /** The bytes for one response, counted until it releases them. */
  use(digest: string): HotUse | undefined {
    const data = this.get(digest)
    const slot = this.#entries.get(digest)
    if (!data || !slot) return undefined
    slot.users++
    let released = false
    return {
      buffer: data,
      release: () => {
        if (released) return
        released = true
        slot.users--
        if (!slot.live && slot.users === 0) this.#held -= slot.data.length
      },
    }
  }

  /**
   * The layer's bytes from memory, or from `read` (once for all concurrent callers), kept if
   * `keep` still says so when the read ends (the entry may have been removed meanwhile).
   * Undefined when the read gives nothing (the file vanished, or failed its check), or when
   * there is no room for `size` bytes now ({@link hasRoomFor}): nothing is read then, and the
   * caller serves the file instead. A load's bytes count against the budget while it reads
   * (least recently used entries make room first), so loads at once never overshoot it.
   */
  load(digest: string, size: number, read: () => Promise<Buffer | undefined>, keep: () => boolean): Promise<Buffer | undefined> {
    const hit = this.get(digest)
    if (hit) return Promise.resolve(hit)
    let pending = this.#loading.get(digest)
    if (!pending) {
      if (!this.#makeRoom(size)) return Promise.resolve(undefined)
      this.#reserved += size
      pending = read()
        .then((data) => {
          this.#reserved -= size
          if (data && keep()) this.put(digest, data)
          return data
        })
        .catch((err: unknown) => {
          this.#reserved -= size
          throw err
        })
        .finally(() => this.#loading.delete(digest))
      this.#loading.set(digest, pending)
    }
    return pending
  }

  /** Whether a load of `digest` is running. */
  loading(digest: string): boolean {
    return this.#loading.has(digest)
  }

  /**
   * Keeps `data`, evicting the least recently used entries to make room; false (and nothing
   * kept) when it is not a size kept here, or the budget is taken by bytes still being sent or
   * loaded.
   */
  put(digest: string, data: Buffer): boolean {
    if (!this.accepts(data.length) && !this.admitsLarge(data.length)) return false
    this.delete(digest)
    if (!this.#makeRoom(data.length)) return false
    this.#entries.set(digest, { data, users: 0, live: true })
    this.#bytes += data.length
    return true
  }

  /**
   * Evicts least recently used entries until `size` more bytes fit; false, evicting nothing,
   * when they cannot. Entries responses are still sending are passed over: evicting them would
   * free no memory (their bytes stay held until the responses are done).
   */
  #makeRoom(size: number): boolean {
    if (!this.hasRoomFor(size)) return false
    for (const [digest, slot] of this.#entries) {
      if (this.#bytes + this.#held + this.#reserved + size <= this.maxBytes) break
      if (slot.users === 0) this.delete(digest)
    }
    return true
  }

  delete(digest: string): void {
    const slot = this.#entries.get(digest)
    if (!slot) return
    this.#entries.delete(digest)
    slot.live = false
    this.#bytes -= slot.data.length
    if (slot.users > 0) this.#held += slot.data.length
  }
}

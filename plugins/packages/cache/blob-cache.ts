import { stat } from 'node:fs/promises'
import type { PackageLogger } from '../log.js'
import { fileStamp, type TempFile } from './blob-store.js'
import type { IndexPort, Lease, RemovalReason, StorePort } from './ports.js'
import { Reservations, type Reservation } from './reservations.js'

export type { Reservation } from './reservations.js'
export type { IndexPort, Lease, RemovalReason, StorePort } from './ports.js'

interface Entry {
  readonly digest: string
  readonly size: number
  pins: number
  state: 'live' | 'doomed' | 'gone'
  /** False once a newer file of the same digest took the name: nothing to unlink then. */
  ownsPath: boolean
  /** Set when the entry is removed. */
  reason?: RemovalReason
  /** Hashed by this process: committed by it, or re-hashed since start (files from before are not). */
  verified: boolean
  stamp?: string
}

export interface BlobCacheOptions {
  index: IndexPort
  store: StorePort
  limit: number
  log: PackageLogger
  /** Told of every entry that left the cache, once its bytes are really gone. */
  onRemoved?: (reason: RemovalReason, bytes: number, digest: string) => void
}

/**
 * The one owner of every cached blob's life: reservation, commit of a verified temp file,
 * leases for readers, eviction of unleased entries only, removal on the last release, and
 * the byte accounting that goes with each step (the part bazel-remote's `lru.go` does).
 *
 * All bookkeeping is synchronous on the event loop, so no two callers can see a state half
 * changed; I/O runs after the books say what it will do. The books count every byte that
 * occupies the cache folder, including files already deleted but still open:
 *
 *     used (live entries) + reserved (fills writing) + held (removed, not yet gone) <= limit
 *
 * A fill's reservation is granted only when that holds with its size added; it waits, in
 * order, for the unlinks of the victims chosen for it. A removal under readers takes the
 * entry out of service at once (no new lease), and its bytes stay held until the last reader
 * lets go, when the file is unlinked.
 */
export class BlobCache {
  readonly limit: number
  readonly #o: BlobCacheOptions
  readonly #live = new Map<string, Entry>()
  /** Removed entries whose files are still on disk (some of them pinned by readers). */
  readonly #doomed = new Set<Entry>()
  #used = 0
  #held = 0
  /** Part of {@link #held} being unlinked now (no reader left): free again in a moment. */
  #unlinking = 0
  readonly #reservations = new Reservations(() => this.#grant())
  /**
   * Index writes and file operations per digest, in the order they were asked for: a removal's
   * row delete and unlink never cross a refill's rename and row insert of the same digest.
   */
  readonly #ops = new Map<string, Promise<unknown>>()
  readonly #inFlight = new Set<Promise<unknown>>()
  readonly removals: Record<RemovalReason, { count: number; bytes: number }> = {
    evicted: { count: 0, bytes: 0 },
    deleted: { count: 0, bytes: 0 },
    corrupt: { count: 0, bytes: 0 },
  }

  constructor(options: BlobCacheOptions) {
    this.#o = options
    this.limit = options.limit
    for (const b of options.index.blobs()) {
      this.#live.set(b.digest, { digest: b.digest, size: b.size, pins: 0, state: 'live', ownsPath: true, verified: false })
      this.#used += b.size
    }
  }

  /** Bytes of live entries (what `GET /cache` and the size gauge show). */
  get usedBytes(): number {
    return this.#used
  }

  /** Bytes promised to fills (granted or waiting for victims to go). */
  get reservedBytes(): number {
    return this.#reservations.granted + this.#reservations.waiting
  }

  /** Bytes of removed entries whose files are still on disk (open by readers, or unlinking). */
  get heldBytes(): number {
    return this.#held
  }

  /** Bytes the cache folder may hold right now by these books (used + reserved + held). */
  get occupiedBytes(): number {
    return this.#used + this.#reservations.granted + this.#held
  }

  get entryCount(): number {
    return this.#live.size
  }

  has(digest: string): boolean {
    return this.#live.has(digest)
  }

  /** Digests of live entries (for the scrubber's round). */
  digests(): string[] {
    return [...this.#live.keys()]
  }

  /** A lease on a live entry, or undefined if it is not (or no longer) cached. Synchronous. */
  acquire(digest: string): Lease | undefined {
    const entry = this.#live.get(digest)
    return entry ? this.#lease(entry) : undefined
  }

  #lease(entry: Entry): Lease {
    entry.pins++
    let released = false
    return {
      digest: entry.digest,
      size: entry.size,
      path: this.#o.store.pathFor(entry.digest),
      get verified() {
        return entry.verified
      },
      get stamp() {
        return entry.stamp
      },
      markVerified: (stamp?: string) => {
        entry.verified = true
        if (stamp !== undefined) entry.stamp = stamp
      },
      release: () => {
        if (released) return
        released = true
        entry.pins--
        if (entry.state === 'doomed' && entry.pins === 0) void this.#unlink(entry)
      },
    }
  }

  /**
   * Reserves `size` bytes for a fill, choosing least recently used unleased entries to make
   * room. Undefined when it cannot fit (larger than the limit, or the space is held by
   * readers): the caller serves without caching.
   */
  reserve(size: number): Reservation | undefined {
    if (size > this.limit) return undefined
    // Bytes already being unlinked will be free in a moment; held files under readers will not.
    let free = this.limit - this.#used - this.reservedBytes - (this.#held - this.#unlinking)
    const victims: Entry[] = []
    if (free < size) {
      for (const c of this.#lru()) {
        if (c.pins > 0) continue
        if (free >= size) break
        victims.push(c)
        free += c.size
      }
      if (free < size) return undefined
    }
    for (const v of victims) void this.#remove(v, 'evicted')
    const reservation = this.#reservations.create(size)
    this.#grant()
    return reservation
  }

  /** Live entries, least recently used first. */
  #lru(): Entry[] {
    const at = (e: Entry): number => this.#o.index.blob(e.digest)?.lastAccess ?? 0
    return [...this.#live.values()].sort((a, b) => at(a) - at(b))
  }

  /** Grants waiting reservations, in order, while they fit beside every byte on disk. */
  #grant(): void {
    this.#reservations.grant((size) => this.occupiedBytes + size <= this.limit)
  }

  /**
   * Makes a verified temp file an entry: fsync, rename, index row, then it counts as used
   * instead of reserved. Returns a lease for the fill's own readers (who read the same file
   * through the fill's handle). On failure the reservation is still the caller's to release
   * once its temp file is closed and removed.
   */
  async commit(reservation: Reservation, temp: { path: string; handle: TempFile }, digest: string): Promise<Lease> {
    if (this.#live.has(digest)) throw new Error(`${digest} is cached already`)
    let stamp: string | undefined
    await this.#serial(digest, async () => {
      await this.#o.store.commit(temp, digest)
      // A removed entry of the same digest still open by readers lost its name to this file:
      // its bytes are freed by the kernel when its readers close, not by an unlink of ours.
      for (const d of this.#doomed) if (d.digest === digest) d.ownsPath = false
      // The file as it is now, verified: whatever changes it later (a write, a replacement,
      // even with its mtime put back) changes this, and it is hashed again before it is served.
      // Without it the file would be hashed at its first hit from disk.
      stamp = await stat(this.#o.store.pathFor(digest)).then(fileStamp, () => undefined)
    })
    const now = Date.now()
    try {
      await this.#serial(digest, () => this.#o.index.putBlob({ digest, size: reservation.size, lastAccess: now, hits: 0, createdAt: now }))
    } catch (err) {
      await this.#serial(digest, () => this.#o.store.remove(digest)).catch(() => undefined)
      throw err
    }
    // Synchronously, in one step: the reserved bytes become used bytes of a live entry. A
    // reservation released meanwhile (shutdown) is a bug in the caller, not a second entry.
    if (!this.#reservations.consume(reservation)) throw new Error('reservation is not granted')
    const entry: Entry = { digest, size: reservation.size, pins: 0, state: 'live', ownsPath: true, verified: true, ...(stamp !== undefined ? { stamp } : {}) }
    this.#live.set(digest, entry)
    this.#used += entry.size
    return this.#lease(entry)
  }

  /**
   * Removes a cached entry (DELETE /cache, a failed re-hash); false if it is not cached. It is
   * out of service at once; the promise settles when its index row is gone (its file goes
   * when the last reader lets go).
   */
  async remove(digest: string, reason: Exclude<RemovalReason, 'evicted'>): Promise<boolean> {
    const entry = this.#live.get(digest)
    if (!entry) return false
    await this.#remove(entry, reason)
    return true
  }

  /** Evicts LRU entries (unleased) until the cache fits the limit; at start-up, after a shrink. */
  async trim(): Promise<number> {
    let removed = 0
    for (const e of this.#lru()) {
      if (this.#used + (this.#held - this.#unlinking) <= this.limit) break
      if (e.pins > 0) continue
      void this.#remove(e, 'evicted')
      removed++
    }
    await this.settled()
    return removed
  }

  /** Resolves when every index write and unlink started so far has finished. */
  async settled(): Promise<void> {
    while (this.#inFlight.size > 0) await Promise.allSettled([...this.#inFlight])
  }

  /** Takes an entry out of service now; the row goes at once, the file with its last reader. */
  #remove(entry: Entry, reason: RemovalReason): Promise<void> {
    this.#live.delete(entry.digest)
    entry.state = 'doomed'
    this.#doomed.add(entry)
    this.#used -= entry.size
    this.#held += entry.size
    const row = this.#serial(entry.digest, () => this.#o.index.removeBlob(entry.digest)).then(
      () => undefined,
      (err: unknown) => this.#o.log.error({ err: { code: (err as NodeJS.ErrnoException).code }, layer: entry.digest }, 'cannot remove a cache index row'),
    )
    this.#track(row)
    entry.reason = reason
    // Unleased: it is gone when this settles. Leased: its file goes with its last reader.
    return entry.pins === 0 ? this.#unlink(entry) : row
  }

  /** Unlinks a removed entry's file (after its row is gone); its bytes stop counting after. */
  #unlink(entry: Entry): Promise<void> {
    this.#unlinking += entry.size
    // Queued after the row delete: a crash in between leaves an orphan file, which restart
    // reconciliation verifies or deletes, never a row whose file is missing.
    const p = this.#serial(entry.digest, async () => {
      if (entry.ownsPath) await this.#o.store.remove(entry.digest)
    })
      .catch((err: unknown) =>
        this.#o.log.error({ err: { code: (err as NodeJS.ErrnoException).code }, layer: entry.digest }, 'cannot delete a removed cache file'),
      )
      .finally(() => {
        entry.state = 'gone'
        this.#doomed.delete(entry)
        this.#unlinking -= entry.size
        this.#held -= entry.size
        const reason = entry.reason ?? 'evicted'
        this.removals[reason].count++
        this.removals[reason].bytes += entry.size
        this.#o.onRemoved?.(reason, entry.size, entry.digest)
        this.#grant()
      })
    this.#track(p)
    return p
  }

  /** Runs an index write or file operation for `digest` after the previous one has finished. */
  #serial<T>(digest: string, op: () => Promise<T>): Promise<T> {
    const before = this.#ops.get(digest) ?? Promise.resolve()
    const p = before.catch(() => undefined).then(op)
    this.#ops.set(digest, p)
    const forget = (): void => {
      if (this.#ops.get(digest) === p) this.#ops.delete(digest)
    }
    p.then(forget, forget)
    return p
  }

  #track(p: Promise<unknown>): void {
    this.#inFlight.add(p)
    const done = (): void => void this.#inFlight.delete(p)
    p.then(done, done)
  }
}

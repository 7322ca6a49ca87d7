import { createHash } from 'node:crypto'
import { fstatSync } from 'node:fs'
import { open, type FileHandle } from 'node:fs/promises'
import { Transform, type Readable } from 'node:stream'
import type { BlobCache } from './cache/blob-cache.js'
import type { Lease } from './cache/ports.js'
import { HotCache, type HotUse } from './cache/memory-cache.js'
import { fileStamp } from './cache/blob-store.js'
import { verifyEntry, type Verdict } from './cache/verify.js'
import { READ_CHUNK } from './fill-reader.js'
import type { PackageLogger } from './log.js'

export interface CachedReadsOptions {
  log: PackageLogger
  /** A cached file did not hash to its name when read whole: it has been removed. */
  onCorrupt?: (digest: string) => void
}

/** A cached file open for reading, under a lease that keeps it from being unlinked. */
export interface OpenedFile {
  handle: FileHandle
  size: number
  /** Closes the handle, then lets the file go (idempotent). */
  close: () => void
  /** Lets the file go when something else closed the handle (a read stream). Idempotent. */
  done: () => void
  /**
   * Whether the file is as it was checked when opened (its stamp: inode, size, times): a write
   * in place since then changes its times. One fstat, for just before a response's last bytes.
   */
  unchanged: () => boolean
}

/**
 * A hit: bytes in memory (shared by every response, never copied; `release` when the response
 * is done with them), or a stream of the file.
 */
export type HitBody = { buffer: Buffer; release: () => void } | { stream: Readable }

/**
 * How many responses sending one large file at once make a herd, worth holding it in memory
 * for: a roll-out of tens of nodes gets there at once, a node or two fetching it does not.
 */
export const HERD = 4

/** The memory cache's budget, and the largest layer kept in it whenever it is read (larger ones only for a herd). */
const HOT_BYTES = 64 * 1024 * 1024
const HOT_ENTRY_BYTES = 8 * 1024 * 1024

/**
 * Serves cache hits with bounded memory, whatever the number of clients.
 *
 * Small layers are read whole once per digest, hashed against their name on the way in, and
 * kept in memory; every concurrent request for the same digest waits for that one read and
 * then writes the same Buffer. Larger layers are read from the file under a lease (by the
 * fast path's file sender, or here as a stream of {@link READ_CHUNK} reads for ranges), with
 * backpressure, so a stalled client holds about one read; a large layer a herd wants
 * ({@link HERD}) joins the memory cache while the budget has room.
 */
export class CachedReads {
  readonly #o: CachedReadsOptions
  readonly hot: HotCache
  readonly #verifying = new Map<string, Promise<Verdict>>()

  constructor(options: CachedReadsOptions) {
    this.#o = options
    this.hot = new HotCache(HOT_BYTES, HOT_ENTRY_BYTES)
  }

  readonly #sending = new Map<string, number>()

  /** The layer's bytes if they are in memory now (no I/O), held until released. */
  inMemory(cache: BlobCache, digest: string): HotUse | undefined {
    return cache.has(digest) ? this.hot.use(digest) : undefined
  }

  /**
   * Bytes `start..end` (inclusive) of a cached layer, or undefined if it is not (or no longer)
   * cached, or failed its check: the caller then takes the miss path.
   */
  async open(cache: BlobCache, digest: string, start: number, end: number): Promise<HitBody | undefined> {
    const lease = cache.acquire(digest)
    if (!lease) return undefined
    const size = lease.size
    lease.release()
    if (this.hot.accepts(size)) {
      // From memory, loaded once if need be. When memory has no room (its budget is held by
      // bytes still being sent), or the load was not kept, the file is served instead: bytes
      // in memory are only ever the budget's.
      const data = await this.hot.load(
        digest,
        size,
        () => this.#readVerified(cache, digest),
        () => cache.has(digest),
      )
      const use = data && this.hot.use(digest)
      if (use) return { buffer: use.buffer.subarray(start, end + 1), release: use.release }
      if (data === undefined && !cache.has(digest)) return undefined
    }
    const file = await this.openFile(cache, digest)
    if (!file) return undefined
    // The handle stays open until the checked stream is done with: its last chunk may wait in
    // the check's buffer after the read stream has ended, and the check needs the open file.
    const read = file.handle.createReadStream({ start, end, highWaterMark: READ_CHUNK, autoClose: false })
    const stream = checkedAtEnd(read, end - start + 1, file.unchanged)
    stream.once('close', file.close)
    return { stream }
  }

  /**
   * A cached file, open under a lease, checked before its first byte is served: undefined if
   * it is not (or no longer) cached, or failed its check. The caller closes the handle and
   * releases the lease.
   */
  async openFile(cache: BlobCache, digest: string): Promise<OpenedFile | undefined> {
    const lease = cache.acquire(digest)
    if (!lease) return undefined
    let handle
    try {
      handle = await open(lease.path, 'r')
    } catch (err) {
      // Under a lease the file cannot have been removed by us: something else deleted it.
      lease.release()
      this.#o.log.error({ err: { code: (err as NodeJS.ErrnoException).code }, layer: digest }, 'a cached file could not be opened; treating it as corrupt')
      this.#corrupt(cache, digest)
      return undefined
    }
    // A file this process has not hashed yet (it was on disk at start), or one written to since
    // it was (its inode, size or times changed), is hashed once before its first byte goes
    // out, for all the requests that wait: a file damaged while the proxy was down or by a
    // stray hand is never served, and costs a registry download instead. Silent rot that
    // changes no times is the scrubber's to find.
    let stamp
    try {
      stamp = fileStamp(await handle.stat())
    } catch {
      await handle.close().catch(() => undefined)
      lease.release()
      return undefined
    }
    // Until a hash vouches for the file as this request found it: a hash already running when
    // the file was written to vouches for the bytes before (the stamp it records is the one
    // it started from), so the file is hashed again (found from outside: a request that joined
    // such a hash was sent a whole 200 of the changed bytes). A file that keeps changing is
    // not served from here.
    for (let hashes = 0; !lease.verified || lease.stamp !== stamp; hashes++) {
      const verdict = hashes < 3 ? await this.#verify(cache, digest) : 'changing'
      if (verdict !== 'intact') {
        await handle.close().catch(() => undefined)
        lease.release()
        return undefined
      }
    }
    return this.#sent(cache, digest, handle, lease, stamp)
  }

  /**
   * Counts the responses sending a large file; when a herd wants one that memory may hold
   * ({@link HotCache.admitsLarge}), it is loaded (once, hashed on the way in), and the requests
   * after that are memory hits: a copy through user space and a thread-pool read per MiB less
   * for each. A large package fetched by one node at a time stays on disk.
   */
  #sent(cache: BlobCache, digest: string, handle: FileHandle, lease: Lease, stamp: string): OpenedFile {
    const sending = (this.#sending.get(digest) ?? 0) + 1
    this.#sending.set(digest, sending)
    // Not when the budget is taken by bytes still being sent: the load would be read, hashed
    // and thrown away, again for every request of the herd.
    const wanted = sending >= HERD && this.hot.admitsLarge(lease.size) && this.hot.hasRoomFor(lease.size)
    if (wanted && !this.hot.has(digest) && !this.hot.loading(digest)) {
      void this.hot.load(
        digest,
        lease.size,
        () => this.#readVerified(cache, digest),
        () => cache.has(digest),
      )
    }
    let done = false
    const finish = (): void => {
      if (done) return
      done = true
      const left = (this.#sending.get(digest) ?? 1) - 1
      if (left > 0) this.#sending.set(digest, left)
      else this.#sending.delete(digest)
      lease.release()
    }
    return {
      handle,
      size: lease.size,
      done: finish,
      unchanged: () => {
        let now
        try {
          now = fileStamp(fstatSync(handle.fd))
        } catch {
          now = 'unknown'
        }
        if (now === stamp) return true
        // Its stamp no longer matches the lease's: the next open hashes it again.
        this.#o.log.error({ layer: digest }, 'a cached file was written to while it was being sent; the response is cut off before its end')
        return false
      },
      close: () => {
        void handle
          .close()
          .catch(() => undefined)
          .finally(finish)
      },
    }
  }

  /** Hashes a cached file once, however many requests wait for the verdict. */
  #verify(cache: BlobCache, digest: string): Promise<Verdict> {
    let pending = this.#verifying.get(digest)
    if (!pending) {
      pending = verifyEntry(cache, digest, { log: this.#o.log })
        .then(({ verdict }) => {
          if (verdict === 'corrupt') {
            this.hot.delete(digest)
            this.#o.onCorrupt?.(digest)
          }
          return verdict
        })
        .finally(() => this.#verifying.delete(digest))
      this.#verifying.set(digest, pending)
    }
    return pending
  }

  /** Reads a whole cached file under a lease and checks it against its digest. */
  async #readVerified(cache: BlobCache, digest: string): Promise<Buffer | undefined> {
    const lease = cache.acquire(digest)
    if (!lease) return undefined
    try {
      const handle = await open(lease.path, 'r')
      let data: Buffer
      let stamp: string
      try {
        stamp = fileStamp(await handle.stat())
        data = await handle.readFile()
      } finally {
        await handle.close().catch(() => undefined)
      }
      // Hashing once per load (not per hit) costs little and catches a file damaged on disk.
      const found = `sha256:${createHash('sha256').update(data).digest('hex')}`
      if (data.length === lease.size && found === digest) {
        lease.markVerified(stamp)
        return data
      }
      this.#o.log.error({ layer: digest, found, bytes: data.length }, 'a cached file does not match its digest; removing it')
    } catch (err) {
      this.#o.log.error({ err: { code: (err as NodeJS.ErrnoException).code }, layer: digest }, 'a cached file could not be read; removing it')
    } finally {
      lease.release()
    }
    this.#corrupt(cache, digest)
    return undefined
  }

  #corrupt(cache: BlobCache, digest: string): void {
    this.hot.delete(digest)
    void cache.remove(digest, 'corrupt').then((removed) => removed && this.#o.onCorrupt?.(digest))
  }
}

/**
 * `read` (`length` bytes), with its last chunk held back until `unchanged` says the file was not
 * written to while it was read: otherwise the stream fails, and the response is cut off, never
 * completed with bytes the file never had (as file-sender.ts's sendFile does for the fast path).
 */
function checkedAtEnd(read: Readable, length: number, unchanged: () => boolean): Readable {
  let seen = 0
  const checked = new Transform({
    transform(chunk: Buffer, _encoding, callback) {
      seen += chunk.length
      if (seen >= length && !unchanged()) callback(new Error('the cached file was written to while it was being sent'))
      else callback(null, chunk)
    },
  })
  read.on('error', (err) => checked.destroy(err))
  checked.once('close', () => read.destroy())
  return read.pipe(checked)
}

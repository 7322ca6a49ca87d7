import { createHash } from 'node:crypto'
import { EventEmitter } from 'node:events'
import { Readable } from 'node:stream'
export type { TempFile } from './blob-store.js'
import { DigestError } from '../../errors.js'
import type { TempFile } from './blob-store.js'
import type { BlobResponse } from './registry-client.js'
import type { LayerRef } from './manifest.js'
import { openLayer, resumableDownload } from './resumable-download.js'

const READ_CHUNK = 256 * 1024

/** In degraded (memory) mode the download waits for its slowest reader beyond this many bytes. */
const MEMORY_WINDOW = 8 * 1024 * 1024

/**
 * One download of one layer into a temp file, shared by every client that wants it.
 *
 * Clients never read the upstream socket: they read the temp file as it grows, each at its own
 * pace, so the registry is read at disk speed, a slow client holds up nobody, and the download
 * carries on whoever disconnects (its lifetime is its own, bounded by its own abort signal).
 * The last byte of any response is withheld until the whole layer has hashed to its digest, so
 * a corrupted download never produces a complete response.
 *
 * If the disk fails mid-fill (ENOSPC, EIO), the fill turns *degraded*: the rest of the layer is
 * kept in a bounded memory window for the readers it already has, paced by the slowest of them;
 * nothing will be cached and no new reader may join ({@link joinable} is false).
 */
export class Fill extends EventEmitter {
  readonly layer: LayerRef
  readonly tempPath: string
  /** Bytes received from the registry (on disk, or in memory when degraded). */
  written = 0
  state: 'running' | 'verified' | 'failed' = 'running'
  /** Times the download was resumed with a Range request after the connection broke. */
  resumes = 0
  error: Error | undefined
  /** Set when a disk write failed: the fill serves its readers from memory and caches nothing. */
  diskError: Error | undefined
  /** Settles when the registry answered (resolved) or failed before sending a byte (rejected). */
  readonly started: Promise<void>
  /** Settles when the layer is verified (resolved) or the fill failed (rejected). */
  readonly done: Promise<void>
  readonly #file: TempFile
  #refs = 1
  /** Bytes [0, #fileEnd) are in the file; [#memStart, written) in #mem. */
  #fileEnd = 0
  #memStart = 0
  readonly #mem: Buffer[] = []
  readonly #readers = new Set<FillReader>()
  #resolveStarted!: () => void
  #rejectStarted!: (err: Error) => void
  #resolveDone!: () => void
  #rejectDone!: (err: Error) => void

  constructor(layer: LayerRef, temp: { path: string; handle: TempFile }) {
    super()
    this.setMaxListeners(0)
    this.layer = layer
    this.tempPath = temp.path
    this.#file = temp.handle
    this.started = new Promise((resolve, reject) => {
      this.#resolveStarted = resolve
      this.#rejectStarted = reject
    })
    this.done = new Promise((resolve, reject) => {
      this.#resolveDone = resolve
      this.#rejectDone = reject
    })
    // Observed by readers and the owner; these keep an unobserved failure from being "unhandled".
    this.started.catch(() => undefined)
    this.done.catch(() => undefined)
  }

  /** New readers may join only while the bytes are all on disk. */
  get joinable(): boolean {
    return this.diskError === undefined
  }

  /**
   * Downloads the layer: `open(offset)` makes the upstream request, from `offset` when resuming.
   * A connection that breaks (or stalls) mid-layer is resumed with a Range request from the byte
   * reached ({@link resumableDownload}, up to 3 times); the hash simply continues, so the final digest
   * check covers the stitched bytes. Resolves when the fill is over, either way; the outcome is
   * in {@link state}, {@link started} and {@link done}.
   */
  async run(open: (offset: number) => Promise<BlobResponse>): Promise<void> {
    try {
      const hash = createHash('sha256')
      const first = await openLayer(open, this.layer.size)
      this.#resolveStarted()
      const bytes = resumableDownload(first, this.layer.size, open, {
        // A degraded fill gives up instead: it will not be cached, and its readers are served
        // from a memory window that a slow resume would keep waiting.
        canResume: () => this.diskError === undefined,
        onResume: (err) => {
          this.resumes++
          this.emit('resume', err)
        },
      })
      for await (const chunk of bytes) {
        hash.update(chunk)
        await this.#store(chunk)
        // Degraded and nobody left to serve: the bytes have no destination.
        if (this.diskError && this.#readers.size === 0) throw this.diskError
      }
      const found = `sha256:${hash.digest('hex')}`
      if (found !== this.layer.digest) throw new DigestError('layer', this.layer.digest, found)
      this.state = 'verified'
      this.emit('progress')
      this.#resolveDone()
    } catch (err) {
      this.state = 'failed'
      this.error = err instanceof Error ? err : new Error(String(err))
      this.#rejectStarted(this.error)
      this.#rejectDone(this.error)
      this.emit('progress')
    }
  }

  async #store(chunk: Buffer): Promise<void> {
    if (!this.diskError) {
      try {
        await writeAll(this.#file, chunk, this.written)
        this.written += chunk.length
        this.#fileEnd = this.written
        this.emit('progress')
        return
      } catch (err) {
        this.diskError = err instanceof Error ? err : new Error(String(err))
        this.#memStart = this.#fileEnd
        this.emit('degraded', this.diskError)
      }
    }
    this.#mem.push(chunk)
    this.written += chunk.length
    this.emit('progress')
    // Pace the download to the slowest reader so memory stays bounded.
    while (this.written - this.#memStart > MEMORY_WINDOW && this.#readers.size > 0) {
      await new Promise<void>((resolve) => this.once('consumed', resolve))
      this.#trimMemory()
    }
  }

  /** Drops memory chunks every reader has passed. */
  #trimMemory(): void {
    let min = this.written
    for (const r of this.#readers) min = Math.min(min, r.position)
    while (this.#mem.length > 0 && this.#memStart + (this.#mem[0]?.length ?? 0) <= min) {
      this.#memStart += this.#mem.shift()?.length ?? 0
    }
  }

  /** How many bytes from the start a reader whose range ends at `end` (inclusive) may take now. */
  readable(end: number): number {
    if (this.state === 'verified') return end + 1
    // Withhold the range's last byte until the digest is proven.
    return Math.min(this.written, end)
  }

  /** Takes a reference on the temp file (released by {@link release}). */
  acquire(): void {
    this.#refs++
  }

  /** Drops a reference; the file closes with the last one (after it may have been renamed). */
  release(): void {
    if (--this.#refs === 0) this.#file.close().catch(() => undefined)
  }

  /** Reads up to `length` bytes at `position`, from the file or the memory window. */
  async read(buffer: Buffer, length: number, position: number): Promise<number> {
    if (position < this.#fileEnd) {
      const { bytesRead } = await this.#file.read(buffer, 0, Math.min(length, this.#fileEnd - position), position)
      return bytesRead
    }
    if (position < this.#memStart) throw new Error('fill memory window passed this reader')
    let offset = this.#memStart
    for (const chunk of this.#mem) {
      if (position < offset + chunk.length) {
        const from = position - offset
        return chunk.copy(buffer, 0, from, Math.min(chunk.length, from + length))
      }
      offset += chunk.length
    }
    return 0
  }

  /** A stream of bytes `start..end` (inclusive) that follows the fill as it grows. */
  reader(start: number, end: number): Readable {
    const reader = new FillReader(this, start, end)
    this.#readers.add(reader)
    reader.once('close', () => {
      this.#readers.delete(reader)
      this.emit('consumed')
    })
    return reader
  }

  /** Called by readers as they advance, so a degraded fill can drop what everyone has read. */
  advanced(): void {
    if (this.diskError) this.emit('consumed')
  }
}

async function writeAll(file: TempFile, chunk: Buffer, position: number): Promise<void> {
  let offset = 0
  while (offset < chunk.length) {
    const { bytesWritten } = await file.write(chunk, offset, chunk.length - offset, position + offset)
    offset += bytesWritten
  }
}

class FillReader extends Readable {
  readonly #fill: Fill
  #pos: number
  readonly #end: number
  #reading = false
  #released = false

  constructor(fill: Fill, start: number, end: number) {
    super({ highWaterMark: READ_CHUNK })
    this.#fill = fill
    this.#pos = start
    this.#end = end
    fill.acquire()
  }

  get position(): number {
    return this.#pos
  }

  override _read(): void {
    if (this.#reading) return
    this.#reading = true
    this.#pump().catch((err: unknown) => this.destroy(err instanceof Error ? err : new Error(String(err))))
  }

  async #pump(): Promise<void> {
    for (;;) {
      if (this.destroyed) return
      if (this.#pos > this.#end) {
        this.#reading = false
        this.push(null)
        return
      }
      const limit = this.#fill.readable(this.#end)
      if (this.#pos < limit) {
        const length = Math.min(READ_CHUNK, limit - this.#pos)
        const buffer = Buffer.allocUnsafe(length)
        const n = await this.#fill.read(buffer, length, this.#pos)
        if (n <= 0) throw new Error('cache temp file is shorter than recorded')
        this.#pos += n
        this.#fill.advanced()
        this.#reading = false
        if (this.push(n === length ? buffer : buffer.subarray(0, n))) {
          this.#reading = true
          continue
        }
        return
      }
      if (this.#fill.state === 'failed') throw this.#fill.error ?? new Error('fill failed')
      await new Promise<void>((resolve) => this.#fill.once('progress', resolve))
    }
  }

  override _destroy(err: Error | null, cb: (err?: Error | null) => void): void {
    if (!this.#released) {
      this.#released = true
      this.#fill.release()
    }
    cb(err)
  }
}

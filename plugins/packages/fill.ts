import { createHash } from 'node:crypto'
import { EventEmitter } from 'node:events'
import type { FileHandle } from 'node:fs/promises'
import { Readable } from 'node:stream'
import { DigestError, UpstreamError } from '../../errors.js'
import type { BlobResponse } from './registry-client.js'
import type { LayerRef } from './manifest.js'

const READ_CHUNK = 256 * 1024

/**
 * One download of one layer into a temp file, shared by every client that wants it.
 *
 * Clients never read the upstream socket: they read the temp file as it grows, each at its own
 * pace, so the registry is read at disk speed, a slow client holds up nobody, and the download
 * carries on whoever disconnects (its lifetime is its own, bounded by its own abort signal).
 * The last byte of any response is withheld until the whole layer has hashed to its digest, so
 * a corrupted download never produces a complete response.
 */
export class Fill extends EventEmitter {
  readonly layer: LayerRef
  readonly tempPath: string
  /** Bytes written to the temp file and readable through {@link read}. */
  written = 0
  state: 'running' | 'verified' | 'failed' = 'running'
  error: Error | undefined
  /** Settles when the registry answered (resolved) or failed before sending a byte (rejected). */
  readonly started: Promise<void>
  /** Settles when the layer is verified (resolved) or the fill failed (rejected). */
  readonly done: Promise<void>
  readonly #handle: FileHandle
  #refs = 1
  #resolveStarted!: () => void
  #rejectStarted!: (err: Error) => void
  #resolveDone!: () => void
  #rejectDone!: (err: Error) => void

  constructor(layer: LayerRef, temp: { path: string; handle: FileHandle }) {
    super()
    this.setMaxListeners(0)
    this.layer = layer
    this.tempPath = temp.path
    this.#handle = temp.handle
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

  /**
   * Downloads the layer: `open` makes the upstream request. Resolves when the fill is over,
   * either way; the outcome is in {@link state}, {@link started} and {@link done}.
   */
  async run(open: () => Promise<BlobResponse>): Promise<void> {
    try {
      const res = await open()
      if (res.length !== this.layer.size) {
        res.body.destroy()
        throw new UpstreamError(`registry blob is ${res.length} bytes, the manifest says ${this.layer.size}`)
      }
      this.#resolveStarted()
      const hash = createHash('sha256')
      for await (const chunk of res.body as AsyncIterable<Buffer>) {
        if (this.written + chunk.length > this.layer.size) {
          res.body.destroy()
          throw new UpstreamError('registry sent more bytes than the manifest says')
        }
        hash.update(chunk)
        await writeAll(this.#handle, chunk, this.written)
        this.written += chunk.length
        this.emit('progress')
      }
      if (this.written !== this.layer.size) throw new UpstreamError('registry ended the layer early')
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

  /** How many bytes from the start a reader whose range ends at `end` (inclusive) may take now. */
  readable(end: number): number {
    if (this.state === 'verified') return end + 1
    // Withhold the range's last byte until the digest is proven.
    return Math.min(this.written, end)
  }

  /** Takes a reference on the temp file handle (released by {@link release}). */
  acquire(): void {
    this.#refs++
  }

  /** Drops a reference; the handle closes with the last one (after the file may be renamed). */
  release(): void {
    if (--this.#refs === 0) this.#handle.close().catch(() => undefined)
  }

  async read(buffer: Buffer, length: number, position: number): Promise<number> {
    const { bytesRead } = await this.#handle.read(buffer, 0, length, position)
    return bytesRead
  }

  /** A stream of bytes `start..end` (inclusive) that follows the fill as it grows. */
  reader(start: number, end: number): Readable {
    return new FillReader(this, start, end)
  }
}

async function writeAll(handle: FileHandle, chunk: Buffer, position: number): Promise<void> {
  let offset = 0
  while (offset < chunk.length) {
    const { bytesWritten } = await handle.write(chunk, offset, chunk.length - offset, position + offset)
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

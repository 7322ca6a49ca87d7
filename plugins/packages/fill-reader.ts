import { Readable } from 'node:stream'

/**
 * Read size and per-response buffer: one chunk waits in the stream while the socket drains.
 * Measured on the real binary: 150 clients that stopped reading cost ~0.4 MiB each at 64 KiB,
 * ~0.7 MiB at 256 KiB; a bootstrap herd is many clients, so memory wins over fewer reads.
 */
export const READ_CHUNK = 64 * 1024

/** What a reader needs of the download it follows. */
export interface ReaderSource {
  readonly state: 'running' | 'verified' | 'failed'
  readonly error: Error | undefined
  /** Bytes received so far. */
  readonly written: number
  /** How many bytes from the start a reader whose range ends at `end` may take now. */
  readable(end: number): number
  read(buffer: Buffer, length: number, position: number): Promise<number>
  /** Resolves at the next change (bytes arrived, verified, failed). */
  progress(): Promise<void>
  acquire(): void
  release(): void
  advanced(): void
}

/**
 * A stream of bytes `start..end` (inclusive) that follows a download as it grows. It holds at
 * most one chunk beyond what the socket took (backpressure), so a stalled client costs about
 * {@link READ_CHUNK} of memory, however many there are.
 */
export class FillReader extends Readable {
  readonly #source: ReaderSource
  #pos: number
  readonly #end: number
  #reading = false
  #released = false
  /** The range's last byte, taken out of the download early, until the digest is proven. */
  #parked: Buffer | undefined

  constructor(source: ReaderSource, start: number, end: number) {
    super({ highWaterMark: READ_CHUNK })
    this.#source = source
    this.#pos = start
    this.#end = end
    source.acquire()
  }

  get position(): number {
    return this.#pos
  }

  /**
   * The first byte this reader still needs from the download's memory: none once it has
   * parked its last byte (a range that ends before the layer does must not hold a shared
   * window, and everyone on it, until the whole layer is verified).
   */
  get holdsFrom(): number {
    return this.#parked ? Number.POSITIVE_INFINITY : this.#pos
  }

  /** True when this reader has taken every byte there is so far and waits for more. */
  get waiting(): boolean {
    return this.#reading && this.#pos >= this.#source.readable(this.#end)
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
      if (this.#parked && this.#source.state === 'verified') {
        this.#pos++
        this.#reading = false
        this.push(this.#parked)
        continue
      }
      const limit = this.#source.readable(this.#end)
      if (this.#pos < limit) {
        const length = Math.min(READ_CHUNK, limit - this.#pos)
        const buffer = Buffer.allocUnsafe(length)
        const n = await this.#source.read(buffer, length, this.#pos)
        if (n <= 0) throw new Error('cache temp file is shorter than recorded')
        this.#pos += n
        this.#source.advanced()
        this.#reading = false
        if (this.push(n === length ? buffer : buffer.subarray(0, n))) {
          this.#reading = true
          continue
        }
        return
      }
      if (this.#source.state === 'failed') throw this.#source.error ?? new Error('download failed')
      if (!this.#parked && this.#pos === this.#end && this.#source.written > this.#end) {
        const byte = Buffer.allocUnsafe(1)
        if ((await this.#source.read(byte, 1, this.#end)) !== 1) throw new Error('download is shorter than recorded')
        this.#parked = byte
        this.#source.advanced()
        continue
      }
      await this.#source.progress()
    }
  }

  override _destroy(err: Error | null, cb: (err?: Error | null) => void): void {
    if (!this.#released) {
      this.#released = true
      this.#source.release()
    }
    cb(err)
  }
}

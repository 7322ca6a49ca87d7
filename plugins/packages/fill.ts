import { createHash } from 'node:crypto'
import { EventEmitter } from 'node:events'
import type { Readable } from 'node:stream'
import { DigestError } from '../../errors.js'
import type { TempFile } from './cache/blob-store.js'
import { FillReader } from './fill-reader.js'
import type { LayerRef } from './manifest.js'
import type { BlobResponse } from './registry/registry-client.js'
import { openLayer, resumableDownload } from './resumable-download.js'

export type { TempFile } from './cache/blob-store.js'

/** Bytes a download may keep in memory ahead of its slowest reader (memory mode only). */
const MEMORY_WINDOW = 2 * 1024 * 1024

/** How long a full memory window may hold up readers that wait for more, before the laggard is cut off. */
const DEFAULT_LAGGARD_MS = 10_000

/** A reader was cut off because it held up the others of a shared download too long. */
class LaggardError extends Error {
  readonly code = 'ELAGGARD'
  constructor() {
    super('client read too slowly for a shared download and was cut off')
    this.name = 'LaggardError'
  }
}

/**
 * One download of one layer, shared by every client that wants it, verified whole.
 *
 * With a temp file (a cache fill), clients never read the upstream socket: they read the file
 * as it grows, each at its own pace, so the registry is read at disk speed, a slow client holds
 * up nobody, and the download carries on whoever disconnects.
 *
 * Without one (a layer that cannot be cached: bigger than the cache, the cache full of files
 * being read, or no usable cache), or once the disk failed mid-fill (the fill turns
 * *degraded*), bytes are kept in a memory window of {@link MEMORY_WINDOW} ahead of the slowest
 * reader, and the download waits for it. A reader that holds the window full for
 * `laggardMs` while another waits for bytes is cut off ({@link LaggardError}; the client
 * retries), so one stalled client cannot stall the others without bound. Such a download
 * caches nothing, stops when its last reader leaves, and takes new readers only while its
 * window still holds their first byte.
 *
 * In both modes the last byte of any response is withheld until the whole layer has hashed to
 * its digest, so a corrupted download never produces a complete response.
 */
export class Fill extends EventEmitter {
  readonly layer: LayerRef
  readonly tempPath: string | undefined
  /** Bytes received from the registry (on disk, or in memory). */
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
  /** Resolves once the last reference is released and the temp file is closed. */
  readonly closed: Promise<void>
  readonly #file: TempFile | undefined
  readonly #laggardMs: number
  #refs = 1
  #hadReader = false
  /** Bytes [0, #fileEnd) are in the file; [#memStart, written) in #mem. */
  #fileEnd = 0
  #memStart = 0
  readonly #mem: Buffer[] = []
  readonly #readers = new Set<FillReader>()
  readonly #settle: Settlers

  constructor(layer: LayerRef, temp: { path: string; handle: TempFile } | undefined, laggardMs = DEFAULT_LAGGARD_MS) {
    super()
    this.setMaxListeners(0)
    this.layer = layer
    this.tempPath = temp?.path
    this.#file = temp?.handle
    this.#laggardMs = laggardMs
    const settle: Partial<Settlers> = {}
    this.started = new Promise((resolve, reject) => (settle.started = [resolve, reject]))
    this.done = new Promise((resolve, reject) => (settle.done = [resolve, reject]))
    this.closed = new Promise((resolve) => (settle.closed = resolve))
    this.#settle = settle as Settlers
    // Observed by readers and the owner; these keep an unobserved failure from being "unhandled".
    this.started.catch(() => undefined)
    this.done.catch(() => undefined)
  }

  /** The temp file, for the commit (fsync and rename); undefined in memory mode. */
  get temp(): { path: string; handle: TempFile } | undefined {
    return this.tempPath !== undefined && this.#file ? { path: this.tempPath, handle: this.#file } : undefined
  }

  /** Whether a new reader of bytes from `start` can be served by this download. */
  canServe(start: number): boolean {
    if (this.state === 'failed') return false
    if (this.#file && !this.diskError) return true
    // Memory mode: only while the window holds the first byte the reader needs. A degraded
    // fill's window is paced by the readers it had; a newcomer would add to the wait.
    return !this.diskError && start >= this.#memStart
  }

  /**
   * Downloads the layer: `open(offset)` makes the upstream request, from `offset` when resuming.
   * A connection that breaks (or stalls) mid-layer is resumed with a Range request from the
   * byte reached ({@link resumableDownload}); the hash simply continues, so the final digest
   * check covers the stitched bytes. Resolves when the download is over, either way; the
   * outcome is in {@link state}, {@link started} and {@link done}. When `signal` (the
   * download's deadline, or shutdown) aborted it, its reason is the error readers see.
   */
  async run(open: (offset: number) => Promise<BlobResponse>, signal?: AbortSignal): Promise<void> {
    try {
      const hash = createHash('sha256')
      const first = await openLayer(open, this.layer.size)
      this.#settle.started[0]()
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
      }
      const found = `sha256:${hash.digest('hex')}`
      if (found !== this.layer.digest) throw new DigestError('layer', this.layer.digest, found)
      this.state = 'verified'
      this.emit('progress')
      this.#settle.done[0]()
    } catch (err) {
      this.state = 'failed'
      const reason: unknown = signal?.aborted ? signal.reason : err
      this.error = reason instanceof Error ? reason : err instanceof Error ? err : new Error(String(err))
      this.#settle.started[1](this.error)
      this.#settle.done[1](this.error)
      this.emit('progress')
    }
  }

  /**
   * Takes the temp file as the whole layer, already written and verified against its digest by
   * another source (a peer): readers, who saw nothing of it until now, may read it all.
   */
  adoptVerified(): void {
    this.written = this.#fileEnd = this.layer.size
    this.state = 'verified'
    this.#settle.started[0]()
    this.#settle.done[0]()
    this.emit('progress')
  }

  async #store(chunk: Buffer): Promise<void> {
    if (this.#file && !this.diskError) {
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
    await this.#pace()
  }

  /** Holds the download while the memory window is full; cuts off a reader that holds it too long. */
  async #pace(): Promise<void> {
    for (;;) {
      this.#trimMemory()
      if (this.written - this.#memStart <= MEMORY_WINDOW) return
      // Nobody left to serve: the bytes have no destination.
      if (this.#hadReader && this.#readers.size === 0) throw this.diskError ?? new Error('every reader of an uncached download left')
      const moved = await new Promise<boolean>((resolve) => {
        const timer = setTimeout(() => resolve(false), this.#laggardMs)
        this.once('consumed', () => {
          clearTimeout(timer)
          resolve(true)
        })
      })
      if (!moved) this.#cutLaggards()
    }
  }

  /** Destroys the readers at the back of the window, if another reader is waiting for bytes. */
  #cutLaggards(): void {
    const readers = [...this.#readers]
    if (!readers.some((r) => r.waiting)) return
    const min = Math.min(...readers.map((r) => r.holdsFrom))
    for (const r of readers) if (r.holdsFrom === min && !r.waiting) r.destroy(new LaggardError())
  }

  /**
   * Drops memory chunks every reader has passed, only as far as the window needs: bytes kept
   * from the start let late clients join (a herd does not arrive in one instant), at no cost
   * beyond the window's bound.
   */
  #trimMemory(): void {
    if (!this.#hadReader) return
    let min = this.written
    for (const r of this.#readers) min = Math.min(min, r.holdsFrom)
    while (this.written - this.#memStart > MEMORY_WINDOW && this.#mem.length > 0 && this.#memStart + (this.#mem[0]?.length ?? 0) <= min) {
      this.#memStart += this.#mem.shift()?.length ?? 0
    }
  }

  /** How many bytes from the start a reader whose range ends at `end` (inclusive) may take now. */
  readable(end: number): number {
    if (this.state === 'verified') return end + 1
    // Withhold the range's last byte until the digest is proven.
    return Math.min(this.written, end)
  }

  progress(): Promise<void> {
    return new Promise((resolve) => this.once('progress', resolve))
  }

  /** Takes a reference on the temp file (released by {@link release}). */
  acquire(): void {
    this.#refs++
  }

  /** Drops a reference; the file closes with the last one (after it may have been renamed). */
  release(): void {
    if (--this.#refs !== 0) return
    const file = this.#file
    if (!file) this.#settle.closed()
    else
      void file
        .close()
        .catch(() => undefined)
        .finally(() => this.#settle.closed())
  }

  /** Reads up to `length` bytes at `position`, from the file or the memory window. */
  async read(buffer: Buffer, length: number, position: number): Promise<number> {
    if (this.#file && position < this.#fileEnd) {
      const { bytesRead } = await this.#file.read(buffer, 0, Math.min(length, this.#fileEnd - position), position)
      return bytesRead
    }
    if (position < this.#memStart) throw new Error('download memory window passed this reader')
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

  /** A stream of bytes `start..end` (inclusive) that follows the download as it grows. */
  reader(start: number, end: number): Readable {
    const reader = new FillReader(this, start, end)
    this.#readers.add(reader)
    this.#hadReader = true
    reader.once('close', () => {
      this.#readers.delete(reader)
      this.emit('consumed')
    })
    this.emit('consumed')
    return reader
  }

  /** Called by readers as they advance, so a memory window can drop what everyone has read. */
  advanced(): void {
    if (!this.#file || this.diskError) this.emit('consumed')
  }
}

interface Settlers {
  started: [() => void, (e: Error) => void]
  done: [() => void, (e: Error) => void]
  closed: () => void
}

/** Writes all of `chunk` at `position` (a positional write may take less than asked). */
export async function writeAll(file: TempFile, chunk: Buffer, position: number): Promise<void> {
  let offset = 0
  while (offset < chunk.length) {
    const { bytesWritten } = await file.write(chunk, offset, chunk.length - offset, position + offset)
    offset += bytesWritten
  }
}

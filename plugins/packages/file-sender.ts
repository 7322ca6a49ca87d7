import { read } from 'node:fs'
import type { Writable } from 'node:stream'

/** The read size for a response that has a large buffer from the pool. */
export const LARGE_READ = 1024 * 1024
/** The read size otherwise: what a stalled client can pin. */
export const SMALL_READ = 64 * 1024

/**
 * A bounded set of large read buffers, reused from response to response.
 *
 * A cache hit from disk costs a thread-pool read and a socket write per chunk: 512 of each for
 * a 32 MiB package at 64 KiB, against 32 at 1 MiB, and a fresh Buffer per chunk is garbage for
 * V8 to collect. Large buffers cut both, but a client that stops reading pins the buffer of
 * its unfinished write; so there are at most `max` of them (16 MiB by default), and a response
 * that finds none free reads into a small buffer of its own.
 */
export class ReadBuffers {
  readonly #free: Buffer[] = []
  #made = 0

  constructor(
    readonly size = LARGE_READ,
    readonly max = 16,
  ) {}

  /** Large buffers in use (for tests and metrics). */
  get inUse(): number {
    return this.#made - this.#free.length
  }

  take(): Buffer | undefined {
    const free = this.#free.pop()
    if (free) return free
    if (this.#made >= this.max) return undefined
    this.#made++
    // Slow (unpooled) allocation: a buffer of its own, never a view into Node's shared pool.
    return Buffer.allocUnsafeSlow(this.size)
  }

  give(buffer: Buffer): void {
    if (buffer.length === this.size && this.#free.length < this.#made) this.#free.push(buffer)
  }

  /** A buffer that will not come back (a closed socket may still hold it): make room for another. */
  forget(buffer: Buffer): void {
    if (buffer.length === this.size && this.#made > 0) this.#made--
  }
}

/**
 * Writes bytes `start..end` (inclusive) of the open file `fd` to `out` and ends it: one read
 * into a reused buffer, one write, and the next read only once that write has reached the
 * kernel (its callback), so the buffer is never written to while the socket still needs it,
 * and a client that stops reading stops the reads. `done` is called once, when the file is no
 * longer read (the last write queued, an error, or `out` closed); the caller then closes `fd`.
 * `onClosed` registers a callback for when `out` is done with (closed, or its connection gone:
 * a pipelined response queued behind another may never close by itself).
 * A file shorter than its range is an error: `out` is destroyed, never ended short. So is a file
 * that `unchanged` says was written to since it was checked: asked before the last chunk goes
 * out, once every byte has been read, so a file changed in place under a send cuts the
 * response off instead of completing a 200 with bytes it never had.
 */
export function sendFile(
  out: Writable,
  onClosed: (fn: () => void) => void,
  fd: number,
  start: number,
  end: number,
  buffers: ReadBuffers,
  done: (err?: Error) => void,
  unchanged: () => boolean = () => true,
): void {
  let position = start
  let finished = false
  /** The large buffer this response owns now (in a read, or in a write not yet done). */
  let large: Buffer | undefined
  let state: 'reading' | 'writing' | 'idle' = 'idle'
  let small: Buffer | undefined
  let gone = false
  const finish = (err?: Error): void => {
    if (finished) return
    finished = true
    done(err)
  }
  const onClose = (): void => {
    // A write still queued in the socket when it closed may keep its buffer until the socket is
    // gone: that buffer is never reused, and the pool may make another in its place.
    // A read in flight still fills its buffer and uses the file: its callback finishes.
    if (state === 'reading') {
      gone = true
      return
    }
    if (large && state === 'writing') buffers.forget(large)
    else if (large) buffers.give(large)
    large = undefined
    finish(position > end ? undefined : new Error('the client went away'))
  }
  onClosed(onClose)
  const written = (err?: Error | null): void => {
    state = 'idle'
    if (large) buffers.give(large)
    large = undefined
    if (finished) return
    if (err) finish(err)
    else step()
  }
  const step = (): void => {
    // A large buffer is taken per chunk, so the streams that are moving share the few there are.
    large = buffers.take()
    const buffer = large ?? (small ??= Buffer.allocUnsafeSlow(SMALL_READ))
    const want = Math.min(buffer.length, end - position + 1)
    state = 'reading'
    read(fd, buffer, 0, want, position, (err, n) => {
      state = 'idle'
      if (gone) {
        if (large) buffers.give(large)
        large = undefined
        finish(new Error('the client went away'))
        return
      }
      if (err || n === 0) {
        if (large) buffers.give(large)
        large = undefined
        const failure = err ?? new Error(`the file ended at byte ${position}, before byte ${end}`)
        out.destroy(failure)
        finish(failure)
        return
      }
      position += n
      const chunk = n === buffer.length ? buffer : buffer.subarray(0, n)
      state = 'writing'
      if (position > end && !unchanged()) {
        if (large) buffers.give(large)
        large = undefined
        const failure = new Error('the cached file was written to while it was being sent')
        out.destroy(failure)
        finish(failure)
        return
      }
      if (position > end) {
        out.end(chunk, written)
        // Nothing more to read: the file can be closed while the last write drains.
        finish()
      } else {
        out.write(chunk, written)
      }
    })
  }
  step()
}

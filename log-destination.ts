import { fstatSync, writeSync } from 'node:fs'
import { Socket } from 'node:net'
import { isatty, WriteStream } from 'node:tty'

/** What pino writes to, and what the process flushes on its way out. */
export interface LogDestination {
  write(line: string): void
  /** Hands what is batched to the file descriptor (or its queue, for a pipe or socket). */
  flush(): void
  /** Writes everything still held before returning, waiting at most `exitWaitMs` for a full pipe. */
  flushSync(): void
  /** Batches written (whole or in part) and lines dropped so far. */
  readonly stats: { writes: number; dropped: number }
}

export interface LogDestinationOptions {
  /** Lines are written in batches of about this many bytes. */
  batchBytes?: number
  /** A quiet process's lines wait at most this long. */
  flushEveryMs?: number
  /** Past this many bytes waiting for a slow reader, lines are dropped and counted. */
  maxBufferedBytes?: number
  /** How long the exit waits, in all, for a pipe that will not take more. */
  exitWaitMs?: number
  /** The `name` field of the warning that counts dropped lines. */
  name?: string
}

/**
 * The request log's way to stdout: every request writes a line at `info`, so lines are batched
 * (an array push per line, one write per ~12 KiB) and never written with a blocking call while
 * serving. Our own, not pino's asynchronous destination (sonic-boom), which an outside attack
 * showed hangs for ever at exit on a full pipe or a write error other than EPIPE, and can lose
 * the write it has in flight in libuv's thread pool without counting it.
 *
 * - A pipe or socket (a container's stdout) is written through a libuv stream on the event loop:
 *   each write is tried at once and non-blocking, and the rest waits for the reader in libuv's
 *   queue, with only one write outstanding, so at exit exactly what is unwritten is known.
 * - A terminal is written the same way, made non-blocking (Node makes terminals blocking).
 * - A file or another device is written synchronously: the page cache takes it; a write that
 *   fails (a full disk) drops what it could not write, counted, and never leaves a torn line
 *   glued to the next one.
 * - A reader that falls behind cannot take memory: past `maxBufferedBytes` waiting, lines are
 *   dropped and counted, and the next batch that goes out begins with a warning giving the
 *   count. A write error (ENOSPC, EIO) drops that batch, counted the same way; EPIPE (the reader
 *   is gone) drops everything after it.
 * - On 'exit' (SIGTERM ends in process.exit; an uncaught error emits 'exit' too) whatever is
 *   held is written synchronously, in order, waiting at most `exitWaitMs` for a full pipe.
 */
export function batchedLog(fd: number, o: LogDestinationOptions = {}): LogDestination {
  const batchBytes = o.batchBytes ?? 12 * 1024
  const maxBuffered = o.maxBufferedBytes ?? 16 * 1024 * 1024
  const exitWaitMs = o.exitWaitMs ?? 2000
  const stats = { writes: 0, dropped: 0 }
  /** Lines dropped since the last warning went out. */
  let unreported = 0
  let lines: string[] = []
  // In UTF-16 units, not bytes: only a threshold, and log lines are nearly all ASCII.
  let pending = 0
  let broken = false
  /** A synchronous write stopped mid-line: the next one starts with a newline. */
  let torn = false

  const drop = (count: number): void => {
    stats.dropped += count
    unreported += count
  }
  /** The batch as bytes, behind a warning if lines were dropped since the last one. */
  const take = (): Batch | undefined => {
    if (lines.length === 0) return undefined
    const text = lines.length === 1 ? (lines[0] as string) : lines.join('')
    const count = lines.length
    lines = []
    pending = 0
    const reported = unreported
    unreported = 0
    return { bytes: Buffer.from((reported > 0 ? droppedLine(reported, o.name) : '') + text), count, reported }
  }
  /** A batch that could not be written: its lines are dropped, and its warning's count is owed again. */
  const lost = (batch: Batch): void => {
    drop(batch.count)
    unreported += batch.reported
  }

  const stream = openStream(fd)
  // Batches not yet handed to the stream, and the one it is writing.
  const queue: Batch[] = []
  let queued = 0
  let outstanding: Batch | undefined
  const pump = (): void => {
    if (!stream || outstanding || broken || queue.length === 0) return
    // Under a backlog, what waits goes out together (up to 256 KiB a write).
    let batch = queue.shift() as Batch
    while (queue.length > 0 && batch.bytes.length + (queue[0]?.bytes.length ?? 0) <= 256 * 1024) {
      const next = queue.shift() as Batch
      batch = { bytes: Buffer.concat([batch.bytes, next.bytes]), count: batch.count + next.count, reported: batch.reported + next.reported }
    }
    queued -= batch.bytes.length
    outstanding = batch
    stats.writes++
    stream.write(batch.bytes, (err) => {
      if (err) {
        broken = true
        lost(batch)
      }
      outstanding = undefined
      pump()
    })
  }

  const flush = (): void => {
    if (broken) {
      const count = lines.length
      lines = []
      pending = 0
      if (count > 0) stats.dropped += count
      return
    }
    if (!stream) {
      const batch = take()
      if (!batch) return
      // After a write that stopped mid-line (a full disk), a newline first: the torn piece
      // stays a line of its own, and the warning that counts it starts a line.
      const bytes = torn ? Buffer.concat([NEWLINE_BYTES, batch.bytes]) : batch.bytes
      let at = 0
      stats.writes++
      try {
        at = writeUntil(fd, bytes, 0, bytes.length, 0)
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code === 'EPIPE') broken = true
        at = (err as { writtenBytes?: number }).writtenBytes ?? 0
      }
      if (at === bytes.length) {
        torn = false
        return
      }
      // Lines wholly written stay written; the rest (a torn one included) is counted.
      torn = at > 0 ? bytes[at - 1] !== NEWLINE : torn
      const rest = countLines(bytes.subarray(at))
      drop(rest.lines)
      unreported += rest.reported
      return
    }
    if (lines.length === 0) return
    const held = queued + (outstanding?.bytes.length ?? 0)
    if (held + pending > maxBuffered) {
      drop(lines.length)
      lines = []
      pending = 0
      return
    }
    const batch = take() as Batch
    queue.push(batch)
    queued += batch.bytes.length
    pump()
  }

  const log: LogDestination = {
    write(line) {
      lines.push(line)
      pending += line.length
      if (pending >= batchBytes) flush()
    },
    flush,
    flushSync() {
      if (broken) return
      // What the stream has not written yet of its outstanding batch (libuv keeps the count; it
      // may begin mid-line), the count of lines dropped so far, the queue, and the lines not yet
      // batched: in order, each byte once.
      const parts: Buffer[] = []
      let startsMidLine = false
      if (outstanding && stream) {
        const all = outstanding.bytes
        const left = Math.min(all.length, writeQueueSize(stream))
        if (left > 0) parts.push(all.subarray(all.length - left))
        startsMidLine = left > 0 && left < all.length && all[all.length - left - 1] !== NEWLINE
      }
      // A synchronous write that stopped mid-line: end that torn piece first.
      if (torn) parts.push(NEWLINE_BYTES)
      if (unreported > 0) parts.push(Buffer.from(droppedLine(unreported, o.name)))
      unreported = 0
      for (const b of queue) parts.push(b.bytes)
      queue.length = 0
      queued = 0
      if (lines.length > 0) parts.push(Buffer.from(lines.join('')))
      lines = []
      pending = 0
      if (parts.length === 0) return
      broken = true // whatever happens next, the stream is not used again
      writeAtExit(stream ? streamFd(stream, fd) : fd, Buffer.concat(parts), startsMidLine, exitWaitMs, o.name)
    },
    stats,
  }
  setInterval(flush, o.flushEveryMs ?? 250).unref()
  process.on('exit', () => {
    try {
      log.flushSync()
    } catch {
      // A log that cannot be written at exit (closed pipe, full disk) must not change the exit code.
    }
  })
  return log
}

/** Log lines as bytes: `count` lines, after a warning that `reported` lines were dropped (when > 0). */
interface Batch {
  bytes: Buffer
  count: number
  reported: number
}

/** A libuv stream on `fd` when it is a pipe, a socket or a terminal; undefined for anything written synchronously (a file, /dev/null). */
function openStream(fd: number): Socket | undefined {
  let kind
  try {
    kind = fstatSync(fd)
  } catch {
    return undefined
  }
  if (kind.isCharacterDevice() && isatty(fd)) {
    try {
      // A terminal: Node makes its writes blocking, so a stalled terminal (a paused `script`,
      // a full pty) would stop the event loop (found from outside). libuv opened it anew, so
      // non-blocking affects only this process's own file description.
      const tty = new WriteStream(fd)
      ;(tty as unknown as { _handle?: { setBlocking?: (on: boolean) => number } })._handle?.setBlocking?.(false)
      tty.on('error', () => {})
      tty.unref()
      return tty
    } catch {
      return undefined
    }
  }
  if (!kind.isFIFO() && !kind.isSocket()) return undefined
  try {
    const socket = new Socket({ fd, readable: false, writable: true })
    // Errors arrive in each write's callback; without a listener one would be thrown.
    socket.on('error', () => {})
    // Pending log writes must not keep a process alive that is otherwise done: exit writes them.
    socket.unref()
    return socket
  } catch {
    return undefined
  }
}

/** The descriptor libuv writes `socket` through (for a terminal, one it opened anew). */
function streamFd(socket: Socket, fallback: number): number {
  const handle = (socket as unknown as { _handle?: { fd?: number } })._handle
  return typeof handle?.fd === 'number' && handle.fd >= 0 ? handle.fd : fallback
}

/** Bytes libuv still holds for `socket`: what its outstanding write has not written yet. */
function writeQueueSize(socket: Socket): number {
  const handle = (socket as unknown as { _handle?: { writeQueueSize?: number } })._handle
  return handle?.writeQueueSize ?? 0
}

/** A warning in pino's format: `count` lines were dropped because the log's reader fell behind or failed. */
function droppedLine(count: number, name: string | undefined): string {
  return `${JSON.stringify({ level: 40, time: Date.now(), ...(name ? { name } : {}), droppedLines: count, msg: 'log lines dropped: the log reader fell behind or a write failed' })}\n`
}

/**
 * The exit's write of what the log still holds, within `waitMs`. A reader too slow to take it
 * all in time still gets whole lines and an exact count: the last quarter of the time (at most
 * 500 ms) is kept for finishing the line in progress and a warning that counts the lines left
 * out (and the counts in any warnings among them). `startsMidLine`: `data` continues a line
 * already partly written.
 */
function writeAtExit(fd: number, data: Buffer, startsMidLine: boolean, waitMs: number, name: string | undefined): void {
  const deadline = Date.now() + waitMs
  let at = writeUntil(fd, data, 0, data.length, deadline - Math.min(500, waitMs / 4))
  if (at === data.length) return
  if (at > 0 ? data[at - 1] !== NEWLINE : startsMidLine) {
    const eol = data.indexOf(NEWLINE, at)
    const end = eol === -1 ? data.length : eol + 1
    at = writeUntil(fd, data, at, end, deadline)
    if (at < end) return // a reader that took nothing in the time left: nothing more can be said
  }
  const rest = countLines(data.subarray(at))
  const count = rest.lines + rest.reported
  if (count <= 0) return
  const notice = Buffer.from(droppedLine(count, name))
  writeUntil(fd, notice, 0, notice.length, deadline)
}

const NEWLINE = 0x0a
const NEWLINE_BYTES = Buffer.from('\n')

/**
 * The log lines in `bytes` (a last one without its newline included) and, apart, the counts
 * carried by the drop warnings among them (which are not log lines of their own).
 */
function countLines(bytes: Buffer): { lines: number; reported: number } {
  const text = bytes.toString('latin1')
  // Non-empty pieces between newlines: a newline written to end a torn line is not a line.
  let lines = 0
  let from = 0
  for (let i = text.indexOf('\n'); i !== -1; from = i + 1, i = text.indexOf('\n', from)) if (i > from) lines++
  if (from < text.length) lines++
  let reported = 0
  for (const m of text.matchAll(/"droppedLines":(\d+)/g)) {
    reported += Number(m[1])
    lines--
  }
  return { lines, reported }
}

/**
 * Writes `bytes[from..to)`, waiting on EAGAIN until `deadline`; returns how far it got. Other
 * errors throw, with `writtenBytes` saying how far it had got.
 */
function writeUntil(fd: number, bytes: Buffer, from: number, to: number, deadline: number): number {
  const sleeper = new Int32Array(new SharedArrayBuffer(4))
  let at = from
  while (at < to) {
    try {
      at += writeSync(fd, bytes, at, to - at)
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code
      if (code !== 'EAGAIN' && code !== 'EBUSY') throw Object.assign(err as Error, { writtenBytes: at })
      if (Date.now() >= deadline) return at
      Atomics.wait(sleeper, 0, 0, 5)
    }
  }
  return at
}

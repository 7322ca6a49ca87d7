import { fstatSync, writeSync } from 'node:fs'
import { Socket } from 'node:net'

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
 * - A file, a terminal or a character device is written synchronously: the page cache takes it.
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

  const drop = (count: number): void => {
    stats.dropped += count
    unreported += count
  }
  /**
   * The batch as bytes, behind a warning if lines were dropped since the last one; with
   * `evenEmpty`, the warning alone when there are no lines (at exit, the count must go out).
   */
  const take = (evenEmpty = false): Batch | undefined => {
    if (lines.length === 0 && !(evenEmpty && unreported > 0)) return undefined
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
      try {
        stats.writes++
        writeAll(fd, batch.bytes, 0)
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code === 'EPIPE') broken = true
        lost(batch)
      }
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
      if (outstanding && stream) {
        const left = Math.min(outstanding.bytes.length, writeQueueSize(stream))
        if (left > 0) parts.push(outstanding.bytes.subarray(outstanding.bytes.length - left))
      }
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
      writeAtExit(fd, Buffer.concat(parts), exitWaitMs, o.name)
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

/** A libuv stream on `fd` when it is a pipe or a socket; undefined for anything written synchronously. */
function openStream(fd: number): Socket | undefined {
  let kind
  try {
    kind = fstatSync(fd)
  } catch {
    return undefined
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
 * Writes all of `bytes` synchronously, through short writes; on EAGAIN (a full non-blocking
 * pipe) it waits and tries again for up to `waitMs` in all, then throws.
 */
function writeAll(fd: number, bytes: Buffer, waitMs: number): void {
  const end = writeUntil(fd, bytes, 0, bytes.length, Date.now() + waitMs)
  if (end < bytes.length) throw Object.assign(new Error('the log pipe took nothing for too long'), { code: 'EAGAIN' })
}

/**
 * The exit's write of what the log still holds, within `waitMs`. A reader too slow to take it
 * all in time still gets whole lines and an exact count: the last quarter of the time (at most
 * 500 ms) is kept for finishing the line in progress and a warning that counts the lines left
 * out (and the counts in any warnings among them).
 */
function writeAtExit(fd: number, data: Buffer, waitMs: number, name: string | undefined): void {
  const deadline = Date.now() + waitMs
  let at = writeUntil(fd, data, 0, data.length, deadline - Math.min(500, waitMs / 4))
  if (at === data.length) return
  if (at > 0 && data[at - 1] !== NEWLINE) {
    const eol = data.indexOf(NEWLINE, at)
    const end = eol === -1 ? data.length : eol + 1
    at = writeUntil(fd, data, at, end, deadline)
    if (at < end) return // a reader that took nothing in the time left: nothing more can be said
  }
  const rest = data.subarray(at).toString('latin1')
  let count = 0
  for (let i = rest.indexOf('\n'); i !== -1; i = rest.indexOf('\n', i + 1)) count++
  // Warnings among the lines left out carry counts of their own: they count, not themselves.
  for (const m of rest.matchAll(/"droppedLines":(\d+)/g)) count += Number(m[1]) - 1
  if (count <= 0) return
  const notice = Buffer.from(droppedLine(count, name))
  writeUntil(fd, notice, 0, notice.length, deadline)
}

const NEWLINE = 0x0a

/** Writes `bytes[from..to)`, waiting on EAGAIN until `deadline`; returns how far it got. Other errors throw. */
function writeUntil(fd: number, bytes: Buffer, from: number, to: number, deadline: number): number {
  const sleeper = new Int32Array(new SharedArrayBuffer(4))
  let at = from
  while (at < to) {
    try {
      at += writeSync(fd, bytes, at, to - at)
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code
      if (code !== 'EAGAIN' && code !== 'EBUSY') throw err
      if (Date.now() >= deadline) return at
      Atomics.wait(sleeper, 0, 0, 5)
    }
  }
  return at
}

import { writeSync } from 'node:fs'
import { destination } from 'pino'

/** What pino writes to, and what the process flushes on its way out. */
export interface LogDestination {
  write(line: string): void
  /** Hands what is batched to the writer (asynchronously written). */
  flush(): void
  /** Writes everything out before returning: for the process's exit. */
  flushSync(): void
}

/**
 * The log's way to a file descriptor: lines batched into about `batchBytes` per write(2), through
 * pino's asynchronous destination (sonic-boom), which keeps its care for EAGAIN, short writes,
 * a closed pipe and the synchronous flush at exit.
 *
 * Why a batch in front of it: at `info` every request writes a line, and sonic-boom's `write()`
 * concatenates each line onto its pending string and measures that whole string's UTF-8 length
 * again (`Buffer.byteLength` of up to 16 KiB, flattened each time): about 3 µs a line, a
 * twentieth of a 64 KiB hit. Here a line is an array push and an addition; sonic-boom sees one
 * joined string per batch.
 *
 * Nothing is lost where Node still runs: the lines still batched are handed over and written
 * synchronously on 'exit' (SIGTERM ends in process.exit; an uncaught error emits 'exit' too).
 * A quiet proxy's lines wait at most `flushEveryMs`.
 *
 * A log reader that stops reading must not take the proxy's memory with it: past
 * `maxBufferedBytes` waiting to be written, lines are dropped and counted, and the first batch
 * written after that begins with a warning line saying how many were lost.
 */
export function batchedLog(fd: number, o: { batchBytes?: number; flushEveryMs?: number; maxBufferedBytes?: number; name?: string } = {}): LogDestination {
  const batchBytes = o.batchBytes ?? 12 * 1024
  const writer = destination({ dest: fd, sync: false, minLength: 0, maxLength: o.maxBufferedBytes ?? 16 * 1024 * 1024 })
  // sonic-boom emits 'drop' inside write(), when the batch did not fit.
  let refused = false
  writer.on('drop', () => (refused = true))
  let lines: string[] = []
  // In UTF-16 units, not bytes: only a threshold, and log lines are nearly all ASCII.
  let pending = 0
  let dropped = 0
  const flush = (): void => {
    if (lines.length === 0) return
    const batch = lines.length === 1 ? (lines[0] as string) : lines.join('')
    const count = lines.length
    lines = []
    pending = 0
    const notice = dropped > 0 ? droppedLine(dropped, o.name) : ''
    refused = false
    writer.write(notice + batch)
    dropped = refused ? dropped + count : 0
  }
  const log: LogDestination = {
    write(line) {
      lines.push(line)
      pending += line.length
      if (pending >= batchBytes) flush()
    },
    flush,
    flushSync() {
      // What sonic-boom holds first, then the batch, written here: handed to sonic-boom, the batch
      // would start an asynchronous write that an exiting process never finishes.
      writer.flushSync()
      const rest = lines.join('')
      lines = []
      pending = 0
      writeAllSync(fd, rest)
    },
  }
  setInterval(flush, o.flushEveryMs ?? 250).unref()
  // Before or after pino's own exit hook (sonic-boom's flushSync): either way nothing is left.
  process.on('exit', () => {
    try {
      log.flushSync()
    } catch {
      // A log that cannot be written at exit (closed pipe) must not change the exit code.
    }
  })
  return log
}

/** A warning in pino's format: `count` lines were dropped because the log's reader fell behind. */
function droppedLine(count: number, name: string | undefined): string {
  return `${JSON.stringify({ level: 40, time: Date.now(), ...(name ? { name } : {}), droppedLines: count, msg: 'log lines dropped: the log reader fell behind' })}\n`
}

/** How long an exiting process waits, in all, for a log pipe that will not take more. */
const EXIT_WAIT_MS = 5000

/** Writes all of `text`, through short writes and EAGAIN (a non-blocking pipe), for up to EXIT_WAIT_MS. */
function writeAllSync(fd: number, text: string): void {
  let rest = Buffer.from(text)
  let waited = 0
  const sleeper = new Int32Array(new SharedArrayBuffer(4))
  while (rest.length > 0) {
    try {
      rest = rest.subarray(writeSync(fd, rest))
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code
      if ((code !== 'EAGAIN' && code !== 'EBUSY') || waited >= EXIT_WAIT_MS) throw err
      Atomics.wait(sleeper, 0, 0, 10)
      waited += 10
    }
  }
}

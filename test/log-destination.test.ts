/**
 * The batched log destination (log-destination.ts) in a process of its own, as main.ts uses it:
 * every line written reaches the pipe, once, whether the process exits on its own, through
 * process.exit right after a burst, or through an uncaught error, and also when the pipe is
 * non-blocking and full at exit; a quiet process's line does not wait for a batch to fill.
 */
import t from 'tap'
import type { Test } from 'tap'
import { spawn } from 'node:child_process'
import { closeSync, openSync, readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { pathToFileURL } from 'node:url'
import { MAIN, buildIfMissing } from './fixtures/main-process.js'

buildIfMissing()
const MODULE = pathToFileURL(join(MAIN, '..', 'log-destination.js')).href

interface Run {
  out: string
  err: string
  code: number | null
  /** ms from spawn to the first byte on stdout. */
  firstByteMs: number | undefined
  /** ms from spawn to the child's exit. */
  exitMs: number
}

/**
 * Runs `body` (an ES module body with `batchedLog` in scope). stdout is a pipe read after
 * `readAfterMs` (never before the child exits, with `readAfterExit`; slowly, with `slowReader`), or
 * the file `stdoutFile`.
 */
function run(dir: string, body: string, o: { readAfterMs?: number; readAfterExit?: boolean; stdoutFile?: string; slowReader?: boolean } = {}): Promise<Run> {
  const file = join(dir, `child-${Math.random().toString(36).slice(2)}.mjs`)
  writeFileSync(file, `import { batchedLog } from ${JSON.stringify(MODULE)}\n${body}\n`)
  return new Promise((resolve, reject) => {
    const started = Date.now()
    const stdoutFd = o.stdoutFile === undefined ? undefined : openSync(o.stdoutFile, 'w')
    const child = spawn(process.execPath, [file], { stdio: ['ignore', stdoutFd ?? 'pipe', 'pipe'] })
    if (stdoutFd !== undefined) closeSync(stdoutFd)
    const out: Buffer[] = []
    let err = ''
    let firstByteMs: number | undefined
    let exitMs = NaN
    const read = (): void => {
      child.stdout?.on('data', (c: Buffer) => {
        firstByteMs ??= Date.now() - started
        out.push(c)
        // About 1 MB/s: a chunk (at most 64 KiB), then 50 ms of nothing.
        if (o.slowReader) {
          child.stdout?.pause()
          setTimeout(() => child.stdout?.resume(), 50)
        }
      })
      child.stdout?.resume()
    }
    child.stdout?.pause()
    if (!o.readAfterExit) setTimeout(read, o.readAfterMs ?? 0)
    child.on('exit', () => {
      exitMs = Date.now() - started
      if (o.readAfterExit) read()
    })
    child.stderr?.on('data', (c: Buffer) => (err += c.toString()))
    child.on('error', reject)
    child.on('close', (code) => resolve({ out: Buffer.concat(out).toString(), err, code, firstByteMs, exitMs }))
  })
}

/** Lines `0..n-1`, each padded to about 300 bytes (a request line's size), checked in order. */
const burst = (n: number): string => `for (let i = 0; i < ${n}; i++) log.write(JSON.stringify({ i, pad: 'x'.repeat(280) }) + '\\n')`

/**
 * Every line exactly once. Not their order: at exit, a write already handed to libuv's thread
 * pool can land after the lines written synchronously behind it (pino's own asynchronous
 * destination has the same race); each line carries its time.
 */
function checkLines(t: Test, out: string, n: number): void {
  const lines = out.split('\n').filter((l) => l !== '')
  t.equal(lines.length, n, `${n} lines written, ${lines.length} came out`)
  const seen = lines.map((l) => (JSON.parse(l) as { i: number }).i).sort((a, b) => a - b)
  t.same(
    seen.filter((v, i) => v !== i),
    [],
    'each line once',
  )
}

/** The line numbers written (in the order they came) and the lines counted as dropped by warnings; a torn line throws. */
function tally(out: string): { kept: number[]; dropped: number } {
  const parsed = out
    .split('\n')
    .filter((l) => l !== '')
    .map((l) => JSON.parse(l) as { i?: number; droppedLines?: number })
  return {
    kept: parsed.filter((l) => l.i !== undefined).map((l) => l.i as number),
    dropped: parsed.reduce((a, l) => a + (l.droppedLines ?? 0), 0),
  }
}

void t.test('a burst then process.exit: every line', async (t) => {
  const dir = t.testdir({})
  const r = await run(dir, `const log = batchedLog(1)\n${burst(5000)}\nprocess.exit(0)`)
  t.equal(r.code, 0, 'exits 0', { stderr: r.err.slice(0, 2000) })
  checkLines(t, r.out, 5000)
})

void t.test('the pipe is non-blocking and full at exit: the rest is written as it drains', async (t) => {
  const dir = t.testdir({})
  // A net.Socket on fd 1 puts the pipe in non-blocking mode, as a stdout socket would be; 1.5 MB
  // of lines overfill its buffer while the reader waits, so the exit's writes meet EAGAIN.
  const r = await run(
    dir,
    `import { Socket } from 'node:net'\nnew Socket({ fd: 1, readable: false })\nconst log = batchedLog(1)\n${burst(5000)}\nprocess.exit(0)`,
    {
      readAfterMs: 400,
    },
  )
  t.equal(r.code, 0, 'exits 0', { stderr: r.err.slice(0, 2000) })
  checkLines(t, r.out, 5000)
})

void t.test('an uncaught error: the lines before it are written, and the error exits non-zero', async (t) => {
  const dir = t.testdir({})
  const r = await run(dir, `const log = batchedLog(1)\n${burst(700)}\nsetTimeout(() => { throw new Error('boom') }, 5)`)
  t.not(r.code, 0, 'exits with an error')
  t.match(r.err, /boom/)
  checkLines(t, r.out, 700)
})

void t.test('a quiet process: its one line comes out within the flush interval, not at exit', async (t) => {
  const dir = t.testdir({})
  const r = await run(dir, `const log = batchedLog(1, { flushEveryMs: 100 })\nlog.write('{"i":0}\\n')\nsetTimeout(() => {}, 1500)`)
  t.equal(r.code, 0, 'exits 0', { stderr: r.err.slice(0, 2000) })
  checkLines(t, r.out, 1)
  t.ok(r.firstByteMs !== undefined && r.firstByteMs < 1200, `the line came after ${String(r.firstByteMs)} ms, before the process ended at 1.5 s`)
})

void t.test('lines are batched: a burst of small lines takes far fewer writes than lines', async (t) => {
  const dir = t.testdir({})
  const r = await run(
    dir,
    `const log = batchedLog(1, { batchBytes: 12 * 1024 })
${burst(3000)}
setTimeout(() => { process.stderr.write('writes=' + log.stats.writes + '\\n') }, 500)`,
  )
  t.equal(r.code, 0, 'exits 0', { stderr: r.err.slice(0, 2000) })
  checkLines(t, r.out, 3000)
  const writes = Number(/writes=(\d+)/.exec(r.err)?.[1])
  // 3000 lines of ~300 bytes are ~900 KB: at 12 KiB a batch, about 75 batches (fewer when a
  // backlog goes out together).
  t.ok(writes > 0 && writes <= 150, `${writes} writes for 3000 lines`)
})

void t.test('a reader that stops reading: past the cap lines are dropped, counted in a warning, and none is lost uncounted', async (t) => {
  const dir = t.testdir({})
  // 20,000 lines (~6 MB) while nobody reads: the pipe takes ~64 KiB, the cap 256 KiB, the rest
  // is dropped. Once the reader is back, ten more lines: the first batch after says how many.
  const r = await run(
    dir,
    `const log = batchedLog(1, { maxBufferedBytes: 256 * 1024, name: 'test' })
${burst(20000)}
setTimeout(() => {
  for (let i = 20000; i < 20010; i++) log.write(JSON.stringify({ i }) + '\\n')
  log.flush()
  setTimeout(() => process.exit(0), 300)
}, 1500)
setInterval(() => process.stderr.write('rss=' + process.memoryUsage().rss + '\\n'), 100).unref()`,
    { readAfterMs: 1000 },
  )
  t.equal(r.code, 0, 'exits 0', { stderr: r.err.slice(0, 2000) })
  const parsed = r.out
    .split('\n')
    .filter((l) => l !== '')
    .map((l) => JSON.parse(l) as { i?: number; droppedLines?: number; level?: number; name?: string; msg?: string })
  const notices = parsed.filter((l) => l.droppedLines !== undefined)
  const kept = parsed.filter((l) => l.i !== undefined)
  t.ok(notices.length >= 1, 'a warning says lines were dropped')
  t.match(notices[0], { level: 40, name: 'test', msg: /dropped/ })
  const dropped = notices.reduce((a, n) => a + (n.droppedLines ?? 0), 0)
  t.ok(dropped > 0 && kept.length < 20000, `${kept.length} lines kept, ${dropped} dropped`)
  t.equal(kept.length + dropped, 20010, 'every line is either written or counted as dropped')
  t.same(
    kept.slice(-10).map((l) => l.i),
    [20000, 20001, 20002, 20003, 20004, 20005, 20006, 20007, 20008, 20009],
    'the lines after the reader came back are all there',
  )
  const peak = Math.max(...[...r.err.matchAll(/rss=(\d+)/g)].map((m) => Number(m[1])))
  t.ok(peak < 150 * 1024 * 1024, `peak RSS ${Math.round(peak / 1048576)} MiB while the reader stalled`)
})

void t.test('stdout is /dev/full: every write fails, every line is counted as dropped, and the process exits 0 at once', async (t) => {
  const dir = t.testdir({})
  const r = await run(
    dir,
    `const log = batchedLog(1, { flushEveryMs: 20 })
let n = 0
const timer = setInterval(() => {
  for (let i = 0; i < 100; i++) log.write(JSON.stringify({ i: n++ }) + '\\n')
  if (n === 2000) {
    clearInterval(timer)
    setTimeout(() => { process.stderr.write('dropped=' + log.stats.dropped + '\\n'); process.exit(0) }, 100)
  }
}, 10)`,
    { stdoutFile: '/dev/full' },
  )
  t.equal(r.code, 0, 'exits 0', { stderr: r.err.slice(0, 2000) })
  t.ok(r.exitMs < 5000, `exited ${r.exitMs} ms after the start`)
  t.equal(Number(/dropped=(\d+)/.exec(r.err)?.[1]), 2000, 'all 2000 lines counted as dropped')
})

void t.test('a reader that never reads at exit: the process still exits, after at most the exit wait', async (t) => {
  const dir = t.testdir({})
  // 3 MB of lines, far more than the pipe holds; nobody reads until the child has exited.
  const r = await run(dir, `const log = batchedLog(1, { exitWaitMs: 500 })\n${burst(10000)}\nsetTimeout(() => process.exit(0), 50)`, { readAfterExit: true })
  t.equal(r.code, 0, 'exits 0', { stderr: r.err.slice(0, 2000) })
  t.ok(r.exitMs < 4000, `exited ${r.exitMs} ms after the start (exit wait 500 ms)`)
  // What did go out is whole lines, each once (what the pipe took before the wait ran out).
  const lines = r.out.split('\n').filter((l) => l !== '')
  const last = r.out.endsWith('\n') ? lines : lines.slice(0, -1)
  const seen = last.map((l) => (JSON.parse(l) as { i: number }).i)
  t.equal(new Set(seen).size, seen.length, `${seen.length} lines out, none twice`)
})

void t.test('a slow reader at exit: what was queued goes out in order, and written + counted = all', async (t) => {
  const dir = t.testdir({})
  // 20,000 lines (6 MB) against a 2 MiB cap: many are dropped. At exit the socket's buffer
  // (~200 KiB) is full, a 256 KiB write is outstanding and part-written, and the rest is queued:
  // the exit writes the part libuv had not written, the queue and the count as the reader drains.
  const r = await run(
    dir,
    `const log = batchedLog(1, { maxBufferedBytes: 2 * 1024 * 1024, name: 'test' })\n${burst(20000)}\nsetTimeout(() => process.exit(0), 50)`,
    {
      readAfterMs: 300,
    },
  )
  t.equal(r.code, 0, 'exits 0', { stderr: r.err.slice(0, 2000) })
  const { kept, dropped } = tally(r.out)
  t.equal(new Set(kept).size, kept.length, 'no line twice')
  t.same(
    kept.filter((v, i) => i > 0 && v <= (kept[i - 1] as number)),
    [],
    'in order',
  )
  t.ok(dropped > 0, `${dropped} counted as dropped`)
  t.equal(kept.length + dropped, 20000, `${kept.length} written + ${dropped} counted = 20000`)
})

void t.test('a reader too slow to take the backlog within the exit wait: whole lines, and the rest counted', async (t) => {
  const dir = t.testdir({})
  // 4 MiB waiting at exit, a reader at about 1 MB/s and 600 ms to write it in: most of the
  // backlog cannot go out; what does is whole lines, then a warning counts the rest.
  const r = await run(
    dir,
    `const log = batchedLog(1, { maxBufferedBytes: 4 * 1024 * 1024, exitWaitMs: 600 })\n${burst(20000)}\nsetTimeout(() => process.exit(0), 50)`,
    {
      slowReader: true,
    },
  )
  t.equal(r.code, 0, 'exits 0', { stderr: r.err.slice(0, 2000) })
  t.ok(r.exitMs < 3000, `exited ${r.exitMs} ms after the start`)
  const { kept, dropped } = tally(r.out)
  t.equal(new Set(kept).size, kept.length, 'no line twice')
  t.ok(kept.length < 14000, `${kept.length} lines written: the exit wait cut the backlog`)
  t.equal(kept.length + dropped, 20000, `${kept.length} written + ${dropped} counted = 20000`)
})

void t.test('a terminal that stops taking output (a pty nobody reads) never stops the event loop', async (t) => {
  const dir = t.testdir({})
  const lagFile = join(dir, 'lag')
  const child = join(dir, 'tty-child.mjs')
  // Under `script` stdout is a pty; script's own output goes to a pipe this test never reads,
  // so the pty fills. The child measures how late a 10 ms timer fires while it logs 6 MB.
  writeFileSync(
    child,
    `import { batchedLog } from ${JSON.stringify(MODULE)}
import { writeFileSync } from 'node:fs'
const log = batchedLog(1, { exitWaitMs: 300 })
let last = Date.now(), worst = 0, n = 0
const tick = setInterval(() => { const now = Date.now(); worst = Math.max(worst, now - last); last = now }, 10)
const burst = setInterval(() => {
  for (let i = 0; i < 1000; i++) log.write(JSON.stringify({ i: n++, pad: 'x'.repeat(280) }) + '\\n')
  if (n >= 20000) {
    clearInterval(burst)
    setTimeout(() => { clearInterval(tick); writeFileSync(${JSON.stringify(lagFile)}, String(worst)); process.exit(0) }, 300)
  }
}, 20)`,
  )
  const started = Date.now()
  const script = spawn('script', ['-qfc', `${process.execPath} ${child}`, '/dev/null'], { stdio: ['pipe', 'pipe', 'pipe'] })
  script.stdout.pause()
  const exited = await new Promise<boolean>((resolve) => {
    const timer = setTimeout(() => resolve(false), 15_000)
    const poll = setInterval(() => {
      try {
        if (readFileSync(lagFile, 'utf8') !== '') {
          clearInterval(poll)
          clearTimeout(timer)
          resolve(true)
        }
      } catch {
        // not written yet
      }
    }, 50)
  })
  script.kill('SIGKILL')
  t.ok(exited, `the child got to its end (${Date.now() - started} ms) with its terminal full`)
  const worst = exited ? Number(readFileSync(lagFile, 'utf8')) : NaN
  t.ok(worst < 3000, `its timers ran late by ${worst} ms at most (blocked on its terminal, they would stop for good)`)
})

void t.test('a file on a disk that fills mid-write: whole lines stay, the torn one ends on its own line, and the rest is counted', async (t) => {
  const dir = t.testdir({})
  const out = join(dir, 'log')
  // fs.writeSync takes 100,000 bytes in all, then fails with ENOSPC, the last write part-way.
  const body = `import fs from 'node:fs'
import { syncBuiltinESMExports } from 'node:module'
const real = fs.writeSync
let room = 100000, full = true
fs.writeSync = function (fd, buffer, offset = 0, length = buffer.length - offset, ...rest) {
  if (fd !== 1 || !full) return real.call(this, fd, buffer, offset, length, ...rest)
  if (room === 0) throw Object.assign(new Error('ENOSPC: no space left on device'), { code: 'ENOSPC' })
  const n = Math.min(room, length)
  room -= n
  return real.call(this, fd, buffer, offset, n, ...rest)
}
syncBuiltinESMExports()
const { batchedLog } = await import(${JSON.stringify(MODULE)})
const log = batchedLog(1, { flushEveryMs: 20 })
${burst(1000)}
log.flush()
setTimeout(() => {
  full = false // space again: the next batch starts with the count
  for (let i = 1000; i < 1010; i++) log.write(JSON.stringify({ i }) + '\\n')
  log.flush()
  process.exit(0)
}, 100)`
  writeFileSync(join(dir, 'enospc.mjs'), body)
  const fd = openSync(out, 'w')
  const child = spawn(process.execPath, [join(dir, 'enospc.mjs')], { stdio: ['ignore', fd, 'pipe'] })
  closeSync(fd)
  let err = ''
  child.stderr?.on('data', (c: Buffer) => (err += c.toString()))
  const code = await new Promise<number | null>((resolve) => child.on('close', resolve))
  t.equal(code, 0, 'exits 0', { stderr: err.slice(0, 2000) })
  const lines = readFileSync(out, 'utf8')
    .split('\n')
    .filter((l) => l !== '')
  const whole = lines.filter((l) => {
    try {
      JSON.parse(l)
      return true
    } catch {
      return false
    }
  })
  t.ok(lines.length - whole.length <= 1, `${lines.length - whole.length} torn line(s), on a line of its own`)
  const { kept, dropped } = tally(whole.join('\n'))
  t.equal(new Set(kept).size, kept.length, 'no line twice')
  t.ok(dropped > 0, `${dropped} counted as dropped`)
  t.equal(kept.length + dropped, 1010, `${kept.length} whole + ${dropped} counted = 1010`)
})

void t.test('at exit, a backlog that begins mid-line and a reader that wakes late: the line is finished before the count', async (t) => {
  const dir = t.testdir({})
  // The pipe is full when the child exits; nothing goes out in the first three quarters of
  // the 800 ms exit wait, then the reader starts: the half-written line is completed, then
  // the warning counts what could not go out.
  const r = await run(
    dir,
    `const log = batchedLog(1, { exitWaitMs: 800, maxBufferedBytes: 8 * 1024 * 1024 })\n${burst(20000)}\nsetTimeout(() => process.exit(0), 50)`,
    {
      readAfterMs: 700,
    },
  )
  t.equal(r.code, 0, 'exits 0', { stderr: r.err.slice(0, 2000) })
  const { kept, dropped } = tally(r.out)
  t.equal(new Set(kept).size, kept.length, 'no line twice')
  t.equal(kept.length + dropped, 20000, `${kept.length} written + ${dropped} counted = 20000`)
})

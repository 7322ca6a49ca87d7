/**
 * The batched log destination (log-destination.ts) in a process of its own, as main.ts uses it:
 * every line written reaches the pipe, once, whether the process exits on its own, through
 * process.exit right after a burst, or through an uncaught error, and also when the pipe is
 * non-blocking and full at exit; a quiet process's line does not wait for a batch to fill.
 */
import t from 'tap'
import type { Test } from 'tap'
import { spawn } from 'node:child_process'
import { writeFileSync } from 'node:fs'
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
}

/** Runs `body` (an ES module body with `log` in scope) with stdout a pipe read after `readAfterMs`. */
function run(dir: string, body: string, o: { readAfterMs?: number } = {}): Promise<Run> {
  const file = join(dir, `child-${Math.random().toString(36).slice(2)}.mjs`)
  writeFileSync(file, `import { batchedLog } from ${JSON.stringify(MODULE)}\n${body}\n`)
  return new Promise((resolve, reject) => {
    const started = Date.now()
    const child = spawn(process.execPath, [file], { stdio: ['ignore', 'pipe', 'pipe'] })
    const out: Buffer[] = []
    let err = ''
    let firstByteMs: number | undefined
    child.stdout.pause()
    setTimeout(() => {
      child.stdout.on('data', (c: Buffer) => {
        firstByteMs ??= Date.now() - started
        out.push(c)
      })
      child.stdout.resume()
    }, o.readAfterMs ?? 0)
    child.stderr.on('data', (c: Buffer) => (err += c.toString()))
    child.on('error', reject)
    child.on('close', (code) => resolve({ out: Buffer.concat(out).toString(), err, code, firstByteMs }))
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

void t.test('a burst then process.exit: every line', async (t) => {
  const dir = t.testdir({})
  const r = await run(dir, `const log = batchedLog(1)\n${burst(5000)}\nprocess.exit(0)`)
  t.equal(r.code, 0, r.err)
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
  t.equal(r.code, 0, r.err)
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
  t.equal(r.code, 0, r.err)
  checkLines(t, r.out, 1)
  t.ok(r.firstByteMs !== undefined && r.firstByteMs < 1200, `the line came after ${String(r.firstByteMs)} ms, before the process ended at 1.5 s`)
})

void t.test('lines are batched: a burst of small lines takes far fewer writes than lines', async (t) => {
  const dir = t.testdir({})
  // Counts the write(2)s sonic-boom makes (fs.write on fd 1) while 3000 lines go out.
  const r = await run(
    dir,
    `import fs from 'node:fs'
const write = fs.write
let writes = 0
fs.write = function (...args) { if (args[0] === 1) writes++; return write.apply(this, args) }
const log = batchedLog(1, { batchBytes: 12 * 1024 })
${burst(3000)}
setTimeout(() => { process.stderr.write('writes=' + writes + '\\n') }, 500)`,
  )
  t.equal(r.code, 0, r.err)
  checkLines(t, r.out, 3000)
  const writes = Number(/writes=(\d+)/.exec(r.err)?.[1])
  // 3000 lines of ~300 bytes are ~900 KB: at 12 KiB a batch, about 75 batches.
  t.ok(writes > 0 && writes <= 150, `${writes} writes for 3000 lines`)
})

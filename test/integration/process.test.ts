/**
 * The shipped process, `node dist/main.js`, as an operator and the cluster meet it: flag and
 * config errors (one line on stderr, exit code 2), a graceful SIGTERM in the middle of a
 * download, `--disable-cache`, and what it prints (JSON lines, never a credential).
 */
import t from 'tap'
import type { Test } from 'tap'
import { spawn } from 'node:child_process'
import type { ChildProcess } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { closeSync, existsSync, openSync } from 'node:fs'
import { mkdir } from 'node:fs/promises'
import * as http from 'node:http'
import { connect as netConnect } from 'node:net'
import { join } from 'node:path'
import { eventually } from '../fixtures/eventually.js'
import { FakeRegistry } from '../fixtures/fake-registry.js'
import { MAIN, buildIfMissing, childEnv } from '../fixtures/main-process.js'
import { freePort } from '../fixtures/net.js'
import { dockerRegistryBinary, startRealRegistry } from '../fixtures/real-registry.js'
import { makePackageTarGz } from '../fixtures/tarball.js'
import { basicToken, dockerConfigJson, listFiles, request, writeRegistryConfig } from '../fixtures/registry-config.js'

buildIfMissing()

/** A running `node dist/main.js` with its output captured. */
interface ProxyProcess {
  child: ChildProcess
  stdout(): string
  stderr(): string
  /** stdout lines parsed as JSON (a line that does not parse is kept as `{unparsed: line}`). */
  logs(): Array<Record<string, unknown>>
  /** Resolves with the first log line that satisfies `match`; rejects on exit or timeout. */
  waitForLog(match: (line: Record<string, unknown>) => boolean, ms?: number): Promise<Record<string, unknown>>
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>
}

function parseLines(text: string): Array<Record<string, unknown>> {
  return text
    .split('\n')
    .filter((l) => l.trim() !== '')
    .map((l) => {
      try {
        const v: unknown = JSON.parse(l)
        return typeof v === 'object' && v !== null && !Array.isArray(v) ? (v as Record<string, unknown>) : { unparsed: l }
      } catch {
        return { unparsed: l }
      }
    })
}

/** Spawns the proxy; teardown kills it if the test left it running. */
function spawnProxy(t: Test, args: string[], options: { env?: Record<string, string>; cwd?: string } = {}): ProxyProcess {
  const child = spawn(process.execPath, [MAIN, ...args], {
    cwd: options.cwd ?? t.testdirName,
    env: childEnv(options.env),
    stdio: ['ignore', 'pipe', 'pipe'],
  })
  let out = ''
  let err = ''
  let running = true
  const listeners = new Set<() => void>()
  child.stdout?.on('data', (c: Buffer) => {
    out += c.toString('utf8')
    for (const l of listeners) l()
  })
  child.stderr?.on('data', (c: Buffer) => {
    err += c.toString('utf8')
  })
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => {
    child.once('exit', (code, signal) => {
      running = false
      // Let the pipes drain so the last lines are in `out` and `err`.
      setImmediate(() => {
        for (const l of listeners) l()
        resolve({ code, signal })
      })
    })
  })
  t.teardown(async () => {
    if (running) child.kill('SIGKILL')
    await exited
  })
  const logs = (): Array<Record<string, unknown>> => parseLines(out)
  return {
    child,
    stdout: () => out,
    stderr: () => err,
    logs,
    exited,
    waitForLog: (match, ms = 15_000) =>
      new Promise((resolve, reject) => {
        const check = (): void => {
          const line = logs().find(match)
          if (line !== undefined) done(() => resolve(line))
          else if (!running) done(() => reject(new Error(`the proxy exited before the expected log line:\n${out}\n${err}`)))
        }
        const timer = setTimeout(() => done(() => reject(new Error(`no such log line within ${ms} ms:\n${out}\n${err}`))), ms)
        const done = (finish: () => void): void => {
          clearTimeout(timer)
          listeners.delete(check)
          finish()
        }
        listeners.add(check)
        check()
      }),
  }
}

/**
 * Starts the proxy on a free port and waits for its "listening" line. The port is free when
 * probed but may be taken before the child binds it: then it exits 2 naming
 * `--listen-address`, and another port is tried.
 */
async function startProxy(t: Test, args: string[], env: Record<string, string> = {}): Promise<{ proc: ProxyProcess; url: string }> {
  for (let attempt = 1; ; attempt++) {
    const port = await freePort()
    const proc = spawnProxy(t, [`--listen-address=127.0.0.1:${port}`, ...args], { env })
    try {
      await proc.waitForLog((l) => l.msg === 'registry-packages-proxy listening')
      return { proc, url: `http://127.0.0.1:${port}` }
    } catch (err) {
      if (attempt >= 3 || !proc.stderr().includes('EADDRINUSE')) throw err
    }
  }
}

/** Runs the proxy to its exit (for start-up failures). */
async function runToExit(t: Test, args: string[], env: Record<string, string> = {}): Promise<{ code: number | null; stdout: string; stderr: string }> {
  const proc = spawnProxy(t, args, { env })
  const { code } = await proc.exited
  return { code, stdout: proc.stdout(), stderr: proc.stderr() }
}

/** Checks the contract for a start-up failure: exit code 2, exactly one line on stderr. */
function failsWithOneLine(t: Test, what: string, r: { code: number | null; stdout: string; stderr: string }, mentions: string[]): void {
  t.equal(r.code, 2, `${what}: exit code 2`)
  const lines = r.stderr.split('\n').filter((l) => l !== '')
  t.equal(lines.length, 1, `${what}: exactly one line on stderr: ${JSON.stringify(r.stderr)}`)
  t.ok(r.stderr.endsWith('\n'), `${what}: the line ends with a newline`)
  for (const m of mentions) t.ok(lines[0]?.includes(m), `${what}: the line names ${m}: ${lines[0] ?? ''}`)
  t.equal(r.stdout, '', `${what}: nothing on stdout`)
}

/** A real package with a layer of `size` random (incompressible) bytes. */
function bigPackage(size: number): Buffer {
  return makePackageTarGz({ install: '#!/bin/sh\necho big\n', 'data/blob.bin': randomBytes(size) })
}

void t.test('start-up errors: one line naming the problem on stderr, exit code 2', async (t) => {
  const dir = t.testdir({ 'bad.json': '{"default": {"address": ', 'empty-cache': {} })
  const common = [`--cache-directory=${join(dir, 'empty-cache')}`, '--listen-address=127.0.0.1:1']
  const missing = join(dir, 'missing.json')
  const bad = join(dir, 'bad.json')
  // Independent processes: run them side by side, each start costs most of a second.
  const [unknown, quantity, noFile, notJson, level] = await Promise.all([
    runToExit(t, ['--frobnicate=yes', ...common]),
    runToExit(t, ['--cache-retention-size=12XB', ...common]),
    runToExit(t, [`--registry-config=${missing}`, ...common]),
    runToExit(t, [`--registry-config=${bad}`, ...common]),
    runToExit(t, common, { RPP_LOG_LEVEL: 'loud' }),
  ])
  failsWithOneLine(t, 'an unknown flag', unknown, ['--frobnicate'])
  failsWithOneLine(t, 'a bad quantity', quantity, ['--cache-retention-size', '12XB'])
  failsWithOneLine(t, 'a missing --registry-config file', noFile, ['--registry-config', missing])
  failsWithOneLine(t, 'a --registry-config file that is not JSON', notJson, ['--registry-config', bad])
  failsWithOneLine(t, 'RPP_LOG_LEVEL=loud', level, ['loud'])
  t.ok(/--log-level|RPP_LOG_LEVEL/.test(level.stderr), 'RPP_LOG_LEVEL=loud: the line names the flag or its variable')
  t.same(await listFiles(join(dir, 'empty-cache')), [], 'a failed start wrote nothing to the cache directory')
})

void t.test('SIGTERM mid-download: the response completes, the fill is committed, exit 0', async (t) => {
  const dir = t.testdir({ cache: {} })
  const registry = await FakeRegistry.start()
  t.teardown(() => registry.close())
  const layer = bigPackage(2 * 1024 * 1024)
  const image = registry.addImage('deckhouse/ce/pkg', [makePackageTarGz({ 'base.txt': 'base\n' }), layer])
  const config = await writeRegistryConfig(dir, { default: { address: registry.host, path: '/deckhouse/ce', scheme: 'http' } })
  const args = [`--cache-directory=${join(dir, 'cache')}`, `--registry-config=${config}`]
  const query = `/package?digest=${image.manifestDigest}&path=pkg`

  // ~2 s for the 2 MiB layer: 64 chunks of 32 KiB, 30 ms apart.
  registry.faults = { blobChunkSize: 32 * 1024, blobChunkDelayMs: 30 }
  const first = await startProxy(t, args)
  const body = await new Promise<{ status: number; body: Buffer; signalledAt: number }>((resolve, reject) => {
    const req = http.get(`${first.url}${query}`, { agent: false }, (res) => {
      const chunks: Buffer[] = []
      let signalledAt = -1
      res.on('data', (c: Buffer) => {
        chunks.push(c)
        if (signalledAt < 0) {
          signalledAt = chunks.reduce((n, b) => n + b.length, 0)
          first.proc.child.kill('SIGTERM')
        }
      })
      res.on('close', () => {
        if (!res.complete) reject(new Error('the in-flight response was cut'))
      })
      res.on('error', reject)
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks), signalledAt }))
    })
    req.on('error', reject)
  })
  t.ok(body.signalledAt > 0 && body.signalledAt < layer.length, `SIGTERM was sent mid-body (after ${body.signalledAt} bytes)`)
  t.equal(body.status, 200, 'the in-flight response: 200')
  t.equal(body.body.length, layer.length, 'the in-flight response: every byte')
  t.ok(body.body.equals(layer), 'the in-flight response: byte-exact')
  const exit = await first.proc.exited
  t.same(exit, { code: 0, signal: null }, 'the process exits 0')
  t.ok(
    first.proc.logs().some((l) => l.msg === 'stopping: draining in-flight responses'),
    'it logged the drain',
  )
  t.equal(registry.counts.blob, 1, 'one blob request reached the registry')

  registry.faults = {}
  const counts = { ...registry.counts }
  const second = await startProxy(t, args)
  const hit = await request(`${second.url}${query}`)
  t.equal(hit.status, 200, 'a new process on the same cache: 200')
  t.ok(hit.body.equals(layer), 'a new process on the same cache: byte-exact')
  t.equal(registry.counts.blob, counts.blob, 'the new process did not fetch the blob (the fill was committed)')
  t.equal(registry.counts.total, counts.total, 'the new process made no upstream request at all')
  const line = await second.proc.waitForLog((l) => l.path === '/package')
  t.equal(line.result, 'hit', 'logged as a hit')
  second.proc.child.kill('SIGTERM')
  t.same(await second.proc.exited, { code: 0, signal: null }, 'an idle process exits 0 on SIGTERM')
})

void t.test('SIGTERM: the listener stops accepting while a response drains', async (t) => {
  const dir = t.testdir({ cache: {} })
  const registry = await FakeRegistry.start()
  t.teardown(() => registry.close())
  const layer = bigPackage(1024 * 1024)
  const image = registry.addImage('deckhouse/ce/pkg', [layer])
  const config = await writeRegistryConfig(dir, { default: { address: registry.host, path: '/deckhouse/ce', scheme: 'http' } })
  registry.faults = { blobChunkSize: 32 * 1024, blobChunkDelayMs: 40 }
  const { proc, url } = await startProxy(t, [`--cache-directory=${join(dir, 'cache')}`, `--registry-config=${config}`])

  let ended = false
  const inFlight = request(`${url}/package?digest=${image.manifestDigest}&path=pkg`).finally(() => {
    ended = true
  })
  await registry.waitForRequests(1, (r) => r.url.includes('/blobs/'))
  proc.child.kill('SIGTERM')
  await proc.waitForLog((l) => l.msg === 'stopping: draining in-flight responses')
  // hapi closes the listener a few ticks after the log line: wait for the refusal, bounded.
  let refused = false
  for (let i = 0; i < 100 && !refused && !ended; i++) {
    refused = await request(`${url}/healthz`).then(
      () => false,
      (err: NodeJS.ErrnoException) => err.code === 'ECONNREFUSED',
    )
    if (!refused) await new Promise((r) => setTimeout(r, 10))
  }
  t.ok(refused, 'a new connection is refused while the download still runs')
  t.notOk(ended, 'the refusal came before the in-flight response ended')
  const res = await inFlight
  t.equal(res.status, 200, 'the in-flight response: 200')
  t.ok(res.body.equals(layer), 'the in-flight response: byte-exact')
  t.same(await proc.exited, { code: 0, signal: null }, 'exit 0')
})

void t.test('SIGTERM under a herd of keep-alive clients: no body is cut, and no cut body is logged as whole', async (t) => {
  // Found from outside: Node's server.close() destroyed each connection whose response it had
  // handed to the kernel, and a tail the client had not read yet was lost to a reset, while
  // the log said 200 with every byte. Several rounds: each SIGTERM meets the herd mid-flight.
  const dir = t.testdir({})
  const registry = await FakeRegistry.start()
  t.teardown(() => registry.close())
  const layer = randomBytes(4 * 1024 * 1024)
  const image = registry.addImage('deckhouse/ce/herd', [layer])
  const config = await writeRegistryConfig(dir, { default: { address: registry.host, path: '/deckhouse/ce', scheme: 'http' } })
  let cut = 0
  let whole = 0
  let loggedWhole = 0
  for (let round = 0; round < 3; round++) {
    await mkdir(join(dir, `cache-${round}`))
    const { proc, url } = await startProxy(t, [`--cache-directory=${join(dir, `cache-${round}`)}`, `--registry-config=${config}`])
    const path = `/package?digest=${image.manifestDigest}&path=herd`
    // A miss, then hits until it is served from memory (the fast path's one socket write).
    for (let i = 0; i < 3; i++) t.equal((await request(`${url}${path}`)).status, 200)
    const agent = new http.Agent({ keepAlive: true, maxSockets: 16 })
    let stop = false
    let warm = 0
    const one = (): Promise<void> =>
      new Promise((resolve) => {
        const req = http.get(`${url}${path}`, { agent }, (res) => {
          let n = 0
          res.on('data', (c: Buffer) => (n += c.length))
          const done = (): void => {
            if (res.complete && n === layer.length) whole++
            else cut++
            resolve()
          }
          res.on('end', done)
          res.on('error', done)
        })
        req.on('error', () => {
          stop = true // refused or reset before any header: a request not answered, not a cut body
          resolve()
        })
      })
    const workers = Array.from({ length: 16 }, async () => {
      while (!stop) {
        await one()
        warm++
      }
    })
    while (warm < 32) await new Promise((r) => setTimeout(r, 20))
    proc.child.kill('SIGTERM')
    t.same(await proc.exited, { code: 0, signal: null }, `round ${round + 1}: exit 0`)
    stop = true
    await Promise.all(workers)
    agent.destroy()
    loggedWhole += proc.logs().filter((l) => l.msg === 'request' && l.path === '/package' && l.status === 200 && l.bytes === layer.length).length - 3
  }
  t.equal(cut, 0, `no response cut after its headers (${whole} whole)`)
  t.ok(whole > 96, 'the herd was served')
  t.ok(loggedWhole <= whole, `no more responses logged whole (${loggedWhole}) than clients received whole (${whole})`)
})

void t.test(
  'SIGTERM while a slow reader holds a hit: new connections are refused at once, keep-alive clients get whole answers with Connection: close',
  async (t) => {
    // Found from outside: the listener kept accepting while the stop waited for hits sent from
    // files, and requests sent on keep-alive connections meanwhile were cut mid-body when that
    // wait ended (hapi's record of a socket's request was per socket, and the previous response's
    // late 'finish' deleted the next one's).
    const dir = t.testdir({ cache: {} })
    const registry = await FakeRegistry.start()
    t.teardown(() => registry.close())
    const small = randomBytes(4 * 1024 * 1024)
    const large = randomBytes(12 * 1024 * 1024) // over the memory tier's 8 MiB: sent from its file
    const smallImage = registry.addImage('deckhouse/ce/small', [small])
    const largeImage = registry.addImage('deckhouse/ce/large', [large])
    const config = await writeRegistryConfig(dir, { default: { address: registry.host, path: '/deckhouse/ce', scheme: 'http' } })
    const { proc, url } = await startProxy(t, [`--cache-directory=${join(dir, 'cache')}`, `--registry-config=${config}`])
    const port = Number(new URL(url).port)
    const smallPath = `/package?digest=${smallImage.manifestDigest}&path=small`
    const largePath = `/package?digest=${largeImage.manifestDigest}&path=large`
    for (const path of [smallPath, smallPath, smallPath, largePath, largePath]) t.equal((await request(`${url}${path}`)).status, 200)

    // The slow reader: a hit from a file, read a little, then not at all for 3 s after SIGTERM.
    const slow = netConnect(port, '127.0.0.1')
    await new Promise((r) => slow.once('connect', r))
    const slowChunks: Buffer[] = []
    slow.on('data', (c: Buffer) => slowChunks.push(c))
    const slowClosed = new Promise((r) => slow.once('close', r))
    slow.write(`GET ${largePath} HTTP/1.1\r\nHost: x\r\n\r\n`)
    await new Promise((r) => slow.once('data', r))
    slow.pause()

    const agent = new http.Agent({ keepAlive: true, maxSockets: 8 })
    let stop = false
    let sigAt = 0
    const answers: Array<{ complete: boolean; bytes: number; size: number; connection: string | undefined; after: boolean }> = []
    let sent = 0
    /** One request, of either package; false once the proxy no longer answers on this worker's connections. */
    const one = (): Promise<boolean> =>
      new Promise((resolve) => {
        const sentAt = Date.now()
        const [path, size] = ++sent % 2 === 0 ? [smallPath, small.length] : [largePath, large.length]
        const req = http.get(`${url}${path}`, { agent }, (res) => {
          let n = 0
          res.on('data', (c: Buffer) => (n += c.length))
          const done = (): void => {
            answers.push({ complete: res.complete, bytes: n, size, connection: res.headers.connection, after: sigAt > 0 && sentAt > sigAt + 200 })
            resolve(true)
          }
          res.on('end', done)
          res.on('error', done)
        })
        // Refused, or closed before an answer: a request not answered, not a cut body.
        req.on('error', () => resolve(false))
      })
    const workers = Array.from({ length: 8 }, async () => {
      while (!stop && (await one()));
    })
    while (answers.length < 16) await new Promise((r) => setTimeout(r, 20))
    sigAt = Date.now()
    proc.child.kill('SIGTERM')
    await proc.waitForLog((l) => l.msg === 'stopping: draining in-flight responses')
    // Refused within a second of the stop starting, while the slow reader still holds its hit.
    let refused = false
    for (let i = 0; i < 100 && !refused; i++) {
      refused = await request(`${url}/healthz`).then(
        () => false,
        (err: NodeJS.ErrnoException) => err.code === 'ECONNREFUSED',
      )
      if (!refused) await new Promise((r) => setTimeout(r, 10))
    }
    t.ok(refused, 'a new connection is refused while a hit is still being sent')
    await new Promise((r) => setTimeout(r, 3000))
    t.ok(proc.child.exitCode === null, 'the proxy still waits for the slow reader')
    slow.resume()
    await slowClosed
    stop = true
    await Promise.all(workers)
    agent.destroy()
    t.same(await proc.exited, { code: 0, signal: null }, 'exit 0')
    const raw = Buffer.concat(slowChunks)
    const body = raw.subarray(raw.indexOf('\r\n\r\n') + 4)
    t.ok(body.equals(large), 'the slow reader got its whole hit')
    const cut = answers.filter((a) => !a.complete || a.bytes !== a.size)
    t.equal(cut.length, 0, `no answer cut after its headers (${answers.length} answers)`)
    const late = answers.filter((a) => a.after)
    t.ok(
      late.every((a) => a.connection === 'close'),
      `requests sent during the stop are answered with Connection: close (${late.length})`,
    )
    const logged = proc.logs().filter((l) => l.msg === 'request' && l.path === '/package')
    const whole = (size: number): number => answers.filter((a) => a.size === size && a.complete && a.bytes === size).length
    t.equal(logged.filter((l) => l.status === 200 && l.bytes === small.length).length, whole(small.length) + 3, 'one whole line per whole answer (4 MiB)')
    t.equal(
      logged.filter((l) => l.status === 200 && l.bytes === large.length).length,
      whole(large.length) + 2 + 1,
      'one whole line per whole answer (12 MiB, the slow reader too)',
    )
  },
)

void t.test('SIGTERM during start-up: exit 0, not death by the signal', async (t) => {
  // Found from outside: until the server was listening, Node's default handler applied.
  const dir = t.testdir({ cache: {} })
  const registry = await FakeRegistry.start()
  t.teardown(() => registry.close())
  const config = await writeRegistryConfig(dir, { default: { address: registry.host, path: '/deckhouse/ce', scheme: 'http' } })
  const port = await freePort()
  const proc = spawnProxy(t, [`--listen-address=127.0.0.1:${port}`, `--cache-directory=${join(dir, 'cache')}`, `--registry-config=${config}`])
  // Once the cache directory is being set up (a step of start-up, before it listens, at about
  // 0.9 s here), whatever the machine's pace.
  await eventually(() => existsSync(join(dir, 'cache', 'index.sqlite')), 'start-up opens the index', { timeoutMs: 20_000, intervalMs: 2 })
  proc.child.kill('SIGTERM')
  t.same(await proc.exited, { code: 0, signal: null }, 'exit 0')
  t.ok(
    proc.logs().some((l) => l.msg === 'stopped before start-up finished'),
    'a line says it stopped before start-up finished',
  )
  t.notOk(
    proc.logs().some((l) => l.msg === 'registry-packages-proxy listening'),
    'it never listened',
  )
})

void t.test('requests Node cannot parse have their line too, with nothing of what was sent; a HEAD logs 0 bytes; refusals name their code', async (t) => {
  const dir = t.testdir({ cache: {} })
  const registry = await FakeRegistry.start()
  t.teardown(() => registry.close())
  const image = registry.addImage('deckhouse/ce/pkg', [bigPackage(10_000)])
  const config = await writeRegistryConfig(dir, { default: { address: registry.host, path: '/deckhouse/ce', scheme: 'http' } })
  const { proc, url } = await startProxy(t, [`--cache-directory=${join(dir, 'cache')}`, `--registry-config=${config}`])
  const port = Number(new URL(url).port)
  const secret = `s3cret-${randomBytes(8).toString('hex')}`
  /** Sends raw bytes; resolves with the status line the proxy answered. */
  const raw = (text: string): Promise<string> =>
    new Promise((resolve, reject) => {
      const socket = netConnect(port, '127.0.0.1', () => socket.end(text))
      let got = ''
      socket.on('data', (c: Buffer) => (got += c.toString('latin1')))
      socket.on('close', () => resolve(got.split('\r\n')[0] ?? ''))
      socket.on('error', reject)
    })
  t.match(await raw(`BREW /package HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${secret}\r\n\r\n`), /^HTTP\/1\.1 400/, 'an unknown method: 400')
  t.match(await raw(`GET /package HTTP/1.1\r\nHost: x\r\nContent-Length: ${secret}\r\n\r\n`), /^HTTP\/1\.1 400/, 'a malformed header: 400')
  t.match(await raw(`GET /package?x=${secret} HTTP/1.1\r\nHost: x\r\nX-Pad: ${'a'.repeat(20_000)}\r\n\r\n`), /^HTTP\/1\.1 431/, 'a head over 16 KiB: 431')
  // A head that parses and a body that does not: the request exists, and its own line says so (once).
  t.match(
    await raw(`PUT /cache/${image.manifestDigest} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabcde\r\nzz${secret}\r\n\r\n`),
    /^HTTP\/1\.1 4/,
    'a bad chunk in a body: a 4xx',
  )
  // A valid request that says `Connection: close`, with more bytes after it in the same write:
  // the request is answered (not with hapi's 400), and the bytes after it are not a request.
  const closing = await new Promise<string>((resolve, reject) => {
    // Not half-closed (a client that ends its side may get nothing for an answer still to come).
    const socket = netConnect(port, '127.0.0.1', () =>
      socket.write(
        `GET /package?digest=${image.manifestDigest}&path=pkg HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n`,
      ),
    )
    let got = ''
    socket.on('data', (c: Buffer) => (got += c.toString('latin1')))
    socket.on('close', () => resolve(got))
    socket.on('error', reject)
  })
  t.match(closing, /^HTTP\/1\.1 200/, 'a request pipelined past by its client: still a 200')
  t.equal(closing.split('HTTP/1.1 ').length, 2, 'and the only answer')
  const head = await request(`${url}/package?digest=${image.manifestDigest}&path=pkg`, { method: 'HEAD' })
  t.equal(head.status, 200)
  t.equal((await request(`${url}/package?digest=${image.manifestDigest}&path=pkg`, { method: 'POST' })).status, 405)
  t.equal((await request(`${url}/package?digest=${image.manifestDigest}&path=pkg`, { headers: { range: 'bytes=99999999-' } })).status, 416)
  proc.child.kill('SIGTERM')
  await proc.exited
  const lines = proc.logs().filter((l) => l.msg === 'request')
  const bad = lines.filter((l) => String(l.req).startsWith('client-error:'))
  t.same(
    bad.map((l) => [l.status, (l.err as { code?: string } | undefined)?.code, l.method, l.path]),
    [
      [400, 'HPE_INVALID_METHOD', '', ''],
      [400, 'HPE_INVALID_CONTENT_LENGTH', '', ''],
      [431, 'HPE_HEADER_OVERFLOW', '', ''],
    ],
    'one line each, in order, with status and parser code',
  )
  t.equal(lines.filter((l) => l.method === 'put').length, 1, 'the request with a bad body has one line, its own')
  t.notOk(proc.stdout().includes(secret) || proc.stderr().includes(secret), 'nothing the client sent is logged')
  const headLine = lines.find((l) => l.method === 'head')
  t.equal(headLine?.bytes, 0, 'a HEAD sent no body, and its line says 0 bytes')
  const codeOf = (status: number): unknown => (lines.find((l) => l.status === status)?.err as { code?: string } | undefined)?.code
  t.equal(codeOf(405), 'EMETHOD', 'a 405 line names its code')
  t.equal(codeOf(416), 'ERANGE', 'a 416 line names its code')
})

void t.test('--disable-cache: ready, serves packages, writes nothing', async (t) => {
  const dir = t.testdir({ cache: {} })
  const registry = await FakeRegistry.start()
  t.teardown(() => registry.close())
  const layer = bigPackage(64 * 1024)
  const image = registry.addImage('deckhouse/ce/pkg', [layer])
  const config = await writeRegistryConfig(dir, { default: { address: registry.host, path: '/deckhouse/ce', scheme: 'http' } })
  const cacheDir = join(dir, 'cache')
  const { proc, url } = await startProxy(t, ['--disable-cache', `--cache-directory=${cacheDir}`, `--registry-config=${config}`])

  const ready = await request(`${url}/readyz`)
  t.equal(ready.status, 200, `/readyz 200: ${ready.body.toString('utf8')}`)
  for (const n of [1, 2]) {
    const res = await request(`${url}/package?digest=${image.manifestDigest}&path=pkg`)
    t.equal(res.status, 200, `GET ${n}: 200`)
    t.ok(res.body.equals(layer), `GET ${n}: byte-exact`)
    t.equal(res.headers['content-length'], String(layer.length), `GET ${n}: Content-Length`)
  }
  t.equal(registry.counts.blob, 2, 'each GET went to the registry: nothing is cached')
  proc.child.kill('SIGINT')
  t.same(await proc.exited, { code: 0, signal: null }, 'SIGINT: exit 0')
  t.same(await listFiles(cacheDir), [], 'no file was created under the cache directory')
})

void t.test('output: JSON lines on stdout, never a credential anywhere', async (t) => {
  const dir = t.testdir({ cache: {} })
  const wrongPassword = 'Wr0ng-Secret-Pa55'
  let address: string
  let username: string
  let password: string
  let image: { manifestDigest: string }
  /** Its own manifest, never fetched with good credentials, so it is never served from the cache. */
  let badImage: { manifestDigest: string }
  let layer: Buffer
  if (dockerRegistryBinary() !== undefined) {
    // A real registry with htpasswd (Basic) auth: the good start the contract describes.
    const reg = await startRealRegistry({ dir: join(dir, 'registry'), auth: 'htpasswd' })
    t.teardown(() => reg.stop())
    layer = bigPackage(32 * 1024)
    image = await reg.push('deckhouse/ce/pkg', [makePackageTarGz({ 'base.txt': 'base\n' }), layer])
    badImage = await reg.push('modules/bad/pkg', [layer])
    address = reg.host
    username = reg.username ?? ''
    password = reg.password ?? ''
  } else {
    t.comment('docker-registry is not installed: using the fake registry (Basic auth) instead')
    username = 'puller'
    password = 's3cret-Fake-Pa55'
    const fake = await FakeRegistry.start({ auth: { kind: 'basic', username, password } })
    t.teardown(() => fake.close())
    layer = bigPackage(32 * 1024)
    image = fake.addImage('deckhouse/ce/pkg', [makePackageTarGz({ 'base.txt': 'base\n' }), layer])
    badImage = fake.addImage('modules/bad/pkg', [layer])
    address = fake.host
  }
  const config = await writeRegistryConfig(dir, {
    default: { address, path: '/deckhouse/ce', scheme: 'http', dockerConfigJson: dockerConfigJson(address, username, password) },
    moduleSources: [
      {
        name: 'bad',
        repo: `${address}/modules/bad`,
        scheme: 'http',
        dockerCfg: Buffer.from(dockerConfigJson(address, username, wrongPassword)).toString('base64'),
      },
    ],
  })
  await mkdir(join(dir, 'cache'), { recursive: true })
  const { proc, url } = await startProxy(t, ['--log-level=debug', `--cache-directory=${join(dir, 'cache')}`, `--registry-config=${config}`])

  const ok = await request(`${url}/package?digest=${image.manifestDigest}&path=pkg`)
  t.equal(ok.status, 200, 'Basic credentials from the docker config: 200')
  t.ok(ok.body.equals(layer), 'byte-exact')
  const refused = await request(`${url}/package?digest=${badImage.manifestDigest}&repository=${encodeURIComponent(`${address}/modules/bad`)}&path=pkg`)
  t.equal(refused.status, 502, 'wrong credentials: 502')
  const missing = await request(`${url}/package?digest=sha256:${'0'.repeat(64)}&path=pkg`)
  t.equal(missing.status, 404, 'no such manifest: 404')
  t.equal((await request(`${url}/metrics`)).status, 200, '/metrics 200')
  proc.child.kill('SIGTERM')
  t.same(await proc.exited, { code: 0, signal: null }, 'exit 0')

  const stdoutLines = proc
    .stdout()
    .split('\n')
    .filter((l) => l !== '')
  t.ok(stdoutLines.length >= 5, `several log lines (${stdoutLines.length})`)
  const notJson = proc.logs().filter((l) => 'unparsed' in l)
  t.same(notJson, [], 'every stdout line is a JSON object')
  t.ok(
    proc.logs().every((l) => typeof l.level === 'number' && typeof l.time === 'number' && typeof l.msg === 'string'),
    'each has level, time, msg',
  )
  t.equal(proc.stderr(), '', 'nothing on stderr')
  const everything = proc.stdout() + proc.stderr() + refused.body.toString('utf8')
  for (const [what, secret] of [
    ['the password', password],
    ['the base64 auth string', basicToken(username, password)],
    ['the wrong password', wrongPassword],
    ['the wrong base64 auth string', basicToken(username, wrongPassword)],
  ] as const) {
    t.notOk(everything.includes(secret), `${what} is printed nowhere`)
  }
  t.notOk(/authorization["']?\s*:\s*["']?(basic|bearer)\s/i.test(everything), 'no Authorization header value is printed')
})

/**
 * The proxy with its stdout on `stdout` (a file descriptor, or a pipe the test never reads);
 * resolves once /healthz answers, with the base URL.
 */
async function startWithStdout(
  t: Test,
  args: string[],
  stdout: number | 'pipe',
): Promise<{ child: ChildProcess; url: string; exited: Promise<number | null> }> {
  const port = await freePort()
  const child = spawn(process.execPath, [MAIN, `--listen-address=127.0.0.1:${port}`, ...args], {
    cwd: t.testdirName,
    env: childEnv(),
    stdio: ['ignore', stdout, 'pipe'],
  })
  // Never read: the pipe fills and stays full.
  child.stdout?.pause()
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)))
  t.teardown(() => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL')
  })
  const url = `http://127.0.0.1:${port}`
  for (let i = 0; ; i++) {
    try {
      if ((await request(`${url}/healthz`)).status === 200) return { child, url, exited }
    } catch (err) {
      if (i >= 100 || child.exitCode !== null) throw err
    }
    await new Promise((r) => setTimeout(r, 100))
  }
}

void t.test('a stdout that cannot be written (/dev/full) or is never read: the proxy serves, and SIGTERM ends it', async (t) => {
  const dir = t.testdir({ full: {}, stalled: {} })
  const registry = await FakeRegistry.start()
  t.teardown(() => registry.close())
  const image = registry.addImage('deckhouse/ce/pkg', [bigPackage(16 * 1024)])
  const config = await writeRegistryConfig(dir, { default: { address: registry.host, path: '/deckhouse/ce', scheme: 'http' } })
  const path = `/package?digest=${image.manifestDigest}&path=pkg`

  // Every log write fails with ENOSPC: found from outside, the process used to start exiting on
  // the error and then hang in its exit's log flush, port open, answering nothing.
  const full = openSync('/dev/full', 'w')
  const a = await startWithStdout(t, [`--cache-directory=${join(dir, 'full')}`, `--registry-config=${config}`, '--log-level=info'], full)
  closeSync(full)
  for (let i = 0; i < 50; i++) t.equal((await request(`${a.url}${path}`)).status, 200, i === 0 ? 'a miss' : `hit ${i}`, { diagnostic: false })
  await new Promise((r) => setTimeout(r, 600)) // past two periodic flushes, each failing
  t.equal((await request(`${a.url}${path}`)).status, 200, 'still serving after the log writes failed')
  a.child.kill('SIGTERM')
  t.equal(await a.exited, 0, 'SIGTERM: exit 0')

  // A log reader that stopped: the pipe fills, hits go on, and SIGTERM's exit waits at most 2 s
  // for the pipe before giving up on the rest (found from outside: it waited for ever).
  const b = await startWithStdout(t, [`--cache-directory=${join(dir, 'stalled')}`, `--registry-config=${config}`, '--log-level=info'], 'pipe')
  for (let i = 0; i < 3000; i += 50) {
    const replies = await Promise.all(Array.from({ length: 50 }, () => request(`${b.url}${path}`)))
    if (!replies.every((r) => r.status === 200)) t.fail(`requests ${i}-${i + 49}: not all 200`)
  }
  t.pass('3000 requests answered with nobody reading the log')
  const stopped = Date.now()
  b.child.kill('SIGTERM')
  t.equal(await b.exited, 0, 'SIGTERM: exit 0')
  t.ok(Date.now() - stopped < 10_000, `exited ${Date.now() - stopped} ms after SIGTERM`)
})

void t.test('request logs are buffered, and none is lost: every request of a burst has its line after SIGTERM', async (t) => {
  const dir = t.testdir({ cache: {} })
  const registry = await FakeRegistry.start()
  t.teardown(() => registry.close())
  const layer = bigPackage(16 * 1024)
  const image = registry.addImage('deckhouse/ce/pkg', [layer])
  const config = await writeRegistryConfig(dir, { default: { address: registry.host, path: '/deckhouse/ce', scheme: 'http' } })
  const { proc, url } = await startProxy(t, [`--cache-directory=${join(dir, 'cache')}`, `--registry-config=${config}`, '--log-level=info'])
  const path = `/package?digest=${image.manifestDigest}&path=pkg`
  const n = 300
  for (let i = 0; i < n; i += 30) {
    const replies = await Promise.all(Array.from({ length: 30 }, () => request(`${url}${path}`)))
    t.ok(
      replies.every((r) => r.status === 200),
      `requests ${i}-${i + 29}: 200`,
    )
  }
  // At once, before the periodic flush: the lines still in the buffer must come out at exit.
  proc.child.kill('SIGTERM')
  t.same(await proc.exited, { code: 0, signal: null }, 'exit 0')
  const lines = proc.logs().filter((l) => l.path === '/package')
  t.equal(lines.length, n, `${n} requests, ${lines.length} request lines`)
  t.ok(
    proc.logs().some((l) => l.msg === 'stopped'),
    'the last line, after them, is there too',
  )
})

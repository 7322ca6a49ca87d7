/**
 * The bootstrap listener (`--bootstrap-listen-address`): `/<cluster UUID>/rpp-get?digest=` and
 * nothing else, over a real socket, against the fake registry.
 */
import { writeFileSync } from 'node:fs'
import { connect } from 'node:net'
import { join } from 'node:path'
import { pino, type Logger } from 'pino'
import t, { type Test } from 'tap'
import { createServer, type ProxyServer } from '../../server.js'
import { FakeRegistry } from '../fixtures/fake-registry.js'
import { layerTarGz, type LayerEntry } from '../fixtures/layers.js'
import { captureLogger } from '../fixtures/log-capture.js'
import { eventually } from '../fixtures/eventually.js'
import { fetchRaw } from '../fixtures/proxy-harness.js'

const UUID = '7f3c2a1e-0b9d-4c5e-8f6a-123456789abc'
const RPP_GET = Buffer.from('#!/bin/sh\necho rpp-get\n')

interface Setup {
  registry: FakeRegistry
  proxy: ProxyServer
  base: string
}

async function setup(t: Test, o: { logger?: Logger; stopDrainMs?: number } = {}): Promise<Setup> {
  const registry = await FakeRegistry.start()
  t.teardown(() => registry.close())
  const dir = t.testdir()
  writeFileSync(join(dir, 'r.json'), JSON.stringify({ default: { address: registry.host, path: '/deckhouse/ce', scheme: 'http' } }))
  const proxy = await createServer({
    port: 0,
    cacheDirectory: join(dir, 'cache'),
    limitBytes: 2 ** 28,
    registryConfig: join(dir, 'r.json'),
    logger: o.logger ?? pino({ level: 'silent' }),
    collectDefaultMetrics: false,
    env: {},
    ...(o.stopDrainMs ? { stopDrainMs: o.stopDrainMs } : {}),
    bootstrap: { host: '127.0.0.1', port: 0, clusterUuid: UUID },
  })
  await proxy.server.start()
  t.teardown(() => proxy.server.stop())
  const address = (proxy.server.plugins as unknown as { bootstrap: { api: { address(): { port: number } | undefined } } }).bootstrap.api.address()
  if (!address) throw new Error('the bootstrap listener is not listening')
  return { registry, proxy, base: `http://127.0.0.1:${address.port}` }
}

async function push(s: Setup, ...layers: LayerEntry[][]): Promise<string> {
  return s.registry.addImage('deckhouse/ce', await Promise.all(layers.map((l) => layerTarGz(l)))).manifestDigest
}

void t.test('GET /<uuid>/rpp-get: the file from the last layer, with its headers; then from memory', async (t) => {
  const s = await setup(t)
  const digest = await push(
    s,
    [{ name: 'rpp-get', data: 'from an older layer' }],
    [
      { name: './rpp-get', data: RPP_GET },
      { name: 'install', data: 'x' },
    ],
  )
  const res = await fetchRaw(`${s.base}/${UUID}/rpp-get?digest=${digest}`)
  t.equal(res.status, 200)
  t.ok(res.body.equals(RPP_GET), 'the file, from the last layer only')
  t.match(res.headers, {
    'content-type': 'application/octet-stream',
    'content-disposition': 'attachment; filename="rpp-get"',
    'cache-control': 'no-store',
    'x-content-type-options': 'nosniff',
    'content-length': String(RPP_GET.length),
  })
  const blobs = s.registry.counts.blob
  t.equal((await fetchRaw(`${s.base}/${UUID}/rpp-get?digest=${digest}`)).status, 200)
  t.equal(s.registry.counts.blob, blobs, 'the second node is served without the registry')
  const metrics = await s.proxy.metrics.registry.metrics()
  t.match(metrics, /registry_packages_proxy_http_requests_total\{route="\/\{uuid\}\/rpp-get",method="get",code="200"\} 2/)
})

void t.test('404 for other paths and UUIDs, 405 for other methods, 400 for a missing or bad digest', async (t) => {
  const s = await setup(t)
  const digest = await push(s, [{ name: 'rpp-get', data: RPP_GET }])
  s.registry.resetCounts()
  const cases: Array<[string, string, number]> = [
    ['GET', `/other-uuid/rpp-get?digest=${digest}`, 404],
    ['GET', `/${UUID}/rpp-get/x?digest=${digest}`, 404],
    ['GET', `/${UUID}/other?digest=${digest}`, 404],
    ['GET', `/package?digest=${digest}`, 404],
    ['GET', '/healthz', 404],
    ['GET', '/metrics', 404],
    ['GET', '/', 404],
    ['POST', `/${UUID}/rpp-get?digest=${digest}`, 405],
    ['HEAD', `/${UUID}/rpp-get?digest=${digest}`, 405],
    ['DELETE', `/${UUID}/rpp-get?digest=${digest}`, 405],
    ['GET', `/${UUID}/rpp-get`, 400],
    ['GET', `/${UUID}/rpp-get?digest=sha256:abc`, 400],
    ['GET', `/${UUID}/rpp-get?digest=${digest}&digest=${digest}`, 400],
  ]
  for (const [method, path, status] of cases) {
    const res = await fetchRaw(`${s.base}${path}`, { method })
    t.equal(res.status, status, `${method} ${path}`)
    if (method !== 'HEAD') t.match(JSON.parse(res.body.toString()), { statusCode: status }, 'a JSON error body')
  }
  t.equal(s.registry.counts.total, 0, 'none of them reached the registry')
})

void t.test('404 when the layer has no regular rpp-get, or one over 64 MiB, or no such manifest; 502 when the registry fails', async (t) => {
  const s = await setup(t)
  const none = await push(s, [{ name: 'install', data: 'x' }])
  const link = await push(s, [{ name: 'rpp-get', type: 'symlink', linkname: '/bin/sh' }])
  const big = await push(s, [{ name: 'rpp-get', data: Buffer.alloc(64 * 1024 * 1024 + 1) }])
  for (const [what, digest] of [
    ['none', none],
    ['a symlink', link],
    ['over 64 MiB', big],
    ['no such manifest', `sha256:${'1'.repeat(64)}`],
  ] as const) {
    t.equal((await fetchRaw(`${s.base}/${UUID}/rpp-get?digest=${digest}`)).status, 404, what)
  }
  const ok = await push(s, [{ name: 'rpp-get', data: 'new' }])
  s.registry.faults = { blobStatus: 500 }
  t.equal((await fetchRaw(`${s.base}/${UUID}/rpp-get?digest=${ok}`)).status, 502)
  s.registry.faults = { corruptBlob: true }
  t.equal((await fetchRaw(`${s.base}/${UUID}/rpp-get?digest=${ok}`)).status, 502, 'a layer that does not verify yields no file')
})

void t.test('request heads are limited: 4 KiB, and 5 s to send them', async (t) => {
  const s = await setup(t)
  const big = await fetchRaw(`${s.base}/${UUID}/rpp-get?digest=x`, { headers: { 'x-filler': 'a'.repeat(5000) } })
  t.equal(big.status, 431, 'headers over 4 KiB')
  const port = Number(new URL(s.base).port)
  const socket = connect(port, '127.0.0.1')
  socket.write(`GET /${UUID}/rpp-get HTTP/1.1\r\nHost: x\r\n`)
  const started = Date.now()
  const reply = await new Promise<string>((resolve) => {
    let text = ''
    socket.on('data', (c: Buffer) => (text += c.toString()))
    socket.on('close', () => resolve(text))
  })
  const waited = Date.now() - started
  t.match(reply, /^HTTP\/1.1 408/, 'a head never finished is answered 408 and closed')
  t.ok(waited >= 4000 && waited < 9000, `closed after the 5 s headers timeout (${waited} ms)`)
})

void t.test('a stop refuses new rpp-get connections at once, cuts a node that stopped reading at the budget, and logs it 499, not a whole 200', async (t) => {
  // Found from outside: the line said 200 with every byte as soon as the answer was queued,
  // and the stop waited for a stalled node up to its 300 s timeout.
  const log = captureLogger('info')
  const s = await setup(t, { logger: log.logger, stopDrainMs: 300 })
  const big = Buffer.alloc(8 * 1024 * 1024, 'r') // far more than the socket buffers hold
  const digest = await push(s, [{ name: 'rpp-get', data: big }])
  const port = Number(new URL(s.base).port)
  t.equal((await fetchRaw(`${s.base}/${UUID}/rpp-get?digest=${digest}`)).status, 200)
  const socket = connect(port, '127.0.0.1')
  socket.on('error', () => undefined)
  await new Promise((r) => socket.once('connect', r))
  socket.write(`GET /${UUID}/rpp-get?digest=${digest} HTTP/1.1\r\nHost: x\r\n\r\n`)
  await new Promise((r) => socket.once('data', r))
  socket.pause()
  await new Promise((r) => setTimeout(r, 200))
  let stopped = false
  const stopping = s.proxy.server.stop().then(() => (stopped = true))
  await new Promise((r) => setTimeout(r, 20)) // the stop's first hooks run
  // A fresh connection (an HTTP client might reuse its idle one, which the stop ends).
  const refused = await new Promise<boolean>((resolve) => {
    const probe = connect(port, '127.0.0.1', () => {
      probe.destroy()
      resolve(false)
    })
    probe.once('error', (err: NodeJS.ErrnoException) => resolve(err.code === 'ECONNREFUSED'))
  })
  t.ok(refused, 'a new connection is refused at once')
  t.notOk(stopped, 'the stop waits while its budget lasts')
  await stopping
  await eventually(() => log.lines().filter((l) => l.listener === 'bootstrap').length === 2, 'the cut answer has its line')
  const [whole, cut] = log.lines().filter((l) => l.listener === 'bootstrap')
  t.match(whole, { status: 200, bytes: big.length, level: 30 }, 'the whole answer: 200 with its bytes')
  t.match(cut, { status: 499, aborted: true, level: 40 }, 'the cut one: 499, aborted, at warn')
  t.equal(cut?.bytes, undefined, 'no byte count claimed')
  socket.destroy()
})

void t.test("an error answer's line counts the bytes of its body, once it is sent", async (t) => {
  // Seen in a review: error lines said `bytes: 0` for bodies of about 100 bytes.
  const log = captureLogger('info')
  const s = await setup(t, { logger: log.logger })
  const lines = () => log.lines().filter((l) => l.listener === 'bootstrap')
  const answers = [
    await fetchRaw(`${s.base}/${UUID}/rpp-get?digest=sha256:${'0'.repeat(64)}`), // no such manifest: 404
    await fetchRaw(`${s.base}/${UUID}/rpp-get`), // no digest: 400
    await fetchRaw(`${s.base}/${UUID}/rpp-get?digest=sha256:${'0'.repeat(64)}`, { method: 'HEAD' }),
  ]
  await eventually(() => lines().length === 3, 'three lines')
  for (const [i, line] of lines().entries()) {
    const answer = answers[i]
    t.equal(line.status, answer?.status, `line ${i}: the status sent`)
    const sent = answer?.body.length ?? -1
    t.equal(line.bytes, sent, `line ${i}: ${sent} bytes, the body the client got`)
  }
  t.ok((answers[0]?.body.length ?? 0) > 0, 'the 404 has a body')
})

void t.test('a request that says Expect: 100-continue is answered, and logged', async (t) => {
  // Found from outside: the stop's bookkeeping listened for 'checkContinue', so Node stopped
  // answering 100 Continue itself and never emitted 'request', which is all this listener
  // handles: such a request hung until its socket timed out, with no line.
  const log = captureLogger('info')
  const s = await setup(t, { logger: log.logger })
  const digest = await push(s, [{ name: 'rpp-get', data: RPP_GET }])
  const port = Number(new URL(s.base).port)
  const socket = connect(port, '127.0.0.1')
  socket.on('error', () => undefined)
  t.teardown(() => socket.destroy())
  let text = ''
  socket.on('data', (d: Buffer) => (text += d.toString('latin1')))
  await new Promise((r) => socket.once('connect', r))
  socket.write(`GET /${UUID}/rpp-get?digest=${digest} HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\r\n`)
  await eventually(() => text.includes('echo rpp-get'), 'the file arrives', { timeoutMs: 5000 })
  t.match(text, /^HTTP\/1\.1 100 Continue\r\n\r\nHTTP\/1\.1 200 /, '100 Continue, then the 200')
  await eventually(() => log.lines().some((l) => l.listener === 'bootstrap' && l.status === 200), 'its line')
})

void t.test('a request Node cannot parse is answered as Node would, and has its line', async (t) => {
  // Found from outside: Node answered these (431, 400) itself, and no line was written.
  const log = captureLogger('info')
  const s = await setup(t, { logger: log.logger })
  const port = Number(new URL(s.base).port)
  const send = (text: string): Promise<string> =>
    new Promise((resolve) => {
      const socket = connect(port, '127.0.0.1')
      let got = ''
      socket.on('data', (d: Buffer) => (got += d.toString('latin1')))
      socket.on('error', () => undefined)
      socket.on('close', () => resolve(got))
      socket.write(text)
    })
  const big = await send(`GET /${UUID}/rpp-get HTTP/1.1\r\nHost: x\r\nX-Big: ${'a'.repeat(5000)}\r\n\r\n`)
  t.match(big, /^HTTP\/1\.1 431 /, 'a head over 4 KiB: 431')
  const bad = await send(`GET /${UUID}/rpp-get HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n`)
  t.match(bad, /^HTTP\/1\.1 400 /, 'a malformed header: 400')
  await eventually(() => log.lines().filter((l) => l.listener === 'bootstrap').length === 2, 'two lines')
  const [a, b] = log.lines().filter((l) => l.listener === 'bootstrap')
  t.match(a, { status: 431, bytes: 0, result: 'error', err: { code: 'HPE_HEADER_OVERFLOW' } })
  t.match(b, { status: 400, bytes: 0, result: 'error', err: { code: /^HPE_/ } })
  t.notOk(JSON.stringify([a, b]).includes('aaaa'), 'nothing of what the client sent')
})

void t.test('a node that half-closes and then resets mid-download is logged 499, not a whole 200', async (t) => {
  // Found from outside: Node emitted 'finish' from the failed write's callback before it
  // destroyed the socket, so the cut answer was logged 200 with every byte.
  const log = captureLogger('info')
  const s = await setup(t, { logger: log.logger })
  const big = Buffer.alloc(24 * 1024 * 1024, 'h') // far more than the socket buffers hold
  const digest = await push(s, [{ name: 'rpp-get', data: big }])
  t.equal((await fetchRaw(`${s.base}/${UUID}/rpp-get?digest=${digest}`)).status, 200, 'extracted and kept')
  const socket = connect(Number(new URL(s.base).port), '127.0.0.1')
  socket.on('error', () => undefined)
  await new Promise((r) => socket.once('connect', r))
  socket.write(`GET /${UUID}/rpp-get?digest=${digest} HTTP/1.1\r\nHost: x\r\n\r\n`)
  socket.end()
  await new Promise((r) => socket.once('data', r))
  socket.pause()
  await new Promise((r) => setTimeout(r, 200))
  socket.resetAndDestroy()
  await eventually(() => log.lines().filter((l) => l.listener === 'bootstrap').length === 2, 'the cut answer has its line')
  const cut = log.lines().filter((l) => l.listener === 'bootstrap')[1]
  t.match(cut, { status: 499, aborted: true, level: 40 }, '499, aborted, at warn')
  t.equal(cut?.bytes, undefined, 'no byte count claimed')
})

void t.test('an absolute-form request is served and labelled with its route', async (t) => {
  // Found from outside: `GET http://host/<uuid>/rpp-get?…` was served, but its line and metric
  // said the catch-all route.
  const log = captureLogger('info')
  const s = await setup(t, { logger: log.logger })
  const digest = await push(s, [{ name: 'rpp-get', data: RPP_GET }])
  const socket = connect(Number(new URL(s.base).port), '127.0.0.1')
  socket.on('error', () => undefined)
  t.teardown(() => socket.destroy())
  let text = ''
  socket.on('data', (d: Buffer) => (text += d.toString('latin1')))
  await new Promise((r) => socket.once('connect', r))
  socket.write(`GET http://nodes.example/${UUID}/rpp-get?digest=${digest} HTTP/1.1\r\nHost: nodes.example\r\n\r\n`)
  await eventually(() => text.includes('echo rpp-get'), 'the file arrives')
  t.match(text, /^HTTP\/1\.1 200 /)
  await eventually(() => log.lines().some((l) => l.listener === 'bootstrap'), 'its line')
  t.match(
    log.lines().find((l) => l.listener === 'bootstrap'),
    { status: 200, route: '/{uuid}/rpp-get' },
    'the rpp-get route',
  )
})

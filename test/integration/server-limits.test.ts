/**
 * Slow, stuck and flooding clients degrade service, they do not take it down: crowds of them
 * while real traffic goes on, the keep-alive idle limit, a client that stops reading mid-body
 * (the fill and the other clients go on, memory stays flat, the connection is closed after the
 * idle timeout and its cache pin released), and the bounds on concurrent layer downloads and
 * manifest lookups (503 + Retry-After beyond their queues); and, at the end, a single slowloris
 * client (408) and oversized request lines and headers (431).
 */
import { createHash } from 'node:crypto'
import { existsSync } from 'node:fs'
import { request } from 'node:http'
import { connect, type Socket } from 'node:net'
import { setFlagsFromString } from 'node:v8'
import { runInNewContext } from 'node:vm'
import t from 'tap'
import { BlobStore } from '../../plugins/packages/cache/blob-store.js'
import { DEFAULT_PREFIX, bytes, cacheTokenHeader, packageUrl, startHarness } from '../fixtures/proxy-harness.js'
import { fdCount, fetchRaw, startProxy } from '../fixtures/listening-proxy.js'
import { eventually } from '../fixtures/eventually.js'

const SLACK_MS = 4000

/** A real GC, so memory readings are about what is held, not what is garbage yet. */
setFlagsFromString('--expose-gc')
const gc = runInNewContext('gc') as () => void

function external(): number {
  gc()
  gc()
  return process.memoryUsage().arrayBuffers
}

/** GET that hashes the body as it arrives (a 24 MiB layer is never held in the test's memory). */
function fetchHashed(url: string): Promise<{ status: number; digest: string; bytes: number; complete: boolean }> {
  return new Promise((resolve) => {
    const req = request(url, { agent: false }, (res) => {
      const hash = createHash('sha256')
      let n = 0
      res.on('data', (c: Buffer) => {
        hash.update(c)
        n += c.length
      })
      res.on('error', () => undefined)
      res.on('close', () => resolve({ status: res.statusCode ?? 0, digest: `sha256:${hash.digest('hex')}`, bytes: n, complete: res.complete }))
    })
    req.on('error', () => resolve({ status: 0, digest: '', bytes: 0, complete: false }))
    req.end()
  })
}

/** A raw connection that sends `head` (if any) and never reads; resolves `closed` when the server ends it. */
function stuckClient(port: number, head?: string): { socket: Socket; closed: Promise<{ ms: number; text: string }> } {
  const started = Date.now()
  const socket = connect(port, '127.0.0.1', () => {
    if (head !== undefined) socket.write(head)
  })
  let text = ''
  socket.on('data', (d: Buffer) => {
    if (text.length < 200) text += d.toString('latin1')
  })
  socket.on('error', () => undefined)
  const closed = new Promise<{ ms: number; text: string }>((resolve) => socket.on('close', () => resolve({ ms: Date.now() - started, text })))
  return { socket, closed }
}

void t.test('crowds of silent, dripping and idle keep-alive connections are cut while real requests go on', async (t) => {
  const headersTimeoutMs = 1000
  const p = await startProxy(t, { headersTimeoutMs })
  const image = p.registry.addImage(DEFAULT_PREFIX, [bytes(20_000, 3)])
  await p.proxy.server.start()
  const port = Number(p.proxy.server.info.port)
  const url = `${p.proxy.server.info.uri}${packageUrl({ digest: image.manifestDigest })}`
  t.equal((await fetchRaw(url)).status, 200, 'warm')
  const fdsBefore = fdCount()

  const crowd = 150
  // Silent: connect and send nothing. Dripping: a header line every 200 ms, never the end.
  const silent = Array.from({ length: crowd }, () => stuckClient(port))
  const dripping = Array.from({ length: crowd }, () => stuckClient(port, 'GET /healthz HTTP/1.1\r\nHost: x\r\n'))
  const drips = setInterval(() => {
    for (const d of dripping) if (d.socket.writable) d.socket.write('X-Drip: 1\r\n')
  }, 200)
  t.teardown(() => clearInterval(drips))
  // Idle keep-alive: one complete request, then nothing.
  const idle = Array.from({ length: 50 }, () => stuckClient(port, 'GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n'))

  // Meanwhile, real clients are served, byte-exact and promptly.
  const served: number[] = []
  let wrong = 0
  const until = Date.now() + headersTimeoutMs + 500
  while (Date.now() < until) {
    const started = Date.now()
    const r = await fetchRaw(url)
    if (!(r.status === 200 && r.body.equals(image.lastLayer.data))) wrong++
    served.push(Date.now() - started)
  }
  t.equal(wrong, 0, 'every real request during the flood was served byte-exact')
  t.ok(served.length >= 3, `${served.length} requests served during the flood (slowest ${Math.max(...served)} ms)`)
  t.ok(Math.max(...served) < 2000, 'none waited behind the crowd')

  const cut = await Promise.all([...silent, ...dripping].map((c) => c.closed))
  clearInterval(drips)
  for (const c of cut) {
    if (!(c.ms < headersTimeoutMs + SLACK_MS && /^HTTP\/1\.1 408 /.test(c.text))) {
      t.fail(`a slow client was cut after ${c.ms} ms with ${JSON.stringify(c.text.slice(0, 30))}`)
      return
    }
  }
  t.pass(`${cut.length} slow clients were cut with 408 within ${Math.max(...cut.map((c) => c.ms))} ms`)
  // keepAliveTimeout is 5 s; connections are checked every second.
  const idled = await Promise.all(idle.map((c) => c.closed))
  t.ok(
    idled.every((c) => /^HTTP\/1\.1 200 /.test(c.text) && c.ms < 5000 + SLACK_MS),
    `idle keep-alive connections closed after at most ${Math.max(...idled.map((c) => c.ms))} ms`,
  )
  await eventually(() => fdCount() <= fdsBefore + 2, `descriptors back to ${fdsBefore} (now ${fdCount()})`, { timeoutMs: 5000 })
  t.pass('descriptors back to where they were')
})

void t.test('a client that stops reading mid-body holds no one hostage, keeps memory flat, and is cut after the idle timeout', async (t) => {
  const socketIdleTimeoutMs = 1500
  const p = await startProxy(t, { socketIdleTimeoutMs })
  // Bigger than the memory cache's largest entry, so hits stream from the file.
  const data = bytes(24 * 1024 * 1024, 9)
  const image = p.registry.addImage(DEFAULT_PREFIX, [data])
  const layerDigest = image.lastLayer.digest
  p.registry.faults = { blobChunkSize: 256 * 1024, blobChunkDelayMs: 2 }
  await p.proxy.server.start()
  const port = Number(p.proxy.server.info.port)
  const path = packageUrl({ digest: image.manifestDigest })
  const url = `${p.proxy.server.info.uri}${path}`
  const head = `GET ${path} HTTP/1.1\r\nHost: x\r\n\r\n`
  // The server's side of each connection: when its idle timeout fired, and whether it closed.
  // Watched per connection, since hits are answered before hapi routes them (the fast path).
  const timedOut: number[] = []
  p.proxy.server.listener.on('connection', (socket: Socket) => {
    const accepted = Date.now()
    socket.once('timeout', () => socket.once('close', () => timedOut.push(Date.now() - accepted)))
  })

  // 1. A stuck client starts the fill (it is the miss); a reading client joins it.
  const first = stuckClient(port, head)
  first.socket.pause()
  await p.registry.waitForRequests(1, (r) => r.url.includes('/blobs/'))
  const joined = await fetchHashed(url)
  t.equal(joined.status, 200)
  t.ok(joined.complete && joined.digest === layerDigest, 'the reading client got every byte while the first one read none')
  await eventually(() => p.proxy.packages.index?.blob(layerDigest) !== undefined, 'the fill committed')
  t.pass('the fill committed while its first client was stuck')

  // 2. A stuck client on a hit: the others are served, memory does not hold its layer.
  const before = external()
  const stuck = stuckClient(port, head)
  stuck.socket.pause()
  // One at a time: the stuck reader and one more are no herd, so the layer stays on disk and
  // nothing but a read buffer may be held for the stuck one.
  const hits = []
  for (let i = 0; i < 3; i++) hits.push(await fetchHashed(url))
  t.ok(
    hits.every((h) => h.status === 200 && h.complete && h.digest === layerDigest),
    'hits are served byte-exact beside the stuck reader',
  )
  t.equal(p.proxy.packages.service.memoryBytes.live, 0, 'not loaded into memory')
  const held = external() - before
  t.ok(held < 8 * 1024 * 1024, `buffers held for the stuck reader: ${(held / 1048576).toFixed(1)} MiB (the layer is 24 MiB)`)

  // 3. While it is stuck, its file is pinned: a DELETE is deferred, not done under its reader.
  const store = new BlobStore(p.cacheDirectory)
  t.equal((await p.proxy.server.inject({ method: 'DELETE', url: `/cache/${layerDigest}`, headers: cacheTokenHeader(p.cacheDirectory) })).statusCode, 200)
  t.ok(existsSync(store.pathFor(layerDigest)), 'the file stays while a reader has it open')

  // 4. Nothing moves on the stuck connections: the server closes them after the idle timeout,
  //    which releases the pin and lets the deferred removal happen. (The paused clients cannot
  //    see the close; the server's sockets can.)
  await eventually(() => timedOut.length >= 2, 'both stuck connections were closed by the server', { timeoutMs: socketIdleTimeoutMs + 20_000 })
  for (const ms of timedOut) t.ok(ms >= socketIdleTimeoutMs - 50, `a stuck reader was disconnected ${ms} ms after its request`)
  first.socket.destroy()
  stuck.socket.destroy()
  await eventually(() => !existsSync(store.pathFor(layerDigest)), 'the deferred removal happened', { timeoutMs: 5000 })
  t.pass('the pin was released and the file removed')
  t.equal(p.proxy.packages.service.downloads.running, 0)
})

void t.test('the bound on concurrent layer downloads: a flood of cold requests gets 503 + Retry-After beyond the queue, hits go on', async (t) => {
  const p = await startProxy(t, { downloads: { max: 2, maxQueued: 3, queueTimeoutMs: 20_000, retryAfterSeconds: 5 } })
  const hot = p.registry.addImage(DEFAULT_PREFIX, [bytes(5000, 50)])
  const cold = Array.from({ length: 10 }, (_, i) => p.registry.addImage(DEFAULT_PREFIX, [bytes(96 * 1024, 60 + i)]))
  t.equal((await p.proxy.server.inject(packageUrl({ digest: hot.manifestDigest }))).statusCode, 200, 'one package is cached')
  await eventually(() => p.proxy.packages.index?.manifest(hot.manifestDigest) !== undefined, 'cached')
  p.registry.resetCounts()
  // Slow enough that the flood is all in flight at once: ~0.6 s per layer.
  p.registry.faults = { blobChunkSize: 8192, blobChunkDelayMs: 50 }

  let maxRunning = 0
  let maxQueued = 0
  const sampler = setInterval(() => {
    const d = p.proxy.packages.service.downloads
    maxRunning = Math.max(maxRunning, d.running)
    maxQueued = Math.max(maxQueued, d.queued)
  }, 5)
  t.teardown(() => clearInterval(sampler))
  const flood = cold.map((img) => p.proxy.server.inject(packageUrl({ digest: img.manifestDigest })))
  // Hits need no download slot: they are answered while the flood waits.
  await eventually(() => p.proxy.packages.service.downloads.queued === 3, 'the queue is full')
  const gauge = await p.proxy.metrics.registry.getSingleMetricAsString('registry_packages_proxy_downloads')
  t.match(gauge, /^registry_packages_proxy_downloads\{kind="layer",state="running"\} 2$/m, 'the gauge shows 2 running')
  t.match(gauge, /^registry_packages_proxy_downloads\{kind="layer",state="queued"\} 3$/m, 'and 3 queued')
  const started = Date.now()
  const hit = await p.proxy.server.inject(packageUrl({ digest: hot.manifestDigest }))
  t.equal(hit.statusCode, 200, 'a hit during the flood')
  t.ok(Date.now() - started < 1000, `answered in ${Date.now() - started} ms`)
  const replies = await Promise.all(flood)
  clearInterval(sampler)

  const ok = replies.filter((r) => r.statusCode === 200)
  const busy = replies.filter((r) => r.statusCode === 503)
  t.equal(ok.length, 5, '2 running + 3 queued were served')
  t.equal(busy.length, 5, 'the rest were refused at once')
  for (const [i, r] of replies.entries()) {
    if (r.statusCode === 200) t.ok(r.rawPayload.equals(cold[i]?.lastLayer.data ?? Buffer.alloc(0)), `package ${i} byte-exact`)
  }
  for (const r of busy) {
    t.equal(r.headers['retry-after'], '5', 'Retry-After')
    t.match(JSON.parse(r.payload), { statusCode: 503, error: 'Service Unavailable', message: /retry later/ })
  }
  t.ok(maxRunning <= 2, `at most 2 downloads ran at once (${maxRunning})`)
  t.ok(maxQueued <= 3, `at most 3 waited (${maxQueued})`)
  t.equal(p.registry.counts.blob, 5, 'a refused request made no blob request')

  // Later, the refused ones succeed: a 503 is a "come back", not a failure that sticks.
  p.registry.faults = {}
  await eventually(() => p.proxy.packages.service.downloads.running === 0, 'the flood is over')
  const refused = cold.filter((_, i) => replies[i]?.statusCode === 503)
  const retried = await Promise.all(refused.map((img) => p.proxy.server.inject(packageUrl({ digest: img.manifestDigest }))))
  t.same(
    retried.map((r) => r.statusCode),
    [200, 200, 200, 200, 200],
    'served on retry',
  )
  await eventually(() => p.proxy.packages.service.downloads.running === 0, 'every slot is free again')
  const metrics = await p.proxy.metrics.registry.getSingleMetricAsString('registry_packages_proxy_http_requests_total')
  t.match(metrics, /^registry_packages_proxy_http_requests_total\{[^}]*code="503"[^}]*\} 5$/m, 'the refusals are counted')
  const refusedTotal = await p.proxy.metrics.registry.getSingleMetricAsString('registry_packages_proxy_downloads_refused_total')
  t.match(refusedTotal, /^registry_packages_proxy_downloads_refused_total\{kind="layer"\} 5$/m, 'as refused layer downloads')
})

void t.test('the bound on manifest lookups: a flood of unknown digests costs a bounded number of registry requests, then 503', async (t) => {
  const p = await startProxy(t, { lookups: { max: 2, maxQueued: 3, queueTimeoutMs: 20_000, retryAfterSeconds: 5 } })
  const hot = p.registry.addImage(DEFAULT_PREFIX, [bytes(5000, 70)])
  t.equal((await p.proxy.server.inject(packageUrl({ digest: hot.manifestDigest }))).statusCode, 200, 'one package is cached')
  await eventually(() => p.proxy.packages.index?.manifest(hot.manifestDigest) !== undefined, 'cached')
  p.registry.resetCounts()
  // Digests the registry does not have, answered slowly: each lookup holds its slot ~300 ms.
  p.registry.faults = { manifestDelayMs: 300 }
  const unknown = Array.from({ length: 10 }, (_, i) => `sha256:${createHash('sha256').update(`missing ${i}`).digest('hex')}`)
  const flood = unknown.map((digest) => p.proxy.server.inject(packageUrl({ digest })))
  // The same unknown digest asked again while its lookup runs joins it: no second slot.
  const again = p.proxy.server.inject(packageUrl({ digest: unknown[0] ?? '' }))
  await eventually(() => p.proxy.packages.service.lookups.queued === 3, 'the lookup queue is full')
  const gauge = await p.proxy.metrics.registry.getSingleMetricAsString('registry_packages_proxy_downloads')
  t.match(gauge, /^registry_packages_proxy_downloads\{kind="manifest",state="running"\} 2$/m, 'the gauge shows 2 lookups running')
  const hit = await p.proxy.server.inject(packageUrl({ digest: hot.manifestDigest }))
  t.equal(hit.statusCode, 200, 'a hit needs no lookup slot')
  const replies = await Promise.all(flood)
  t.same(replies.map((r) => r.statusCode).sort(), [404, 404, 404, 404, 404, 503, 503, 503, 503, 503], '2 running + 3 queued answered, the rest refused at once')
  t.equal((await again).statusCode, 404, 'the repeated digest shared the first lookup')
  for (const r of replies.filter((r) => r.statusCode === 503)) {
    t.equal(r.headers['retry-after'], '5', 'Retry-After')
    t.match(JSON.parse(r.payload), { message: /manifest lookups are running/ })
  }
  t.equal(p.registry.counts.manifest, 5, 'a refused request made no registry request')
  const refused = await p.proxy.metrics.registry.getSingleMetricAsString('registry_packages_proxy_downloads_refused_total')
  t.match(refused, /^registry_packages_proxy_downloads_refused_total\{kind="manifest"\} 5$/m, 'counted as refused lookups')
  t.same(p.proxy.packages.service.lookups, { running: 0, queued: 0 }, 'every slot is free again')
})

void t.test('download slots: coalesced clients share one, and the queue wait is bounded', async (t) => {
  const p = await startProxy(t, { downloads: { max: 1, maxQueued: 1, queueTimeoutMs: 400 } })
  const [a, b] = [bytes(64 * 1024, 80), bytes(64 * 1024, 81)].map((d) => p.registry.addImage(DEFAULT_PREFIX, [d]))
  if (!a || !b) throw new Error('unreachable')
  p.registry.faults = { blobChunkSize: 8192, blobChunkDelayMs: 150 }
  // 20 clients of one cold layer: one fill, one slot, all served.
  const same = await Promise.all(Array.from({ length: 20 }, () => p.proxy.server.inject(packageUrl({ digest: a.manifestDigest }))))
  t.ok(
    same.every((r) => r.statusCode === 200 && r.rawPayload.equals(a.lastLayer.data)),
    '20 coalesced clients, all 200',
  )
  t.equal(p.registry.counts.blob, 1, 'one download')
  await eventually(() => p.proxy.packages.service.downloads.running === 0, 'the fill returned its slot')

  // A second layer while the slot is busy longer than the queue wait: 503 after ~400 ms.
  const slow = p.proxy.server.inject(packageUrl({ digest: b.manifestDigest }))
  await eventually(() => p.proxy.packages.service.downloads.running === 1 && p.proxy.packages.service.downloads.queued === 0, 'b is downloading')
  const c = p.registry.addImage(DEFAULT_PREFIX, [bytes(1000, 82)])
  const started = Date.now()
  const waited = await p.proxy.server.inject(packageUrl({ digest: c.manifestDigest }))
  t.equal(waited.statusCode, 503, 'no slot came free within the queue timeout')
  t.ok(Date.now() - started >= 350, `after waiting ${Date.now() - started} ms`)
  t.match(waited.payload, /no download slot became free within 400 ms/)
  t.equal((await slow).statusCode, 200, 'the running download was not disturbed')
})

void t.test('download slots: with the cache off every layer is an uncached download, and each holds a slot while it streams', async (t) => {
  const q = await startProxy(t, { disableCache: true, downloads: { max: 1, maxQueued: 0 } })
  const d = q.registry.addImage(`${DEFAULT_PREFIX}/d`, [bytes(64 * 1024, 83)])
  const e = q.registry.addImage(`${DEFAULT_PREFIX}/e`, [bytes(64 * 1024, 84)])
  q.registry.faults = { blobChunkSize: 8192, blobChunkDelayMs: 50 }
  const both = await Promise.all([
    q.proxy.server.inject(packageUrl({ digest: d.manifestDigest, path: 'd' })),
    q.proxy.server.inject(packageUrl({ digest: e.manifestDigest, path: 'e' })),
  ])
  t.same(both.map((r) => r.statusCode).sort(), [200, 503], 'one streams, the other is refused')
  await eventually(() => q.proxy.packages.service.downloads.running === 0, 'the pass-through returned its slot')
  t.equal((await q.proxy.server.inject(packageUrl({ digest: d.manifestDigest, path: 'd' }))).statusCode, 200, 'and the next one is served')
})

void t.test('a stuck reader of a memory hit (answered before hapi routes it) is cut after the idle timeout too', async (t) => {
  const socketIdleTimeoutMs = 1000
  const p = await startProxy(t, { socketIdleTimeoutMs })
  // Small enough for the memory cache, big enough not to fit the socket buffers.
  const image = p.registry.addImage(DEFAULT_PREFIX, [bytes(6 * 1024 * 1024, 12)])
  await p.proxy.server.start()
  const port = Number(p.proxy.server.info.port)
  const path = packageUrl({ digest: image.manifestDigest })
  t.equal((await fetchHashed(`${p.proxy.server.info.uri}${path}`)).digest, image.lastLayer.digest, 'a miss')
  await eventually(() => p.proxy.packages.index?.manifest(image.manifestDigest) !== undefined, 'cached')
  t.equal((await fetchHashed(`${p.proxy.server.info.uri}${path}`)).digest, image.lastLayer.digest, 'a hit from the file, which loads it into memory')
  const held = p.proxy.packages.service.cachedHit(image.manifestDigest)
  t.ok(held && 'buffer' in held, 'held in memory: the next GET takes the fast path')
  if (held && 'buffer' in held) held.release()
  const connections = (): Promise<number> =>
    new Promise((resolve, reject) => p.proxy.server.listener.getConnections((err, n) => (err ? reject(err) : resolve(n))))
  const started = Date.now()
  const stuck = stuckClient(port, `GET ${path} HTTP/1.1\r\nHost: x\r\n\r\n`)
  stuck.socket.pause()
  await eventually(async () => (await connections()) === 1, 'the stuck connection is open')
  await eventually(async () => (await connections()) === 0, 'the server closed it', { timeoutMs: socketIdleTimeoutMs + 15_000 })
  const ms = Date.now() - started
  t.ok(ms >= socketIdleTimeoutMs - 50, `the server closed the stuck connection after ${ms} ms`)
  stuck.socket.destroy()
})

// A single client over the limits of the request head.

async function listening(t: Parameters<typeof startHarness>[0], headersTimeoutMs?: number) {
  const h = await startHarness(t, headersTimeoutMs ? { headersTimeoutMs } : {})
  await h.proxy.server.start()
  return { h, port: Number(h.proxy.server.info.port) }
}

function rawExchange(port: number, write: (s: ReturnType<typeof connect>) => void): Promise<{ text: string; closedAfterMs: number }> {
  const started = Date.now()
  return new Promise((resolve, reject) => {
    const socket = connect(port, '127.0.0.1', () => write(socket))
    let text = ''
    socket.on('data', (d: Buffer) => (text += d.toString('latin1')))
    socket.on('close', () => resolve({ text, closedAfterMs: Date.now() - started }))
    socket.on('error', (err: NodeJS.ErrnoException) => (err.code === 'ECONNRESET' ? undefined : reject(err)))
  })
}

void t.test('a slowloris client that never finishes its headers is cut off', async (t) => {
  const { h, port } = await listening(t, 500)
  const res = await rawExchange(port, (s) => {
    s.write('GET /healthz HTTP/1.1\r\nHost: x\r\n')
    const drip = setInterval(() => s.writable && s.write('X-Drip: 1\r\n'), 100)
    s.on('close', () => clearInterval(drip))
  })
  t.ok(res.closedAfterMs < 5_000, `closed after ${res.closedAfterMs} ms`)
  t.match(res.text, /^HTTP\/1\.1 408/, 'told why')
  t.equal((await h.proxy.server.inject('/healthz')).statusCode, 200, 'the server still serves')
})

void t.test('oversized request lines and headers get 431, not a crash', async (t) => {
  const { h, port } = await listening(t)
  const longUrl = await rawExchange(port, (s) => s.end(`GET /package?digest=${'a'.repeat(20_000)} HTTP/1.1\r\nHost: x\r\n\r\n`))
  t.match(longUrl.text, /^HTTP\/1\.1 431/)
  const bigHeader = await rawExchange(port, (s) => s.end(`GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ${'b'.repeat(20_000)}\r\n\r\n`))
  t.match(bigHeader.text, /^HTTP\/1\.1 431/)
  t.equal((await h.proxy.server.inject('/healthz')).statusCode, 200)
})

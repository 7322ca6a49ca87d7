import { closeSync, existsSync, openSync, statSync, utimesSync, writeSync } from 'node:fs'
import { connect } from 'node:net'
import t from 'tap'
import { BlobStore } from '../../plugins/packages/cache/blob-store.js'
import { eventually } from '../fixtures/eventually.js'
import { captureLogger } from '../fixtures/log-capture.js'
import { DEFAULT_PREFIX, bytes, cacheTokenHeader, fetchRaw, packageUrl, startHarness } from '../fixtures/proxy-harness.js'

async function cachedServer(t: Parameters<typeof startHarness>[0], fastPath: boolean, size = 20_000) {
  const h = await startHarness(t, { fastPath })
  const data = bytes(size, 51)
  const image = h.registry.addImage(`${DEFAULT_PREFIX}/fast`, [data])
  await h.proxy.server.start()
  const base = h.proxy.server.info.uri
  const url = `${base}${packageUrl({ digest: image.manifestDigest, path: 'fast' })}`
  // A miss, then a disk hit that loads the memory copy: the next hit is a memory hit.
  await fetchRaw(url)
  await h.proxy.packages.service.settled()
  await fetchRaw(url)
  return { h, data, image, base, url }
}

void t.test('a memory hit answered before hapi is the same response hapi gives', async (t) => {
  const fast = await cachedServer(t, true)
  const slow = await cachedServer(t, false)
  const a = await fetchRaw(fast.url)
  const b = await fetchRaw(slow.url)
  t.equal(a.status, 200)
  t.ok(a.complete && a.body.equals(fast.data), 'byte-exact')
  t.ok(b.body.equals(a.body), 'same bytes both ways')
  const strip = (hd: Record<string, unknown>) => Object.fromEntries(Object.entries(hd).filter(([k]) => k !== 'date'))
  t.same(strip(a.headers), strip(b.headers), 'same headers both ways (date aside)')
  const held = fast.h.proxy.packages.service.cachedHit(fast.image.manifestDigest)
  t.equal(held && 'buffer' in held ? held.buffer.length : undefined, fast.data.length, 'it really was in memory')
  if (held && 'buffer' in held) held.release()

  const counted = await fast.h.proxy.metrics.registry.getSingleMetricAsString('registry_packages_proxy_package_results_total')
  t.match(counted, /result="hit"} 2$/m, 'counted as a hit (one disk hit, one memory hit)')
  const requests = await fast.h.proxy.metrics.registry.getSingleMetricAsString('registry_packages_proxy_http_requests_total')
  t.match(requests, /route="\/package",method="get",code="200"} 3$/m, 'and as a request')
  t.equal(fast.h.proxy.packages.counts.hit, 2, 'GET /cache counts it too')
})

void t.test('everything but a plain GET memory hit goes to the hapi route', async (t) => {
  const { h, data, image, base, url } = await cachedServer(t, true)
  const head = await fetchRaw(url, { method: 'HEAD' })
  t.equal(head.status, 200)
  t.equal(head.body.length, 0, 'HEAD has no body')
  const range = await fetchRaw(url, { headers: { range: 'bytes=0-9' } })
  t.equal(range.status, 206)
  t.ok(range.body.equals(data.subarray(0, 10)))
  const inm = await fetchRaw(url, { headers: { 'if-none-match': `"${image.manifestDigest}"` } })
  t.equal(inm.status, 304)
  const before = h.registry.counts.total
  const unknown = await fetchRaw(`${base}${packageUrl({ digest: image.manifestDigest, repository: 'elsewhere.example:5000/x' })}`)
  t.equal(unknown.status, 404, 'a cached digest under an unknown repository is still a 404')
  t.equal(h.registry.counts.total, before, 'and still makes no outbound connection')
  const dup = await fetchRaw(`${url}&digest=${image.manifestDigest}`)
  t.equal(dup.status, 400, 'a repeated digest is still a 400')
  const bad = await fetchRaw(`${base}/package?digest=sha256:XYZ`)
  t.equal(bad.status, 400)
  t.match(JSON.parse(bad.body.toString()), { statusCode: 400, error: 'Bad Request' })
})

// Over the memory cache's 8 MiB entry limit: hits come from the file.
const LARGE = 9 * 1024 * 1024

void t.test('a hit from disk answered before hapi is the same response hapi gives', async (t) => {
  const fast = await cachedServer(t, true, LARGE)
  const slow = await cachedServer(t, false, LARGE)
  const a = await fetchRaw(fast.url)
  const b = await fetchRaw(slow.url)
  t.equal(a.status, 200)
  t.equal(a.headers['x-cache'], 'HIT')
  t.ok(a.complete && a.body.equals(fast.data), 'byte-exact')
  t.ok(b.body.equals(a.body), 'same bytes both ways')
  const strip = (hd: Record<string, unknown>) => Object.fromEntries(Object.entries(hd).filter(([k]) => k !== 'date'))
  t.same(strip(a.headers), strip(b.headers), 'same headers both ways (date aside)')
  const hit = fast.h.proxy.packages.service.cachedHit(fast.image.manifestDigest)
  t.ok(hit && !('buffer' in hit), 'one client at a time: the file, not memory')
  const counted = await fast.h.proxy.metrics.registry.getSingleMetricAsString('registry_packages_proxy_package_results_total')
  t.match(counted, /result="hit"} 2$/m, 'both hits counted')
})

void t.test('a large package that a herd wants is then served from memory, and its file is let go', async (t) => {
  const { h, data, image, url } = await cachedServer(t, true, LARGE)
  const herd = await Promise.all(Array.from({ length: 8 }, () => fetchRaw(url)))
  for (const r of herd) t.ok(r.complete && r.body.equals(data), 'each of the herd byte-exact')
  // The load runs beside the herd's responses: wait for it.
  let copy: Buffer | undefined
  for (let i = 0; i < 100 && !copy; i++) {
    const hit = h.proxy.packages.service.cachedHit(image.manifestDigest)
    if (hit && 'buffer' in hit) {
      copy = hit.buffer
      hit.release()
    } else await new Promise((r) => setTimeout(r, 20))
  }
  t.ok(copy?.equals(data), 'loaded into memory once the herd came, byte-exact')
  const after = await fetchRaw(url)
  t.ok(after.complete && after.body.equals(data), 'and served from there, byte-exact')
  // A DELETE drops the memory copy with the file: the next GET is a miss again.
  const before = h.registry.counts.blob
  const del = await fetchRaw(`${h.proxy.server.info.uri}/cache/${image.manifestDigest}`, { method: 'DELETE', headers: cacheTokenHeader(h.cacheDirectory) })
  t.equal(del.status, 200, 'deleted')
  const again = await fetchRaw(url)
  t.equal(again.headers['x-cache'], 'MISS')
  t.ok(again.body.equals(data))
  t.equal(h.registry.counts.blob, before + 1, 'from the registry, not a stale memory copy')
})

// Found from outside: a file changed after its fill (bytes overwritten, its mtime put back)
// was served as a complete 200 with the wrong bytes at its first hit from disk.
void t.test('a file changed after its fill is hashed again before it is served, not served as it is', async (t) => {
  const h = await startHarness(t, {})
  const data = bytes(LARGE, 52)
  const image = h.registry.addImage(`${DEFAULT_PREFIX}/changed`, [data])
  await h.proxy.server.start()
  const url = `${h.proxy.server.info.uri}${packageUrl({ digest: image.manifestDigest, path: 'changed' })}`
  // The fill only: the first hit from disk comes after the change.
  t.ok((await fetchRaw(url)).body.equals(data), 'the miss')
  await h.proxy.packages.service.settled()
  const file = new BlobStore(h.cacheDirectory).pathFor(image.lastLayer.digest)
  const st = statSync(file)
  const fd = openSync(file, 'r+')
  writeSync(fd, Buffer.from('not the layer you asked for'), 0, undefined, 4096)
  closeSync(fd)
  utimesSync(file, st.atime, st.mtime)
  const before = h.registry.counts.blob
  const r = await fetchRaw(url)
  t.equal(r.status, 200)
  t.ok(r.complete && r.body.equals(data), 'the client gets the layer, byte-exact')
  t.equal(h.registry.counts.blob, before + 1, 'from the registry: the changed file failed its check')
})

// Found from outside: pipelined GETs on a connection that dropped before their turn never saw
// their response close, so their log lines, counts, leases and read buffers were lost for good.
void t.test('pipelined hits on a connection that drops are each logged and counted, and let their file go', async (t) => {
  const { h, data, image, url } = await cachedServer(t, true, LARGE)
  const { port, pathname, search } = new URL(url)
  const socket = connect(Number(port), '127.0.0.1')
  await new Promise((r) => socket.once('connect', r))
  socket.write(`GET ${pathname}${search} HTTP/1.1\r\nHost: x\r\n\r\n`.repeat(3))
  await new Promise((r) => socket.once('data', r))
  socket.destroy()
  const requests = async (): Promise<number> => {
    const text = await h.proxy.metrics.registry.getSingleMetricAsString('registry_packages_proxy_http_requests_total')
    return [...text.matchAll(/route="\/package",method="get",code="\d+"} (\d+)/g)].reduce((n, m) => n + Number(m[1]), 0)
  }
  // Two requests came before (the miss and the first hit); three were pipelined.
  await eventually(async () => (await requests()) === 5, 'every pipelined request counted')
  const del = await fetchRaw(`${h.proxy.server.info.uri}/cache/${image.manifestDigest}`, { method: 'DELETE', headers: cacheTokenHeader(h.cacheDirectory) })
  t.equal(del.status, 200)
  const file = new BlobStore(h.cacheDirectory).pathFor(image.lastLayer.digest)
  await eventually(() => !existsSync(file), 'no lease is left: the file goes')
  t.equal(h.proxy.packages.service.cache?.heldBytes ?? 0, 0, 'nothing held')
  const again = await fetchRaw(url)
  t.ok(again.complete && again.body.equals(data))
})

void t.test('many pipelined hits from a file on one connection: all answered whole, and no listener warning', async (t) => {
  // Found from outside: each queued response added its own 'close' listener to the socket,
  // and past ten Node printed a MaxListenersExceededWarning on stderr.
  const { data, url } = await cachedServer(t, true, LARGE)
  const warnings: string[] = []
  const onWarning = (w: Error): void => {
    warnings.push(`${w.name}: ${w.message}`)
  }
  process.on('warning', onWarning)
  t.teardown(() => process.off('warning', onWarning))
  const { port, pathname, search } = new URL(url)
  const socket = connect(Number(port), '127.0.0.1')
  await new Promise((r) => socket.once('connect', r))
  const chunks: Buffer[] = []
  socket.on('data', (c: Buffer) => chunks.push(c))
  const n = 14
  socket.write(
    `GET ${pathname}${search} HTTP/1.1\r\nHost: x\r\n\r\n`.repeat(n - 1) + `GET ${pathname}${search} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`,
  )
  await new Promise((r) => socket.once('close', r))
  const got = Buffer.concat(chunks)
  let bodies = 0
  for (let at = 0; at < got.length;) {
    const end = got.indexOf('\r\n\r\n', at)
    if (end === -1) break
    const length = Number(/content-length: (\d+)/i.exec(got.subarray(at, end).toString('latin1'))?.[1])
    if (got.subarray(end + 4, end + 4 + length).equals(data)) bodies++
    at = end + 4 + length
  }
  t.equal(bodies, n, 'every pipelined hit answered whole')
  await new Promise((r) => setImmediate(r))
  t.same(warnings, [], 'no warning')
})

void t.test('a stop lets hits sent from files finish', async (t) => {
  const { h, data, url } = await cachedServer(t, true, LARGE)
  const { port, pathname, search } = new URL(url)
  const socket = connect(Number(port), '127.0.0.1')
  await new Promise((r) => socket.once('connect', r))
  const chunks: Buffer[] = []
  socket.on('data', (c: Buffer) => chunks.push(c))
  socket.write(`GET ${pathname}${search} HTTP/1.1\r\nHost: x\r\n\r\n`)
  await new Promise((r) => socket.once('data', r))
  // A slow reader: stop reading while the server stops, then read on.
  socket.pause()
  const stopped = h.proxy.server.stop({ timeout: 10_000 })
  await new Promise((r) => setTimeout(r, 300))
  socket.resume()
  await new Promise((r) => socket.once('close', r))
  await stopped
  const raw = Buffer.concat(chunks)
  const body = raw.subarray(raw.indexOf('\r\n\r\n') + 4)
  t.equal(body.length, data.length, 'the whole body')
  t.ok(body.equals(data), 'byte-exact')
})

void t.test('a fragment in the request target is answered as hapi answers it', async (t) => {
  const { h, image } = await cachedServer(t, true, LARGE)
  // Raw: an HTTP client would drop the fragment itself.
  const socket = connect(Number(h.proxy.server.info.port), '127.0.0.1')
  await new Promise((r) => socket.once('connect', r))
  socket.write(`GET /package?#&digest=${image.manifestDigest} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`)
  const head = await new Promise<string>((r) => socket.once('data', (c: Buffer) => r(c.subarray(0, 12).toString())))
  socket.destroy()
  t.equal(head, 'HTTP/1.1 400', 'the query before the fragment is empty: no digest')
})

for (const fastPath of [true, false]) {
  for (const cause of ['the client resets', 'the client half-closes, then resets', 'the stop runs out of time'] as const) {
    void t.test(`a memory hit cut off with bytes still queued is logged 499, aborted (${cause}; ${fastPath ? 'fast path' : 'hapi route'})`, async (t) => {
      // Found from outside: Node drops what it still holds for a destroyed connection, and its
      // response then reads writableFinished (and emits 'finish'), so these were logged as whole 200s.
      const log = captureLogger('info')
      const h = await startHarness(t, { fastPath, logger: log.logger, stopDrainMs: 300 })
      const data = bytes(4 * 1024 * 1024, 52) // far more than the socket buffers hold
      const image = h.registry.addImage(`${DEFAULT_PREFIX}/cut`, [data])
      await h.proxy.server.start()
      const url = new URL(`${h.proxy.server.info.uri}${packageUrl({ digest: image.manifestDigest, path: 'cut' })}`)
      await fetchRaw(url.href)
      await h.proxy.packages.service.settled()
      t.equal((await fetchRaw(url.href)).status, 200, 'the memory copy is loaded')
      const served = (): number => log.lines().filter((l) => l.msg === 'request' && l.path === '/package').length
      const socket = connect(Number(url.port), '127.0.0.1')
      socket.on('error', () => undefined)
      await new Promise((r) => socket.once('connect', r))
      socket.write(`GET ${url.pathname}${url.search} HTTP/1.1\r\nHost: x\r\n\r\n`)
      // Found from outside: after a half-close (or with a request pipelined behind), Node called
      // the failed write's callback, and so emitted 'finish', before it destroyed the socket.
      if (cause === 'the client half-closes, then resets') socket.end()
      await new Promise((r) => socket.once('data', r))
      socket.pause()
      await new Promise((r) => setTimeout(r, 200)) // the server has written all the socket takes
      if (cause !== 'the stop runs out of time') socket.resetAndDestroy()
      else await h.stop()
      await eventually(() => served() === 3, 'the cut answer has its line')
      const line = log.lines().filter((l) => l.msg === 'request' && l.path === '/package')[2]
      t.equal(line?.status, 499, 'status 499')
      t.equal(line?.aborted, true, 'aborted')
      t.equal(line?.bytes, undefined, 'no byte count claimed')
      t.equal(line?.level, 40, 'at warn')
      const bytesServed = await h.proxy.metrics.registry.getSingleMetricAsString('registry_packages_proxy_served_bytes_total')
      t.match(bytesServed, new RegExp(`_total ${2 * data.length}$`, 'm'), 'the bytes-served counter has the two whole answers only')
      socket.destroy()
    })
  }
}

void t.test("a hit's line shows the query as the client sent it, whichever path answered", async (t) => {
  // Found from outside: the fast path logged `repository` and `path` as normalised (a trailing
  // `/` on repository, a leading `/` on path, empty values dropped) while the hapi route logs
  // them as sent, so one URL was logged two ways depending on which path answered it.
  const log = captureLogger('info')
  const h = await startHarness(t, { logger: log.logger })
  const data = bytes(20_000, 53)
  const image = h.registry.addImage(`${DEFAULT_PREFIX}/norm`, [data])
  await h.proxy.server.start()
  const base = h.proxy.server.info.uri
  const d = image.manifestDigest
  const repo = `${h.registry.host}/${DEFAULT_PREFIX}`
  await fetchRaw(`${base}/package?digest=${d}&path=norm`)
  await h.proxy.packages.service.settled()
  const queries = [`repository=${repo}/&path=/norm`, 'repository=&path=norm', 'path=/norm', 'path=', `repository=${repo}&path=norm`]
  const lines = () => log.lines().filter((l) => l.msg === 'request' && l.path === '/package')
  for (const q of queries) {
    const url = `${base}/package?digest=${d}&${q}`
    const before = lines().length
    const fast = await fetchRaw(url)
    // The same hit through the hapi route: a conditional GET that does not match is a 200 too.
    const route = await fetchRaw(url, { headers: { 'if-none-match': '"x"' } })
    t.equal(fast.status, 200, `${q}: 200`)
    t.equal(route.status, 200, `${q}: 200 through the route`)
    await eventually(() => lines().length === before + 2, 'both lines written')
    const [a, b] = lines()
      .slice(before)
      .map(({ time: _t, req: _r, ms: _m, ...rest }) => rest)
    t.equal(a?.result, 'hit', `${q}: a hit`)
    t.same(a, b, `${q}: the same line both ways`)
  }
})

void t.test('a query of over 1,000 parameters is read whole on every path', async (t) => {
  // Found from outside: hapi's own query parsing keeps the first 1,000 parameters, so on the
  // hapi route a `repository` or `path` after them was dropped (an unknown repository served
  // from the default source, a repeated path accepted), while the fast path read them all.
  const log = captureLogger('info')
  const h = await startHarness(t, { logger: log.logger })
  const image = h.registry.addImage(`${DEFAULT_PREFIX}/many`, [bytes(5_000, 54)])
  await h.proxy.server.start()
  const base = h.proxy.server.info.uri
  const d = image.manifestDigest
  const fillers = Array.from({ length: 999 }, (_, i) => `j${i}=1`).join('&')
  const at = (tail: string): string => `${base}/package?digest=${d}&${fillers}&${tail}`
  t.equal((await fetchRaw(at('path=many'))).status, 200, 'a miss: path is read')
  await h.proxy.packages.service.settled()
  for (const headers of [{}, { 'if-none-match': '"x"' }]) {
    const how = 'if-none-match' in headers ? 'hapi route' : 'fast path'
    t.equal((await fetchRaw(at('repository=nope.example/zz&path=many'), { headers })).status, 404, `${how}: an unknown repository is a 404`)
    t.equal((await fetchRaw(at('path=many&path=other'), { headers })).status, 400, `${how}: a repeated path is a 400`)
  }
  const lines = () => log.lines().filter((l) => l.msg === 'request' && l.path === '/package')
  const before = lines().length
  await fetchRaw(at('path=many'))
  await fetchRaw(at('path=many'), { headers: { 'if-none-match': '"x"' } })
  await eventually(() => lines().length === before + 2, 'both lines')
  const [a, b] = lines()
    .slice(before)
    .map(({ time: _t, req: _r, ms: _m, ...rest }) => rest)
  t.match(a, { status: 200, result: 'hit', pkgPath: 'many' }, 'the hit, with its path')
  t.same(a, b, 'the same line both ways')
})

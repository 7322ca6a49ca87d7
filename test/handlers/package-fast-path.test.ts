import t from 'tap'
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

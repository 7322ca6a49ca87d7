/**
 * Metric values after scripted traffic through a listening proxy and the fake registry. Each
 * step asserts the exact change of every counter and histogram count (so a step that moved
 * something unexpected fails too) and the gauges after it: a miss and a coalesced request for
 * one slow cold layer, a hit, a miss that evicts, an upstream error, manifest and layer digest
 * mismatches, a client that leaves mid-body. Token fetches are checked against the registry's own count.
 */
import t, { type Test } from 'tap'
import { bytes, fetchRaw, packageUrl, startHarness, type Harness, type HarnessOptions } from '../fixtures/proxy-harness.js'
import { eventually } from '../fixtures/eventually.js'
import { parseExposition, PREFIX, seriesKey, valueOf, type Exposition } from '../fixtures/monitoring.js'

/** The server's exposition, read from its registry directly: no scrape request is counted. */
async function expose(h: Harness): Promise<Exposition> {
  return parseExposition(await h.proxy.metrics.registry.metrics())
}

/** Counters and histogram counts only: bucket spreads and sums depend on timing. */
function counted(e: Exposition): Map<string, number> {
  const out = new Map<string, number>()
  for (const s of e.samples) {
    const type = e.types.get(s.name) ?? e.types.get(s.name.replace(/_count$/, ''))
    const isCount = type === 'histogram' && s.name.endsWith('_count')
    if (type === 'counter' || isCount) out.set(seriesKey(s), s.value)
  }
  return out
}

/** Every series that changed between two expositions, by how much. */
function delta(before: Exposition, after: Exposition): Record<string, number> {
  const a = counted(before)
  const out: Record<string, number> = {}
  for (const [key, value] of counted(after)) {
    const change = value - (a.get(key) ?? 0)
    if (change !== 0) out[key] = change
  }
  return out
}

/** `registry_packages_proxy_<name>{labels}` as {@link seriesKey} renders it. */
function k(name: string, labels: Record<string, string> = {}): string {
  return seriesKey({ name: `${PREFIX}${name}`, labels })
}

const ok = (method = 'get'): string => k('http_requests_total', { route: '/package', method, code: '200' })

/** A fill from the registry: one manifest and one blob request, both answered 200, ending in `outcome`. */
const fill = (outcome: 'committed' | 'failed'): Record<string, number> => ({
  [k('upstream_requests_total', { kind: 'manifest', code: '200' })]: 1,
  [k('upstream_requests_total', { kind: 'blob', code: '200' })]: 1,
  [k('upstream_response_seconds_count', { kind: 'manifest' })]: 1,
  [k('upstream_response_seconds_count', { kind: 'blob' })]: 1,
  [k('fill_duration_seconds_count', { outcome })]: 1,
})

/** A 502 that went no further than the manifest request, answered `code`. */
const failedAtManifest = (code: string): Record<string, number> => ({
  [k('http_requests_total', { route: '/package', method: 'get', code: '502' })]: 1,
  [k('package_results_total', { result: 'error' })]: 1,
  [k('upstream_requests_total', { kind: 'manifest', code })]: 1,
  [k('upstream_response_seconds_count', { kind: 'manifest' })]: 1,
})

async function started(t: Test, o: HarnessOptions): Promise<{ h: Harness; url: (q: Parameters<typeof packageUrl>[0]) => string }> {
  const h = await startHarness(t, o)
  await h.proxy.server.start()
  const base = h.proxy.server.info.uri
  return { h, url: (q) => `${base}${packageUrl(q)}` }
}

void t.test('a miss, a coalesced request, a hit, an eviction, an upstream error, digest mismatches', async (t) => {
  const size = 48 * 1024
  // Room for one 48 KiB layer and the small one: the second big layer evicts the first.
  const { h, url } = await started(t, { limitBytes: 64 * 1024 })
  const x = h.registry.addImage('deckhouse/ce/pkg-x', [bytes(size, 1)])
  const y = h.registry.addImage('deckhouse/ce/pkg-y', [bytes(size, 2)])
  const z = h.registry.addImage('deckhouse/ce/pkg-z', [bytes(1024, 3)])
  const v = h.registry.addImage('deckhouse/ce/pkg-v', [bytes(4096, 4)])
  const xUrl = url({ digest: x.manifestDigest, path: 'pkg-x' })

  let before = await expose(h)
  t.equal(valueOf(before, `${PREFIX}cache_limit_bytes`), 64 * 1024, 'the limit')
  t.equal(valueOf(before, `${PREFIX}ready`), 1, 'ready')
  t.equal(valueOf(before, `${PREFIX}cache_size`), 0)

  await t.test('two concurrent requests for a slow cold layer: one miss, one coalesced', async (t) => {
    // The registry holds the blob's headers back; the second request arrives meanwhile and joins
    // the fill. The delay only has to outlast a request that needs no network.
    h.registry.faults = { blobDelayMs: 2500 }
    const first = fetchRaw(xUrl)
    await h.registry.waitForRequests(1, (r) => r.url.includes('/blobs/'))
    const during = await expose(h)
    t.equal(valueOf(during, `${PREFIX}fills_in_flight`), 1, 'one fill in flight')
    const second = fetchRaw(xUrl)
    const [a, b] = await Promise.all([first, second])
    h.registry.faults = {}
    await h.proxy.packages.service.settled()
    t.same([a.status, a.complete, b.status, b.complete], [200, true, 200, true])
    t.same([a.headers['x-cache'], b.headers['x-cache']], ['MISS', 'COALESCED'])
    const after = await expose(h)
    t.same(delta(before, after), {
      [ok()]: 2,
      [k('package_results_total', { result: 'miss' })]: 1,
      [k('package_results_total', { result: 'coalesced' })]: 1,
      [k('served_bytes_total')]: 2 * size,
      ...fill('committed'),
    })
    t.equal(h.registry.counts.blob, 1, 'the registry saw one blob request')
    t.equal(valueOf(after, `${PREFIX}fills_in_flight`), 0)
    t.equal(valueOf(after, `${PREFIX}cache_size`), size)
    t.equal(valueOf(after, `${PREFIX}cache_entries`), 1)
    before = after
  })

  await t.test('a hit touches no registry', async (t) => {
    const res = await fetchRaw(xUrl)
    t.equal(res.headers['x-cache'], 'HIT')
    const after = await expose(h)
    t.same(delta(before, after), {
      [ok()]: 1,
      [k('package_results_total', { result: 'hit' })]: 1,
      [k('served_bytes_total')]: size,
    })
    before = after
  })

  await t.test('a miss that does not fit evicts the least recently used entry', async (t) => {
    const res = await fetchRaw(url({ digest: y.manifestDigest, path: 'pkg-y' }))
    t.same([res.status, res.complete, res.headers['x-cache']], [200, true, 'MISS'])
    await h.proxy.packages.service.settled()
    const after = await expose(h)
    t.same(delta(before, after), {
      [ok()]: 1,
      [k('package_results_total', { result: 'miss' })]: 1,
      [k('served_bytes_total')]: size,
      ...fill('committed'),
      [k('evictions_total', { reason: 'evicted' })]: 1,
      [k('evicted_bytes_total', { reason: 'evicted' })]: size,
    })
    t.equal(valueOf(after, `${PREFIX}cache_size`), size, 'one layer in place of the other')
    t.equal(valueOf(after, `${PREFIX}cache_entries`), 1)
    before = after
  })

  await t.test('an upstream error: the registry answers 500', async (t) => {
    h.registry.faults = { manifestStatus: 500 }
    const res = await fetchRaw(url({ digest: z.manifestDigest, path: 'pkg-z' }))
    h.registry.faults = {}
    t.equal(res.status, 502)
    const after = await expose(h)
    t.same(delta(before, after), failedAtManifest('500'))
    before = after
  })

  await t.test('a manifest that does not match its digest', async (t) => {
    h.registry.faults = { corruptManifest: true }
    const res = await fetchRaw(url({ digest: z.manifestDigest, path: 'pkg-z' }))
    h.registry.faults = {}
    t.equal(res.status, 502)
    const after = await expose(h)
    t.same(delta(before, after), {
      ...failedAtManifest('200'),
      [k('digest_mismatches_total', { what: 'manifest' })]: 1,
    })
    before = after
  })

  await t.test('a layer that does not match its digest: aborted, no bytes counted, counted once', async (t) => {
    h.registry.faults = { corruptBlob: true }
    const res = await fetchRaw(url({ digest: v.manifestDigest, path: 'pkg-v' }))
    await h.proxy.packages.service.settled()
    h.registry.faults = {}
    t.equal(res.status, 200, 'the headers went out before the mismatch')
    t.notOk(res.complete, 'the body was cut before its last byte')
    const after = await expose(h)
    t.same(delta(before, after), {
      // The client saw 200 headers, then a cut connection: counted as the failure it was.
      [k('http_requests_total', { route: '/package', method: 'get', code: '500' })]: 1,
      [k('package_results_total', { result: 'miss' })]: 1,
      [k('digest_mismatches_total', { what: 'layer' })]: 1,
      ...fill('failed'),
    })
    t.equal(valueOf(after, `${PREFIX}cache_size`), size, 'nothing was cached')
    t.equal(valueOf(after, `${PREFIX}fills_in_flight`), 0)
    before = after
  })

  await t.test('a client that disconnects mid-body: 499, no bytes, and the fill still commits', async (t) => {
    const w = h.registry.addImage('deckhouse/ce/pkg-w', [bytes(16 * 1024, 8)])
    h.registry.faults = { blobChunkSize: 1024, blobChunkDelayMs: 20 }
    const res = await fetchRaw(url({ digest: w.manifestDigest, path: 'pkg-w' }), { abortAfter: 2048 })
    t.notOk(res.complete, 'the client left early')
    await h.proxy.packages.service.settled()
    h.registry.faults = {}
    const closed = k('http_requests_total', { route: '/package', method: 'get', code: '499' })
    await eventually(async () => counted(await expose(h)).has(closed), 'the server saw the client go')
    const after = await expose(h)
    t.same(delta(before, after), {
      [closed]: 1,
      [k('package_results_total', { result: 'miss' })]: 1,
      ...fill('committed'),
    })
    t.equal(valueOf(after, `${PREFIX}cache_size`), size + 16 * 1024, 'cached for the next client')
  })

  await t.test('GET /cache agrees with the metrics', async (t) => {
    const e = await expose(h)
    const res = await h.proxy.server.inject('/cache')
    const body = JSON.parse(res.payload) as Record<string, number>
    for (const result of ['hit', 'miss', 'coalesced'] as const) {
      t.equal(body[result], valueOf(e, `${PREFIX}package_results_total`, { result }), `${result} count`)
    }
    t.equal(body.usedBytes, valueOf(e, `${PREFIX}cache_size`))
    t.equal(body.entries, valueOf(e, `${PREFIX}cache_entries`))
    const sum = (name: string): number => ['evicted', 'deleted', 'corrupt'].reduce((n, reason) => n + (valueOf(e, `${PREFIX}${name}`, { reason }) ?? NaN), 0)
    t.equal(body.evictions, sum('evictions_total'))
    t.equal(body.evictedBytes, sum('evicted_bytes_total'))
    t.equal((body.heldBytes ?? NaN) + (body.reservedBytes ?? NaN), valueOf(e, `${PREFIX}cache_held_bytes`))
  })
})

void t.test('token fetches are upstream_requests_total{kind="token"}, counted as the token server saw them', async (t) => {
  const auth = { kind: 'bearer' as const, username: 'puller', password: 'token-pass-3c1f' }
  const good = await started(t, { auth, credentials: { username: 'puller', password: auth.password } })
  const a = good.h.registry.addImage('deckhouse/ce/pkg-a', [bytes(2048, 5)])
  const b = good.h.registry.addImage('deckhouse/ce/pkg-b', [bytes(2048, 6)])
  for (const image of [a, b]) {
    const res = await fetchRaw(good.url({ digest: image.manifestDigest, path: image.repo.split('/').pop() ?? '' }))
    t.equal(res.status, 200)
  }
  await good.h.proxy.packages.service.settled()
  const e = await expose(good.h)
  const upstream = (kind: string, code: string): number => valueOf(e, `${PREFIX}upstream_requests_total`, { kind, code }) ?? 0
  const total = (kind: string): number =>
    e.samples.filter((s) => s.name === `${PREFIX}upstream_requests_total` && s.labels.kind === kind).reduce((n, s) => n + s.value, 0)
  t.ok(upstream('token', '200') >= 2, `one token per repository scope: ${upstream('token', '200')}`)
  t.equal(total('token'), good.h.registry.counts.token, 'token requests: as many as the token server answered')
  t.equal(total('manifest'), good.h.registry.counts.manifest, 'manifest requests: as many as the registry answered')
  t.equal(total('blob'), good.h.registry.counts.blob, 'blob requests: as many as the registry answered')
  t.equal(upstream('manifest', '401'), good.h.registry.counts.unauthorized, 'the 401 challenges')

  const refused = await started(t, { auth, credentials: { username: 'puller', password: 'wrong-pass-77d0' } })
  const c = refused.h.registry.addImage('deckhouse/ce/pkg-c', [bytes(1024, 7)])
  t.equal((await fetchRaw(refused.url({ digest: c.manifestDigest, path: 'pkg-c' }))).status, 502, 'wrong password: 502')
  const r = await expose(refused.h)
  const refusedTokens = valueOf(r, `${PREFIX}upstream_requests_total`, { kind: 'token', code: '401' }) ?? 0
  t.ok(refusedTokens >= 1, `the token server's 401 is counted: ${refusedTokens}`)
  t.equal(refusedTokens, refused.h.registry.counts.token, 'every token request was refused')
  t.equal(valueOf(r, `${PREFIX}package_results_total`, { result: 'error' }), 1)
})

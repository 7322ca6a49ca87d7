/**
 * The names the alerts, the dashboard and the README use are the names the server exports:
 * a running server (Kubernetes sources through the fake API server, a fake registry, process
 * metrics on) gets traffic that makes every family produce samples, then its `/metrics` is
 * compared with every PromQL expression in infra/monitoring and with README's table. Label
 * values are checked for digests, repositories and hosts.
 */
import { join } from 'node:path'
import { pino } from 'pino'
import t, { type Test } from 'tap'
import { createServer } from '../../server.js'
import { FakeKubeApi, moduleSource, registrySecret } from '../fixtures/fake-kube-api.js'
import { eventually } from '../fixtures/eventually.js'
import { FakeRegistry } from '../fixtures/fake-registry.js'
import { bytes, fetchRaw, packageUrl } from '../fixtures/proxy-harness.js'
import { alertRules, dashboardQueries, familyOf, parseExposition, PREFIX, promqlMetricNames, readmeMetrics, type Exposition } from '../fixtures/monitoring.js'

/** Traffic through every path that feeds a metric; returns the exposition and what must not leak. */
async function exercisedServer(t: Test): Promise<{ exposition: Exposition; forbidden: string[] }> {
  const registry = await FakeRegistry.start()
  t.teardown(() => registry.close())
  const x = registry.addImage('deckhouse/ce/pkg-x', [bytes(40 * 1024, 1)])
  const y = registry.addImage('deckhouse/ce/pkg-y', [bytes(40 * 1024, 2)])
  const broken = registry.addImage('deckhouse/ce/pkg-z', [bytes(1024, 3)])

  // The API server first fails its lists (a watch restart), then serves the registry Secret and
  // a malformed ModuleSource (a rejected source).
  const api = await FakeKubeApi.start()
  t.teardown(() => api.close())
  api.listStatus = 500
  api.putSecret(registrySecret({ address: registry.host, path: '/deckhouse/ce', scheme: 'http' }))
  api.putModuleSource(moduleSource('broken', { repo: `${registry.host}/modules/broken`, scheme: 'http', dockerCfg: '%%% not base64 %%%' }))

  const dir = t.testdir()
  const proxy = await createServer({
    cacheDirectory: join(dir, 'cache'),
    // Room for one 40 KiB layer: the second evicts the first.
    limitBytes: 60 * 1024,
    kubeconfig: api.writeKubeconfig(dir, 'sa-token-metric-names'),
    logger: pino({ level: 'silent' }),
    env: {},
    collectDefaultMetrics: true,
    timeouts: { connectMs: 2000, headersMs: 5000, idleMs: 5000 },
    flushIntervalMs: 60_000,
  })
  t.teardown(() => proxy.server.stop({ timeout: 2000 }))
  await proxy.server.start()
  const base = proxy.server.info.uri

  await eventually(() => api.counts.list.secrets >= 1, 'a failed list')
  api.listStatus = undefined
  await eventually(async () => (await proxy.server.inject('/readyz')).statusCode === 200, 'ready after the API server recovers', { timeoutMs: 30_000 })

  const get = (url: string, headers: Record<string, string> = {}, method = 'GET'): ReturnType<typeof fetchRaw> => fetchRaw(`${base}${url}`, { method, headers })
  const xUrl = packageUrl({ digest: x.manifestDigest, path: 'pkg-x' })
  t.equal((await get(xUrl)).status, 200, 'a miss')
  t.equal((await get(xUrl)).status, 200, 'a hit')
  t.equal((await get(xUrl, {}, 'HEAD')).status, 200, 'a HEAD')
  t.equal((await get(xUrl, { 'if-none-match': `"${x.manifestDigest}"` })).status, 304, 'not modified')
  // x must be committed (not still a reservation) before y's miss can evict it.
  await proxy.packages.service.settled()
  t.equal((await get(packageUrl({ digest: y.manifestDigest, path: 'pkg-y' }))).status, 200, 'a miss that evicts')
  registry.faults = { manifestStatus: 500 }
  t.equal((await get(packageUrl({ digest: broken.manifestDigest, path: 'pkg-z' }))).status, 502, 'an upstream error')
  registry.faults = { corruptManifest: true }
  t.equal((await get(packageUrl({ digest: broken.manifestDigest, path: 'pkg-z' }))).status, 502, 'a digest mismatch')
  registry.faults = {}
  t.equal((await get(packageUrl({ digest: x.manifestDigest, repository: `${registry.host}/modules/unknown` }))).status, 404, 'an unknown repository')
  t.equal((await get(`/v2/deckhouse/ce/manifests/${x.manifestDigest}`)).status, 404, 'a path no route has')
  // A fill commits (fsync, rename, row) just after its last byte went out.
  await proxy.packages.service.settled()
  t.equal((await get('/cache')).status, 200)
  t.equal((await get(`/cache/${y.lastLayer.digest}`)).status, 200)
  t.equal((await get('/healthz')).status, 200)
  await proxy.packages.service.settled()

  const scrape = await get('/metrics')
  t.equal(scrape.status, 200)
  t.match(scrape.headers['content-type'], /^text\/plain/)
  const forbidden = [
    'sha256:',
    registry.host,
    '127.0.0.1',
    'deckhouse/ce',
    'modules/',
    'pkg-x',
    ...[x, y, broken].flatMap((i) => [i.manifestDigest.slice(7, 19), i.lastLayer.digest.slice(7, 19)]),
  ]
  return { exposition: parseExposition(scrape.body.toString('utf8')), forbidden }
}

void t.test('every metric the alerts, the dashboard and the README name is exported, and only those', async (t) => {
  const { exposition, forbidden } = await exercisedServer(t)
  const ours = [...exposition.types.keys()].filter((n) => n.startsWith(PREFIX))
  const withSamples = new Set(exposition.samples.map((s) => familyOf(s.name, exposition.types)))
  t.ok(ours.length > 20, `${ours.length} families exported`)
  t.same(
    [...exposition.types.keys()].filter((n) => !n.startsWith(PREFIX)),
    [],
    'every family carries the prefix (process defaults included)',
  )

  await t.test('alert expressions', (t) => {
    const rules = alertRules()
    t.ok(rules.length >= 8, `${rules.length} alerts`)
    for (const rule of rules) {
      const names = promqlMetricNames(rule.expr)
      t.ok(names.length > 0 || /\bup\{job="registry-packages-proxy"\}/.test(rule.expr), `${rule.alert} queries our series`)
      for (const name of names) t.ok(withSamples.has(name), `${rule.alert}: ${name} has samples`)
    }
    t.end()
  })

  await t.test('dashboard queries', (t) => {
    const queries = dashboardQueries()
    t.ok(queries.length >= 20, `${queries.length} queries`)
    for (const q of queries) {
      const names = promqlMetricNames(q.expr)
      t.ok(names.length > 0, `${q.where} queries our series`)
      for (const name of names) t.ok(withSamples.has(name), `${q.where}: ${name} has samples`)
    }
    t.end()
  })

  await t.test('README table: one row per family, and every row exported', (t) => {
    const rows = readmeMetrics()
    const exact = rows.filter((r) => !r.wildcard)
    const prefixes = rows.filter((r) => r.wildcard)
    t.same(prefixes.map((p) => p.name).sort(), [`${PREFIX}nodejs_`, `${PREFIX}process_`], 'process defaults are the wildcard rows')
    for (const family of ours) {
      const listed = exact.some((r) => r.name === family) || prefixes.some((p) => family.startsWith(p.name))
      t.ok(listed, `${family} is in the README`)
    }
    t.same(exact.length, new Set(exact.map((r) => r.name)).size, 'no family is listed twice')
    for (const row of exact) {
      t.ok(exposition.types.has(row.name), `README row ${row.name} is exported`)
      t.equal(row.type, exposition.types.get(row.name), `${row.name} is a ${row.type}`)
      const labels = new Set(
        exposition.samples
          .filter((s) => familyOf(s.name, exposition.types) === row.name)
          .flatMap((s) => Object.keys(s.labels))
          .filter((l) => l !== 'le'),
      )
      t.same([...labels].sort(), [...row.labels].sort(), `${row.name}: README lists its labels {${row.labels.join(',')}}`)
    }
    for (const p of prefixes)
      t.ok(
        ours.some((f) => f.startsWith(p.name) && !exact.some((r) => r.name === f)),
        `${p.name}* matches exported families`,
      )
    t.end()
  })

  await t.test('no label value holds a digest, a repository or a host', (t) => {
    const values = new Set(exposition.samples.flatMap((s) => Object.values(s.labels)))
    for (const value of values) {
      const leaked = forbidden.filter((f) => value.includes(f))
      t.same(leaked, [], `label value ${JSON.stringify(value)}`)
    }
    const routes = new Set(exposition.samples.filter((s) => s.name === `${PREFIX}http_requests_total`).map((s) => s.labels.route))
    t.ok(routes.has('/{p*}'), `an unrouted path counts as the catch-all route: ${[...routes].join(', ')}`)
    t.ok(routes.has('/cache/{digest}'), 'a digest in the path counts as the route pattern')
    t.end()
  })
})

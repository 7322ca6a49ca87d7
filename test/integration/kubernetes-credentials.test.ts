import { join } from 'node:path'
import { pino } from 'pino'
import t, { type Test } from 'tap'
import { createServer, type ProxyServer } from '../../server.js'
import { FakeKubeApi, LogLines, b64, moduleSource, registrySecret } from '../fixtures/fake-kube-api.js'
import { eventually } from '../fixtures/eventually.js'
import { FakeRegistry } from '../fixtures/fake-registry.js'
import { freePort } from '../fixtures/net.js'
import { bytes, packageUrl, sha256 } from '../fixtures/proxy-harness.js'

const TOKEN = 'sa-token-93be01'
const PASSWORD = 'pull-secret-55c2'

const dockerCfg = (host: string): string => JSON.stringify({ auths: { [host]: { auth: b64(`puller:${PASSWORD}`) } } })

async function startProxy(t: Test, api: FakeKubeApi): Promise<{ proxy: ProxyServer; logs: LogLines }> {
  const dir = t.testdir()
  const logs = new LogLines()
  const proxy = await createServer({
    cacheDirectory: join(dir, 'cache'),
    limitBytes: 64 * 1024 * 1024,
    kubeconfig: api.writeKubeconfig(dir, TOKEN),
    logger: pino({ level: 'debug' }, logs),
    env: {},
    collectDefaultMetrics: false,
    timeouts: { connectMs: 2000, headersMs: 5000, idleMs: 5000 },
    flushIntervalMs: 60_000,
  })
  t.teardown(() => proxy.server.stop({ timeout: 2000 }))
  return { proxy, logs }
}

async function ready(proxy: ProxyServer): Promise<{ status: number; body: { ready: boolean; reasons?: string[] } }> {
  const res = await proxy.server.inject('/readyz')
  return { status: res.statusCode, body: JSON.parse(res.payload) as { ready: boolean; reasons?: string[] } }
}

void t.test('through the server: not ready until the API server answers, then packages from both kinds of source', async (t) => {
  const registry = await FakeRegistry.start({ auth: { kind: 'basic', username: 'puller', password: PASSWORD } })
  t.teardown(() => registry.close())
  const layer = bytes(4096, 7)
  const base = registry.addImage('deckhouse/ce/pkg', [layer])
  const module = registry.addImage('modules/example/pkg', [bytes(2048, 3)])
  const moved = registry.addImage('modules/moved/pkg', [bytes(1024, 5)])

  // The API server is not listening when the proxy starts.
  const api = FakeKubeApi.create(await freePort())
  t.teardown(() => api.close())
  api.putSecret(registrySecret({ address: registry.host, path: '/deckhouse/ce', scheme: 'http', dockerconfigjson: dockerCfg(registry.host) }))
  api.putModuleSource(moduleSource('example', { repo: `${registry.host}/modules/example`, scheme: 'http', dockerCfg: b64(dockerCfg(registry.host)) }))
  const { proxy, logs } = await startProxy(t, api)

  const before = await ready(proxy)
  t.equal(before.status, 503, 'not ready before the first sync')
  t.match(before.body.reasons, [/cache index|credential sources not synced yet: .*secret/], 'the reason names the unsynced sources')
  t.match(before.body.reasons?.join(), /modulesources/)
  // Nodes call the masters directly (readiness does not hold them off): before the first sync
  // "no such source" is not known yet, so it is a 503 to retry, never a 404.
  for (const q of [{ path: 'pkg' }, { repository: `${registry.host}/modules/example`, path: 'pkg' }, { repository: 'unknown.example.com/x' }]) {
    const early = await proxy.server.inject(packageUrl({ digest: base.manifestDigest, ...q }))
    t.equal(early.statusCode, 503, `before the first sync: 503 (${q.repository ?? 'default'})`)
    t.equal(early.headers['retry-after'], '5', 'with Retry-After')
    t.match(JSON.parse(early.payload), { statusCode: 503, message: /not synced yet/ })
  }
  t.equal(registry.counts.total, 0, 'and no outbound connection')

  await api.listen()
  await eventually(async () => (await ready(proxy)).status === 200, '/readyz 200')

  const def = await proxy.server.inject(packageUrl({ digest: base.manifestDigest, path: 'pkg' }))
  t.equal(def.statusCode, 200, 'default source from the Secret, with its credentials')
  t.equal(sha256(def.rawPayload), base.lastLayer.digest)
  const mod = await proxy.server.inject(packageUrl({ digest: module.manifestDigest, repository: `${registry.host}/modules/example`, path: 'pkg' }))
  t.equal(mod.statusCode, 200, 'module source from the ModuleSource')

  registry.resetCounts()
  for (const repository of ['evil.example.com/x', `${registry.host}/modules`, `${registry.host}/modules/example/pkg`, '127.0.0.1:1/deckhouse/ce']) {
    const res = await proxy.server.inject(packageUrl({ digest: moved.manifestDigest, repository, path: 'pkg' }))
    t.equal(res.statusCode, 404, `unknown repository ${repository}: 404`)
  }
  t.equal(registry.counts.total, 0, 'unknown repositories: no outbound connection at all')

  // The ModuleSource moves: the old repository is retired at once.
  api.putModuleSource(moduleSource('example', { repo: `${registry.host}/modules/moved`, scheme: 'http', dockerCfg: b64(dockerCfg(registry.host)) }))
  await eventually(() => proxy.sources.all().some((s) => s.repository === `${registry.host}/modules/moved`), 'repo change applied')
  registry.resetCounts()
  const retired = await proxy.server.inject(packageUrl({ digest: moved.manifestDigest, repository: `${registry.host}/modules/example`, path: 'pkg' }))
  t.equal(retired.statusCode, 404, 'the retired repository: 404')
  t.equal(registry.counts.total, 0, 'the retired repository: no outbound connection')
  const now = await proxy.server.inject(packageUrl({ digest: moved.manifestDigest, repository: `${registry.host}/modules/moved`, path: 'pkg' }))
  t.equal(now.statusCode, 200, 'the new repository serves')

  // Deleting the ModuleSource retires it too.
  api.deleteModuleSource('example')
  await eventually(() => !proxy.sources.all().some((s) => s.kind === 'module-source'), 'ModuleSource deleted')
  registry.resetCounts()
  const gone = await proxy.server.inject(packageUrl({ digest: module.manifestDigest, repository: `${registry.host}/modules/moved`, path: 'pkg' }))
  t.equal(gone.statusCode, 404)
  t.equal(registry.counts.total, 0)

  // An API-server outage: still ready, the known credentials keep serving new digests.
  await api.close()
  await eventually(() => logs.find(/watch failed/).length >= 2, 'the outage noticed')
  t.equal((await ready(proxy)).status, 200, 'an outage does not make the pod unready')
  const fresh = registry.addImage('deckhouse/ce/pkg2', [bytes(512, 9)])
  const during = await proxy.server.inject(packageUrl({ digest: fresh.manifestDigest, path: 'pkg2' }))
  t.equal(during.statusCode, 200, 'a new package from the default source during the outage')

  const metrics = (await proxy.server.inject('/metrics')).payload
  t.match(metrics, /registry_packages_proxy_source_last_sync_timestamp_seconds\{provider="secret"\} \d/)
  t.match(metrics, /registry_packages_proxy_source_last_sync_timestamp_seconds\{provider="modulesources"\} \d/)
  t.match(metrics, /registry_packages_proxy_source_watch_restarts_total\{provider="secret"\} [1-9]/)
  t.match(metrics, /registry_packages_proxy_source_synced\{provider="secret"\} 1/)
  for (const secret of [PASSWORD, TOKEN, b64(`puller:${PASSWORD}`)]) {
    t.notOk(metrics.includes(secret), 'no credential in metrics')
    t.notOk(logs.text.includes(secret), 'no credential in logs')
  }
  t.ok(api.requests.length > 0 && api.requests.every((r) => r.headers.authorization === `Bearer ${TOKEN}`), 'every API request carried the bearer token')
})

void t.test('through the server: a Secret that appears later makes the pod serve the default source', async (t) => {
  const api = await FakeKubeApi.start()
  t.teardown(() => api.close())
  const { proxy } = await startProxy(t, api)
  await eventually(async () => (await ready(proxy)).body.reasons?.every((r) => !/not synced/.test(r)) ?? false, 'synced')
  const empty = await ready(proxy)
  t.equal(empty.status, 503, 'synced, but no source at all: not ready')
  t.match(empty.body.reasons, [/no registry source is configured/])
  api.putSecret(registrySecret({ address: 'registry.example.com', path: 'deckhouse/ee' }))
  await eventually(async () => (await ready(proxy)).status === 200, 'ready once the Secret exists')
})

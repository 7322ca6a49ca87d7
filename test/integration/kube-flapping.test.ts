/**
 * The Kubernetes API flapping while packages are being served: watches cut, failing, answered
 * with 410 Gone, garbage on the stream, the API server gone altogether and back, over and over.
 * Covered elsewhere, one fault at a time and without traffic: the informer's restarts, backoff
 * and re-lists (test/plugins/credentials/kubernetes-source.test.ts), one outage through the
 * server (test/integration/kubernetes-credentials.test.ts). Here: through all of it, every package request is served
 * byte-exact, /readyz never leaves 200, and a change made mid-flap still arrives.
 */
import { join } from 'node:path'
import { pino } from 'pino'
import t from 'tap'
import { createServer } from '../../server.js'
import { FakeKubeApi, b64, moduleSource, registrySecret } from '../fixtures/fake-kube-api.js'
import { eventually } from '../fixtures/eventually.js'
import { FakeRegistry, type FakeImage } from '../fixtures/fake-registry.js'
import { bytes, packageUrl } from '../fixtures/proxy-harness.js'

const TOKEN = 'sa-token-flap'
const PASSWORD = 'flap-pull-secret'

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms))

void t.test('an API server that keeps flapping: packages and readiness are unaffected, and changes still arrive', async (t) => {
  const registry = await FakeRegistry.start({ auth: { kind: 'basic', username: 'puller', password: PASSWORD } })
  t.teardown(() => registry.close())
  const cfg = b64(JSON.stringify({ auths: { [registry.host]: { auth: b64(`puller:${PASSWORD}`) } } }))
  const base = registry.addImage('deckhouse/ce/pkg', [bytes(8192, 1)])
  const module = registry.addImage('modules/example/pkg', [bytes(4096, 2)])
  const late = registry.addImage('modules/late/pkg', [bytes(2048, 3)])
  // A fresh cold package for every other request: fills go on throughout the flapping.
  const cold: FakeImage[] = Array.from({ length: 200 }, (_, i) => registry.addImage('deckhouse/ce/cold', [bytes(3000 + i, 100 + i)]))

  const api = await FakeKubeApi.start()
  t.teardown(() => api.close())
  api.putSecret(
    registrySecret({
      address: registry.host,
      path: '/deckhouse/ce',
      scheme: 'http',
      dockerconfigjson: JSON.stringify({ auths: { [registry.host]: { auth: b64(`puller:${PASSWORD}`) } } }),
    }),
  )
  api.putModuleSource(moduleSource('example', { repo: `${registry.host}/modules/example`, scheme: 'http', dockerCfg: cfg }))

  const dir = t.testdir()
  const proxy = await createServer({
    cacheDirectory: join(dir, 'cache'),
    limitBytes: 64 * 1024 * 1024,
    kubeconfig: api.writeKubeconfig(dir, TOKEN),
    logger: pino({ level: 'silent' }),
    env: {},
    collectDefaultMetrics: false,
    timeouts: { connectMs: 2000, headersMs: 5000, idleMs: 5000 },
    flushIntervalMs: 60_000,
  })
  t.teardown(() => proxy.server.stop({ timeout: 2000 }))
  await eventually(async () => (await proxy.server.inject('/readyz')).statusCode === 200, 'ready', { timeoutMs: 15_000 })
  // The Secret, the ModuleSources and the PackageRepositories.
  await eventually(() => api.openWatches() === 3, 'all three watches open')

  // Traffic for as long as the flapping lasts: a default-source hit, a module-source hit, a cold
  // package and a readiness probe per turn.
  const failures: string[] = []
  let requests = 0
  let probes = 0
  let stop = false
  const traffic = (async () => {
    for (let i = 0; !stop; i++) {
      // Cold packages while they last, then the same (by then cached) ones again.
      const img = cold[i % cold.length] as FakeImage
      const [a, b, c, r] = await Promise.all([
        proxy.server.inject(packageUrl({ digest: base.manifestDigest, path: 'pkg' })),
        proxy.server.inject(packageUrl({ digest: module.manifestDigest, repository: `${registry.host}/modules/example`, path: 'pkg' })),
        proxy.server.inject(packageUrl({ digest: img.manifestDigest, path: 'cold' })),
        proxy.server.inject('/readyz'),
      ])
      requests += 3
      probes++
      if (a.statusCode !== 200 || !a.rawPayload.equals(base.lastLayer.data)) failures.push(`default: ${a.statusCode}`)
      if (b.statusCode !== 200 || !b.rawPayload.equals(module.lastLayer.data)) failures.push(`module: ${b.statusCode}`)
      if (c.statusCode !== 200 || !c.rawPayload.equals(img.lastLayer.data)) failures.push(`cold ${i}: ${c.statusCode}`)
      if (r.statusCode !== 200) failures.push(`readyz: ${r.statusCode} ${r.payload}`)
      await sleep(50)
    }
  })()

  const port = api.port
  // Each fault lands before the informers' failure count resets (a watch stable for 10 s), so
  // their backoff grows as designed (0.5 s doubling): the flapping runs on the real timings.
  const started = Date.now()
  const stages: string[] = []
  const reopened = async (what: string): Promise<void> => {
    await eventually(() => api.openWatches() === 3, `watches open again after ${what}`, { timeoutMs: 60_000 })
    stages.push(`${what} ${((Date.now() - started) / 1000).toFixed(1)} s`)
  }
  api.dropWatches('destroy')
  await reopened('a cut')
  // Watches fail with 500 for a while.
  api.watchStatus = 500
  api.dropWatches('destroy')
  await sleep(1000)
  api.watchStatus = undefined
  await reopened('watch errors')
  // 410 Gone: the informers re-list.
  api.goneOnNextWatch = 'http'
  api.dropWatches('destroy')
  await reopened('410 Gone')
  // The whole API server goes away and comes back on the same port; a ModuleSource added
  // meanwhile (stored, not delivered) must arrive after the reconnect.
  await api.close()
  api.putModuleSource(moduleSource('late', { repo: `${registry.host}/modules/late`, scheme: 'http', dockerCfg: cfg }))
  await sleep(1000)
  await api.listen(port)
  await reopened('an outage')
  // Garbage on the stream, then a clean end of it (after the 1 s a watch must last for its end
  // to count as the API server's routine timeout rather than a failure).
  api.sendGarbage()
  await sleep(1500)
  api.dropWatches('end')
  await reopened('garbage and a clean end')
  t.comment(`watches re-opened after: ${stages.join(', ')}`)

  await eventually(
    async () =>
      (await proxy.server.inject(packageUrl({ digest: late.manifestDigest, repository: `${registry.host}/modules/late`, path: 'pkg' }))).statusCode === 200,
    'the ModuleSource added during the outage serves',
    { timeoutMs: 40_000 },
  )
  stop = true
  await traffic
  t.same(failures.slice(0, 10), [], `${requests} package requests and ${probes} readiness probes during the flapping, none failed`)
  t.ok(probes >= 10, 'the traffic really ran alongside')
  const metrics = (await proxy.server.inject('/metrics')).payload
  const restarts = [...metrics.matchAll(/^registry_packages_proxy_source_watch_restarts_total\{provider="(?:secret|modulesources)"\} (\d+)$/gm)].map((m) =>
    Number(m[1]),
  )
  t.ok(restarts.reduce((a, b) => a + b, 0) >= 8, `the informers restarted ${restarts.join(' + ')} times`)
  // Backoff, not a tight loop: a handful of LISTs and WATCHes per fault, not hundreds.
  const calls = api.counts.list.secrets + api.counts.list.modulesources + api.counts.watch.secrets + api.counts.watch.modulesources
  t.ok(calls < 120, `${calls} LIST/WATCH calls in all`)
})

/**
 * PackageRepositories from the fake API server: watched like ModuleSources, credentials from
 * login/password, 503 before the first list, 404 once deleted, and readiness never held up.
 */
import { join } from 'node:path'
import { pino } from 'pino'
import t, { type Test } from 'tap'
import { createServer, type ProxyServer } from '../../../server.js'
import { FakeKubeApi, packageRepository, registrySecret } from '../../fixtures/fake-kube-api.js'
import { eventually } from '../../fixtures/eventually.js'
import { FakeRegistry } from '../../fixtures/fake-registry.js'
import { layerTarGz } from '../../fixtures/layers.js'

const ICON = '/v1/packages/main/fox/metadata/icon'

async function start(t: Test, api: FakeKubeApi): Promise<ProxyServer> {
  const dir = t.testdir()
  const proxy = await createServer({
    cacheDirectory: join(dir, 'cache'),
    limitBytes: 2 ** 20,
    kubeconfig: api.writeKubeconfig(dir, 'token'),
    logger: pino({ level: 'silent' }),
    collectDefaultMetrics: false,
    env: {},
    tagTtlMs: 0,
  })
  await proxy.server.start()
  t.teardown(() => proxy.server.stop())
  return proxy
}

void t.test('an icon from a watched PackageRepository with login/password; 503 before the first list, 404 after delete', async (t) => {
  const registry = await FakeRegistry.start({ auth: { kind: 'basic', username: 'reader', password: 'pw' } })
  t.teardown(() => registry.close())
  const image = registry.addImage('pkgs/fox/version', [await layerTarGz([{ name: 'docs/icon.png', data: 'png' }])])
  registry.tag('pkgs/fox/version', 'v1.0.0', image.manifestDigest)
  const api = await FakeKubeApi.start()
  t.teardown(() => api.close())
  api.putSecret(registrySecret({ address: registry.host, path: '/deckhouse/ce', scheme: 'http' }))
  // Every list fails at first: nothing is known yet (the informer retries with backoff).
  api.listStatus = 500
  const proxy = await start(t, api)
  await eventually(() => api.counts.list.packagerepositories > 0, 'the PackageRepositories were asked for')
  const early = await proxy.server.inject(ICON)
  t.equal(early.statusCode, 503, 'not known yet is not "unknown"')
  t.equal(early.headers['retry-after'], '5')
  t.equal(registry.counts.total, 0)

  api.putPackageRepository(packageRepository('main', { repo: `${registry.host}/pkgs`, scheme: 'http', login: 'reader', password: 'pw' }))
  api.putPackageRepository(packageRepository('broken', { repo: 'not a repo' }))
  api.listStatus = undefined
  await eventually(async () => (await proxy.server.inject(ICON)).statusCode === 200, 'the icon is served once listed', { timeoutMs: 20_000 })
  const res = await proxy.server.inject(ICON)
  t.equal(res.payload, 'png')
  t.equal((await proxy.server.inject('/v1/packages/broken/fox/metadata/icon')).statusCode, 404, 'a malformed one is skipped')

  api.delete('packagerepositories', 'main')
  await eventually(async () => (await proxy.server.inject(ICON)).statusCode === 404, 'a deleted repository is gone')
})

void t.test('a cluster without the PackageRepository CRD is still ready for /package', async (t) => {
  const api = await FakeKubeApi.start()
  t.teardown(() => api.close())
  api.putSecret(registrySecret({ address: '127.0.0.1:5000', path: '/deckhouse/ce', scheme: 'http' }))
  api.missing.add('packagerepositories')
  const proxy = await start(t, api)
  await eventually(async () => (await proxy.server.inject('/readyz')).statusCode === 200, 'ready without PackageRepositories')
  t.equal((await proxy.server.inject(ICON)).statusCode, 503, 'icons wait for the watch instead')
})

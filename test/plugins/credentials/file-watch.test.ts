import { renameSync, rmSync, symlinkSync, writeFileSync, mkdirSync } from 'node:fs'
import { join } from 'node:path'
import { pino } from 'pino'
import t, { type Test } from 'tap'
import type { CredentialsApi } from '../../../plugins/credentials/index.js'
import { createServer } from '../../../server.js'
import { providerMetric, startCredentialsPlugin, type CredentialsPlugin } from '../../fixtures/credentials-plugin.js'
import { FakeKubeApi, b64, moduleSource, registrySecret } from '../../fixtures/fake-kube-api.js'
import { eventually } from '../../fixtures/eventually.js'

const PASSWORD = 'file-secret-31f8'

const config = (defaultPath: string, modules: Array<{ name: string; repo: string }> = []): string =>
  JSON.stringify({
    default: {
      address: 'registry.example.com',
      path: defaultPath,
      dockerConfigJson: JSON.stringify({ auths: { 'registry.example.com': { username: 'u', password: PASSWORD } } }),
    },
    moduleSources: modules,
  })

interface Started extends CredentialsPlugin {
  repositories: () => string[]
}

async function startPlugin(t: Test, path: string, extra: { kubeconfig?: string } = {}): Promise<Started> {
  const s = await startCredentialsPlugin(t, {
    registryConfig: path,
    fileIntervalMs: 25,
    env: {},
    kubernetesTiming: { initialBackoffMs: 20, maxBackoffMs: 200 },
    ...extra,
  })
  return {
    ...s,
    repositories: () =>
      s.sources
        .all()
        .map((source) => source.repository)
        .sort(),
  }
}

void t.test('the file is re-read when it changes: in place, by rename-replace, and by a symlink swap', async (t) => {
  const dir = t.testdir({ 'registry.json': config('/a') })
  const path = join(dir, 'registry.json')
  const s = await startPlugin(t, path)
  t.same(s.repositories(), ['registry.example.com/a'], 'read at start')
  t.same(s.sources.unsynced(), [])

  writeFileSync(path, config('/b'))
  await eventually(() => s.repositories().join() === 'registry.example.com/b', 'in-place write picked up')

  // Editors write a temp file and rename it over the original (a new inode).
  writeFileSync(join(dir, '.registry.json.tmp'), config('/c', [{ name: 'm', repo: 'modules.example.com/m' }]))
  renameSync(join(dir, '.registry.json.tmp'), path)
  await eventually(() => s.repositories().join() === 'modules.example.com/m,registry.example.com/c', 'rename-replace picked up')
  t.match(s.logs.find(/registry config reloaded/).at(-1), { sources: [{ repository: 'registry.example.com/c' }, { repository: 'modules.example.com/m' }] })
  t.notOk(s.logs.text.includes(PASSWORD), 'no secret in the logs')
})

void t.test('a ConfigMap-style symlink swap is picked up', async (t) => {
  const dir = t.testdir()
  mkdirSync(join(dir, 'v1'))
  mkdirSync(join(dir, 'v2'))
  writeFileSync(join(dir, 'v1', 'registry.json'), config('/one'))
  writeFileSync(join(dir, 'v2', 'registry.json'), config('/two'))
  symlinkSync('v1', join(dir, '..data'))
  symlinkSync(join('..data', 'registry.json'), join(dir, 'registry.json'))
  const s = await startPlugin(t, join(dir, 'registry.json'))
  t.same(s.repositories(), ['registry.example.com/one'])
  symlinkSync('v2', join(dir, '..data_tmp'))
  renameSync(join(dir, '..data_tmp'), join(dir, '..data'))
  await eventually(() => s.repositories().join() === 'registry.example.com/two', 'symlink swap picked up')
})

void t.test('a bad new version keeps the old sources, with a log line and a metric; fixing it applies', async (t) => {
  const dir = t.testdir({ 'registry.json': config('/good') })
  const path = join(dir, 'registry.json')
  const s = await startPlugin(t, path)
  writeFileSync(path, `{"default": {"address": "registry.example.com", "dockerConfigJson": "{${PASSWORD}"`)
  await eventually(() => s.logs.find(/rejected/).length === 1, 'bad JSON rejected')
  t.match(s.logs.find(/rejected/)[0], { err: { message: /not valid JSON/ } })
  t.same(s.repositories(), ['registry.example.com/good'], 'old sources kept')
  writeFileSync(path, JSON.stringify({ default: { address: 'registry.example.com', ca: '-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----' } }))
  await eventually(() => s.logs.find(/rejected/).length === 2, 'bad PEM rejected')
  t.equal(await providerMetric(s.metrics, 'registry_packages_proxy_source_errors_total', 'file'), 2)
  t.same(s.repositories(), ['registry.example.com/good'])

  // Wait out a few polls on the unchanged bad file, then remove it.
  const polls = Date.now()
  await eventually(() => Date.now() - polls > 200, 'eight poll intervals')
  t.equal(s.logs.find(/rejected/).length, 2, 'an unchanged bad file is not re-parsed every poll')
  rmSync(path)
  await eventually(() => s.logs.find(/cannot be read/).length === 1, 'missing file noticed')
  t.equal(await providerMetric(s.metrics, 'registry_packages_proxy_source_errors_total', 'file'), 3, 'an unreadable file counts once')
  t.same(s.repositories(), ['registry.example.com/good'], 'a deleted file changes nothing')
  writeFileSync(path, config('/fixed'))
  await eventually(() => s.repositories().join() === 'registry.example.com/fixed', 'fixed file applied')
  t.same(s.sources.unsynced(), [])
  t.notOk(s.logs.text.includes(PASSWORD), 'no secret in the logs, even from a JSON syntax error')
})

void t.test('reloadFile (what SIGHUP calls) re-reads at once', async (t) => {
  const dir = t.testdir({ 'registry.json': config('/a') })
  const path = join(dir, 'registry.json')
  // A poll interval too long to matter: only the explicit reload can apply the change.
  const { sources, credentials: api } = await startCredentialsPlugin(t, { registryConfig: path, fileIntervalMs: 3_600_000, env: {} })
  writeFileSync(path, config('/b'))
  t.equal(await api.reloadFile('SIGHUP'), true, 'new sources applied')
  t.same(
    sources.all().map((s) => s.repository),
    ['registry.example.com/b'],
  )
  t.equal(await api.reloadFile('SIGHUP'), false, 'unchanged: nothing to apply')
  writeFileSync(path, '{')
  t.equal(await api.reloadFile('SIGHUP'), false, 'invalid: rejected')
  t.same(
    sources.all().map((s) => s.repository),
    ['registry.example.com/b'],
  )
})

void t.test('the file and Kubernetes together: readiness waits for all, each provider keeps its own sources', async (t) => {
  const dir = t.testdir({ 'registry.json': config('/from-file', [{ name: 'file-mod', repo: 'modules.example.com/file' }]) })
  const api = await FakeKubeApi.start()
  t.teardown(() => api.close())
  api.listDelayMs = 300
  api.putModuleSource(moduleSource('kube-mod', { repo: 'modules.example.com/kube', dockerCfg: b64(JSON.stringify({ auths: {} })) }))
  api.putSecret(registrySecret({ address: 'other.example.com', path: 'x' }))
  const proxy = await createServer({
    cacheDirectory: join(dir, 'cache'),
    limitBytes: 1024 * 1024,
    registryConfig: join(dir, 'registry.json'),
    kubeconfig: api.writeKubeconfig(dir, 'tok'),
    logger: pino({ level: 'silent' }),
    env: {},
    collectDefaultMetrics: false,
    flushIntervalMs: 60_000,
  })
  t.teardown(() => proxy.server.stop({ timeout: 2000 }))
  const first = await proxy.server.inject('/readyz')
  t.equal(first.statusCode, 503, 'the file alone does not make it ready')
  t.match(first.payload, /not synced yet: .*secret/)
  await eventually(async () => (await proxy.server.inject('/readyz')).statusCode === 200, 'ready')
  const repos = (): string[] =>
    proxy.sources
      .all()
      .map((s) => `${s.name}:${s.repository}`)
      .sort()
  t.same(repos(), [
    'default:other.example.com/x',
    'default:registry.example.com/from-file',
    'file-mod:modules.example.com/file',
    'kube-mod:modules.example.com/kube',
  ])
  t.equal(proxy.sources.match('modules.example.com/kube').name, 'kube-mod')
  t.equal(proxy.sources.match('modules.example.com/file').name, 'file-mod')
  t.equal(proxy.sources.match('other.example.com/x').repository, 'other.example.com/x', 'each default is reachable by its repository')

  // A file change leaves the Kubernetes sources alone, and the other way round.
  writeFileSync(join(dir, 'registry.json'), config('/from-file-2'))
  const reload = (proxy.server.plugins as unknown as { credentials: { api: CredentialsApi } }).credentials.api
  t.equal(await reload.reloadFile('SIGHUP'), true)
  t.same(repos(), ['default:other.example.com/x', 'default:registry.example.com/from-file-2', 'kube-mod:modules.example.com/kube'])
  api.deleteModuleSource('kube-mod')
  await eventually(() => !repos().includes('kube-mod:modules.example.com/kube'), 'ModuleSource deleted')
  t.same(repos(), ['default:other.example.com/x', 'default:registry.example.com/from-file-2'])
})

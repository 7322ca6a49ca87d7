import { mkdirSync, readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import Hapi from '@hapi/hapi'
import { pino } from 'pino'
import t from 'tap'
import { credentialsPlugin } from '../../../plugins/credentials/index.js'
import { loadKubeConfig } from '../../../plugins/credentials/kube-config.js'
import { SourceSet } from '../../../plugins/credentials/source-set.js'
import { Metrics } from '../../../plugins/metrics/metrics.js'
import { startCredentialsPlugin } from '../../fixtures/credentials-plugin.js'
import { selfSignedCert } from '../../fixtures/self-signed.js'
import { FakeKubeApi, moduleSource, registrySecret } from '../../fixtures/fake-kube-api.js'
import { eventually } from '../../fixtures/eventually.js'

const TOKEN = 'kubeconfig-token-e2a1'

void t.test('no --kubeconfig and not in a pod: no Kubernetes provider', async (t) => {
  const dir = t.testdir({ sa: { token: 'x' } })
  t.equal(await loadKubeConfig({ env: {} }), undefined, 'no service host')
  t.equal(
    await loadKubeConfig({ env: { KUBERNETES_SERVICE_HOST: '10.0.0.1', KUBERNETES_SERVICE_PORT: '443' }, serviceAccountDir: join(dir, 'none') }),
    undefined,
    'no token file',
  )
  const inPod = await loadKubeConfig({ env: { KUBERNETES_SERVICE_HOST: '10.0.0.1', KUBERNETES_SERVICE_PORT: '6443' }, serviceAccountDir: join(dir, 'sa') })
  t.equal(inPod?.getCurrentCluster()?.server, 'https://10.0.0.1:6443', 'in a pod: the service address')
  t.equal(inPod?.getCurrentCluster()?.caFile, join(dir, 'sa', 'ca.crt'))
  const http = await loadKubeConfig({ env: { KUBERNETES_SERVICE_HOST: '10.0.0.1', KUBERNETES_SERVICE_PORT: '8080' }, serviceAccountDir: join(dir, 'sa') })
  t.match(http?.getCurrentCluster(), { server: 'http://10.0.0.1:8080', skipTLSVerify: true }, 'an insecure port: plain HTTP, as client-node does')
  const v6 = await loadKubeConfig({ env: { KUBERNETES_SERVICE_HOST: 'fd00::1', KUBERNETES_SERVICE_PORT: '443' }, serviceAccountDir: join(dir, 'sa') })
  t.equal(v6?.getCurrentCluster()?.server, 'https://[fd00::1]:443')

  // The plugin alone: only the file provider (none here), nothing expected.
  const { sources } = await startCredentialsPlugin(t, { env: {} })
  t.same(sources.unsynced(), [], 'no provider to wait for')
})

void t.test('a bad --kubeconfig fails start-up with a message that names it and quotes nothing', async (t) => {
  const dir = t.testdir({
    'not-yaml.yaml': `clusters: [ {{ token: ${TOKEN}`,
    'no-context.yaml': 'apiVersion: v1\nkind: Config\nclusters: []\nusers: []\ncontexts: []\n',
    'ftp.yaml': [
      'apiVersion: v1',
      'clusters: [{name: c, cluster: {server: "ftp://127.0.0.1:1"}}]',
      `users: [{name: u, user: {token: ${TOKEN}}}]`,
      'contexts: [{name: x, context: {cluster: c, user: u}}]',
      'current-context: x',
    ].join('\n'),
  })
  const cases: Array<[string, RegExp]> = [
    ['missing.yaml', /--kubeconfig .*missing\.yaml: cannot read \(ENOENT\)/],
    ['not-yaml.yaml', /--kubeconfig .*not-yaml\.yaml: not a valid kubeconfig \(YAML does not parse\)/],
    ['no-context.yaml', /no current-context naming a cluster/],
    ['ftp.yaml', /cluster server must be an http\(s\) URL/],
  ]
  for (const [file, message] of cases) {
    const err = await loadKubeConfig({ kubeconfig: join(dir, file), env: {} }).then(
      () => new Error('expected a rejection'),
      (e: unknown) => e as Error & { code?: string },
    )
    t.equal((err as { code?: string }).code, 'ESOURCE', file)
    t.match(err.message, message, file)
    t.notMatch(err.message, TOKEN, `${file}: no token in the message`)
  }
  const server = Hapi.server()
  await t.rejects(
    server.register({
      plugin: credentialsPlugin,
      options: {
        sources: new SourceSet(),
        metrics: new Metrics({ collectDefaults: false }),
        log: pino({ level: 'silent' }),
        kubeconfig: join(dir, 'ftp.yaml'),
      },
    }),
    { code: 'ESOURCE' },
    'registration fails: main prints it and exits 2',
  )
})

void t.test('in a pod: the service-account token over HTTPS to the service address', async (t) => {
  const dir = t.testdir()
  const tls = selfSignedCert(t, dir, 'kubernetes', 'the in-cluster TLS test')
  if (tls === undefined) return
  const api = await FakeKubeApi.start(0, tls)
  t.teardown(() => api.close())
  api.putSecret(registrySecret({ address: 'registry.example.com', path: 'deckhouse/ce' }))
  api.putModuleSource(moduleSource('m', { repo: 'modules.example.com/m' }))
  const sa = join(dir, 'serviceaccount')
  mkdirSync(sa)
  writeFileSync(join(sa, 'token'), 'projected-sa-token')
  writeFileSync(join(sa, 'ca.crt'), tls.cert)

  const { sources } = await startCredentialsPlugin(t, {
    env: { KUBERNETES_SERVICE_HOST: '127.0.0.1', KUBERNETES_SERVICE_PORT: String(api.port) },
    serviceAccountDir: sa,
    kubernetesTiming: { initialBackoffMs: 20, maxBackoffMs: 200 },
  })
  await eventually(() => sources.unsynced().length === 0, 'synced in-cluster')
  t.same(
    sources
      .all()
      .map((s) => s.repository)
      .sort(),
    ['modules.example.com/m', 'registry.example.com/deckhouse/ce'],
  )
  t.ok(api.requests.length >= 2)
  t.ok(
    api.requests.every((r) => r.headers.authorization === 'Bearer projected-sa-token'),
    'the service-account token is sent',
  )
})

void t.test('a --kubeconfig with a token user, over HTTPS with its CA', async (t) => {
  const dir = t.testdir()
  const tls = selfSignedCert(t, dir, 'kubernetes', 'the TLS kubeconfig test')
  if (tls === undefined) return
  const api = await FakeKubeApi.start(0, tls)
  t.teardown(() => api.close())
  api.putSecret(registrySecret({ address: 'registry.example.com' }))
  const { sources } = await startCredentialsPlugin(t, { kubeconfig: api.writeKubeconfig(dir, TOKEN), env: {} })
  await eventually(() => sources.unsynced().length === 0, 'synced')
  t.same(
    sources.all().map((s) => s.repository),
    ['registry.example.com'],
  )
  t.ok(api.requests.every((r) => r.headers.authorization === `Bearer ${TOKEN}`))
})

void t.test('a --kubeconfig with an http:// server works as kubectl treats it, insecure-skip-tls-verify or not', async (t) => {
  for (const skipTlsVerify of [false, true]) {
    const api = await FakeKubeApi.start()
    t.teardown(() => api.close())
    api.putSecret(registrySecret({ address: `plain-${String(skipTlsVerify)}.example.com` }))
    const dir = t.testdir()
    const kubeconfig = api.writeKubeconfig(dir, TOKEN, 'kubeconfig.yaml', skipTlsVerify)
    t.equal(readFileSync(kubeconfig, 'utf8').includes('insecure-skip-tls-verify'), skipTlsVerify, 'the kubeconfig is as kubectl proxy users write it')
    const { sources } = await startCredentialsPlugin(t, { kubeconfig, env: {}, kubernetesTiming: { initialBackoffMs: 20, maxBackoffMs: 200 } })
    await eventually(() => sources.unsynced().length === 0, `synced over plain http (insecure-skip-tls-verify: ${String(skipTlsVerify)})`)
    t.same(
      sources.all().map((s) => s.repository),
      [`plain-${String(skipTlsVerify)}.example.com`],
    )
    t.ok(
      api.requests.every((r) => r.headers.authorization === `Bearer ${TOKEN}`),
      'with its token',
    )
  }
})

/**
 * RBAC against the code: the server runs with a kubeconfig against the fake API server, with
 * peer fill from the pods as in a pod, through a first sync, a dropped watch and a 410 Gone
 * re-list. Every request it made is turned into the attributes the API server would authorize,
 * and the pod's ServiceAccount must be allowed each, and granted nothing more, apart from
 * kube-rbac-proxy's TokenReviews and SubjectAccessReviews (the sidecar's calls, which no test
 * here can observe) and the calls one proxy makes to the others through their kube-rbac-proxy
 * (authorized by the config's SubjectAccessReview attributes for the paths peers call).
 */
import { join } from 'node:path'
import { pino } from 'pino'
import t from 'tap'
import { createServer } from '../../server.js'
import { FakeKubeApi, moduleSource, proxyPod, registrySecret } from '../fixtures/fake-kube-api.js'
import { eventually } from '../fixtures/eventually.js'
import { makeCa } from '../fixtures/peer-tls.js'
import { rbacProxyConfig, reviewAttributes, routeRequest } from '../fixtures/infra/kube-rbac-proxy.js'
import { cloneManifests, loadManifests, NAMESPACE, SERVICE_ACCOUNT, type Manifests, type Role } from '../fixtures/infra/manifests.js'
import { allows, describe, grantsFor, requestAttributes, surplus, type Attributes } from '../fixtures/infra/rbac.js'

/** What kube-rbac-proxy calls: authenticate a bearer token, authorize a request. */
const KUBE_RBAC_PROXY_CALLS: readonly Attributes[] = [
  { verb: 'create', apiGroup: 'authentication.k8s.io', resource: 'tokenreviews' },
  { verb: 'create', apiGroup: 'authorization.k8s.io', resource: 'subjectaccessreviews' },
]

/**
 * Granted but never called: Deckhouse unmasks the credential fields of ModuleSources and
 * PackageRepositories only for a caller that may get their /sensitive subresource.
 */
const UNMASKING_GRANTS: readonly Attributes[] = [
  { verb: 'get', apiGroup: 'deckhouse.io', resource: 'modulesources/sensitive' },
  { verb: 'get', apiGroup: 'deckhouse.io', resource: 'packagerepositories/sensitive' },
]

const POD_ACCOUNT = { kind: 'ServiceAccount', name: SERVICE_ACCOUNT, namespace: NAMESPACE }

/** What a proxy asks of its peers' kube-rbac-proxy (plugins/peers/peer-client.ts): the layer and a manifest. */
function peerCalls(m: Manifests): Attributes[] {
  const config = rbacProxyConfig(m)
  return ['/package', `/peers/manifests/sha256:${'0'.repeat(64)}`].map((path) => {
    const route = routeRequest(config, path)
    const review = route && reviewAttributes(route.upstream, 'GET')
    if (!review) throw new Error(`kube-rbac-proxy does not authorize GET ${path}`)
    return review
  })
}

function uniqueCalls(calls: readonly Attributes[]): Attributes[] {
  const seen = new Map<string, Attributes>()
  for (const c of calls) seen.set(JSON.stringify(c), c)
  return [...seen.values()]
}

function role(m: Manifests, kind: string, name: string): Role {
  const found = m.objects.find((o) => o.object.kind === kind && o.object.metadata.name === name)?.object
  if (!found) throw new Error(`no ${kind} ${name}`)
  return found as Role
}

void t.test("the pod's ServiceAccount may make every call the code makes, and no other", async (t) => {
  const api = await FakeKubeApi.start()
  t.teardown(() => api.close())
  api.putSecret(registrySecret({ address: '127.0.0.1:5000', path: '/deckhouse/ce', scheme: 'http' }))
  api.putModuleSource(moduleSource('example', { repo: '127.0.0.1:5000/modules/example', scheme: 'http' }))
  api.put('pods', proxyPod('self', '127.0.0.1'))
  const dir = t.testdir()
  const ca = await makeCa(dir, 'peers-ca')
  // Initializing the server starts the informers (onPreStart); no listener is needed.
  const proxy = await createServer({
    cacheDirectory: join(dir, 'cache'),
    limitBytes: 2 ** 20,
    kubeconfig: api.writeKubeconfig(dir, 'rbac-test-token'),
    logger: pino({ level: 'silent' }),
    collectDefaultMetrics: false,
    env: { POD_NAMESPACE: NAMESPACE, POD_IP: '127.0.0.1' },
    kubePeers: { caFile: ca.certPath, timing: { initialBackoffMs: 20 } },
  })
  t.teardown(() => proxy.server.stop())
  const allWatch = (): boolean => (['secrets', 'modulesources', 'packagerepositories', 'pods'] as const).every((r) => api.openWatches(r) > 0)
  await eventually(allWatch, 'all four informers watch')
  t.equal((await proxy.server.inject('/readyz')).statusCode, 200, 'ready once both synced')

  // The restart paths must not need more: a dropped connection (resume the watch) and 410 Gone
  // (list again).
  // The 410 lands on whichever of the four informers watches first: count all four.
  const relists = (): number => api.counts.list.secrets + api.counts.list.modulesources + api.counts.list.packagerepositories + api.counts.list.pods
  const lists = relists()
  api.goneOnNextWatch = 'http'
  api.dropWatches('destroy')
  await eventually(() => relists() > lists && allWatch(), 'all four informers watch again after a re-list')

  const calls = uniqueCalls(api.requests.map((r) => requestAttributes(r.method, r.path, r.query)))
  t.comment(`calls made: ${calls.map(describe).join('; ')}`)
  t.ok(calls.some((c) => c.verb === 'watch') && calls.some((c) => c.verb === 'list'), 'lists and watches were observed')
  const m = loadManifests()
  const grants = grantsFor(m, POD_ACCOUNT)
  t.ok(
    calls.some((c) => c.verb === 'watch' && c.resource === 'packagerepositories'),
    'PackageRepositories are watched',
  )
  t.ok(
    calls.some((c) => c.verb === 'watch' && c.resource === 'pods' && c.namespace === NAMESPACE),
    'the pods of its namespace are watched (peer fill)',
  )
  const peers = peerCalls(m)
  t.same(
    peers.map(describe),
    [1, 2].map(() => `get apps/deployments/http in ${NAMESPACE} named registry-packages-proxy`),
    'peers are called as deployments/http',
  )
  for (const call of [...calls, ...KUBE_RBAC_PROXY_CALLS, ...UNMASKING_GRANTS, ...peers]) t.ok(allows(grants, call), `allowed: ${describe(call)}`)
  t.same(surplus(grants, [...calls, ...KUBE_RBAC_PROXY_CALLS, ...UNMASKING_GRANTS, ...peers]), [], 'nothing granted beyond those calls')

  // Each would be noticed: a verb taken away, a verb or a Secret too many, a call without the
  // field selector that lets a resourceNames Role allow it.
  const noWatch = cloneManifests(m)
  role(noWatch, 'ClusterRole', 'd8:registry-packages-proxy').rules.forEach((r) => (r.verbs = r.verbs.filter((v) => v !== 'watch')))
  const watchModuleSources = calls.find((c) => c.verb === 'watch' && c.resource === 'modulesources')
  t.ok(watchModuleSources && !allows(grantsFor(noWatch, POD_ACCOUNT), watchModuleSources), 'a ClusterRole without watch fails the watch')
  const withGet = cloneManifests(m)
  role(withGet, 'Role', 'registry-packages-proxy').rules.forEach((r) => r.verbs.push('get'))
  t.match(surplus(grantsFor(withGet, POD_ACCOUNT), [...calls, ...KUBE_RBAC_PROXY_CALLS, ...UNMASKING_GRANTS, ...peers]), [
    /grants get core\/secrets in d8-system, which nothing calls/,
  ])
  const everySecret = cloneManifests(m)
  role(everySecret, 'Role', 'registry-packages-proxy').rules.forEach((r) => delete r.resourceNames)
  t.match(surplus(grantsFor(everySecret, POD_ACCOUNT), [...calls, ...KUBE_RBAC_PROXY_CALLS, ...UNMASKING_GRANTS, ...peers]), [
    /without resourceNames, but every call names deckhouse-registry/,
  ])
  // Peer fill needs both: without the pods Role the watch fails, without the http binding a
  // peer's kube-rbac-proxy answers 403.
  const noPods = cloneManifests(m)
  noPods.objects = noPods.objects.filter((o) => o.object.metadata.name !== 'registry-packages-proxy:peers')
  const watchPods = calls.find((c) => c.verb === 'watch' && c.resource === 'pods')
  t.ok(watchPods && !allows(grantsFor(noPods, POD_ACCOUNT), watchPods), 'without the peers Role the pods watch is refused')
  const noHttp = cloneManifests(m)
  for (const o of noHttp.objects) {
    const b = o.object as unknown as { kind: string; subjects?: Array<{ name: string }> }
    if (b.kind === 'RoleBinding' && o.object.metadata.name === 'access-to-registry-packages-proxy-http')
      b.subjects = (b.subjects ?? []).filter((x) => x.name !== SERVICE_ACCOUNT)
  }
  t.notOk(
    peers.every((p) => allows(grantsFor(noHttp, POD_ACCOUNT), p)),
    'without the http binding peers refuse each other',
  )
  const unfiltered = requestAttributes('GET', '/api/v1/namespaces/d8-system/secrets', {})
  t.notOk(allows(grants, unfiltered), 'a LIST of d8-system Secrets without the field selector is refused')
})

void t.test('requestAttributes follows the API server', (t) => {
  t.same(requestAttributes('GET', '/api/v1/namespaces/d8-system/secrets', { fieldSelector: 'metadata.name=deckhouse-registry', watch: 'true' }), {
    verb: 'watch',
    apiGroup: '',
    resource: 'secrets',
    namespace: 'd8-system',
    name: 'deckhouse-registry',
  })
  t.same(requestAttributes('GET', '/apis/deckhouse.io/v1alpha1/modulesources', {}), { verb: 'list', apiGroup: 'deckhouse.io', resource: 'modulesources' })
  t.same(requestAttributes('GET', '/apis/deckhouse.io/v1alpha1/modulesources/example', {}), {
    verb: 'get',
    apiGroup: 'deckhouse.io',
    resource: 'modulesources',
    name: 'example',
  })
  t.same(requestAttributes('GET', '/apis/apps/v1/namespaces/x/deployments/d/scale', {}), {
    verb: 'get',
    apiGroup: 'apps',
    resource: 'deployments/scale',
    namespace: 'x',
    name: 'd',
  })
  t.throws(() => requestAttributes('GET', '/healthz', {}), /not a resource path/)
  t.end()
})

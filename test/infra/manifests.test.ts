/**
 * infra/: every manifest parses and validates against the Kubernetes (and VPA, Prometheus
 * Operator) schemas, and the deployment's invariants hold against the real binary: its flags,
 * its route table, its drain time and the image's user. Each invariant is also run on a broken
 * copy of the manifests, to show it would catch that break.
 */
import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import { VerticalPodAutoscaler } from '@kubernetes-models/autoscaler/autoscaling.k8s.io/v1'
import { PodMonitor } from '@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1'
import { Deployment } from 'kubernetes-models/apps/v1'
import { PodDisruptionBudget } from 'kubernetes-models/policy/v1'
import { ClusterRole, ClusterRoleBinding, Role, RoleBinding } from 'kubernetes-models/rbac.authorization.k8s.io/v1'
import { Ingress } from 'kubernetes-models/networking.k8s.io/v1'
import { ConfigMap, Secret, Service, ServiceAccount } from 'kubernetes-models/v1'
import { pino } from 'pino'
import t from 'tap'
import { stringify } from 'yaml'
import { parseQuantity } from '../../config/quantity.js'
import { createServer } from '../../server.js'
import {
  checkBootstrap,
  checkCache,
  checkFlags,
  checkIngress,
  checkPlacement,
  checkProbes,
  checkRoutes,
  checkSecurity,
  checkWiring,
  minimumCacheVolume,
  type ServerRoute,
} from '../fixtures/infra/checks.js'
import { last, parseDockerfile } from '../fixtures/infra/dockerfile.js'
import { rbacProxyConfig, type RbacProxyConfig } from '../fixtures/infra/kube-rbac-proxy.js'
import {
  argValue,
  cloneManifests,
  container,
  deployment,
  loadManifests,
  PROXY_CONTAINER,
  RBAC_PROXY_CONTAINER,
  ROOT,
  type K8sObject,
  type Manifests,
} from '../fixtures/infra/manifests.js'

interface Validatable {
  validate(): void
}
type ModelClass = new (data: never) => Validatable

const MODELS: Record<string, ModelClass> = {
  'apps/v1 Deployment': Deployment,
  'v1 ServiceAccount': ServiceAccount,
  'v1 Secret': Secret,
  'v1 Service': Service,
  'v1 ConfigMap': ConfigMap,
  'networking.k8s.io/v1 Ingress': Ingress,
  'rbac.authorization.k8s.io/v1 Role': Role,
  'rbac.authorization.k8s.io/v1 RoleBinding': RoleBinding,
  'rbac.authorization.k8s.io/v1 ClusterRole': ClusterRole,
  'rbac.authorization.k8s.io/v1 ClusterRoleBinding': ClusterRoleBinding,
  'policy/v1 PodDisruptionBudget': PodDisruptionBudget,
  'autoscaling.k8s.io/v1 VerticalPodAutoscaler': VerticalPodAutoscaler,
  'monitoring.coreos.com/v1 PodMonitor': PodMonitor,
}

function validate(object: K8sObject): void {
  const Model = MODELS[`${object.apiVersion} ${object.kind}`]
  if (!Model) throw new Error(`no schema known for ${object.apiVersion} ${object.kind}`)
  new Model(structuredClone(object) as never).validate()
}

const manifests = loadManifests()

/** The pod's own account: it may fetch packages only for peer fill, through its binding. */
const POD_ACCOUNT = 'registry-packages-proxy'

/** Removes `account` from every RoleBinding of `m` that lets it GET /package. */
function unbindHttp(m: Manifests, account: string): void {
  for (const o of m.objects) {
    const b = o.object as K8sObject & { roleRef?: { name: string }; subjects?: Array<{ kind: string; name: string }> }
    if (o.object.kind === 'RoleBinding' && b.roleRef?.name === 'access-to-registry-packages-proxy-http') {
      b.subjects = (b.subjects ?? []).filter((s) => !(s.kind === 'ServiceAccount' && s.name === account))
    }
  }
}

/** The seconds main.ts waits for in-flight responses on SIGTERM. */
function drainSeconds(): number {
  const m = /const DRAIN_MS = ([\d_]+)/.exec(readFileSync(join(ROOT, 'main.ts'), 'utf8'))
  if (!m?.[1]) throw new Error('main.ts no longer declares DRAIN_MS: update this test')
  return Number(m[1].replace(/_/g, '')) / 1000
}

/** The image's numeric user, from the Dockerfile's runtime stage. */
function imageUser(): number {
  const stage = parseDockerfile(readFileSync(join(ROOT, 'Dockerfile'), 'utf8')).at(-1)
  const user = stage && last(stage, 'USER')?.args
  const uid = Number(user?.split(':')[0])
  if (!Number.isInteger(uid)) throw new Error(`the Dockerfile's USER ${user} is not numeric`)
  return uid
}

/** The server's route table, as the binary builds it. */
async function serverRoutes(dir: string): Promise<ServerRoute[]> {
  // With peer fill on, as in a pod: its routes must be routed and authorized as well.
  const proxy = await createServer({
    cacheDirectory: join(dir, 'cache'),
    limitBytes: 2 ** 20,
    logger: pino({ level: 'silent' }),
    collectDefaultMetrics: false,
    env: {},
    peers: { members: [] },
  })
  try {
    return proxy.server.table().map((r) => ({ method: r.method, path: r.path }))
  } finally {
    await proxy.server.stop()
  }
}

/** A copy of the manifests with `edit` applied. */
function broken(edit: (m: Manifests) => void): Manifests {
  const copy = cloneManifests(manifests)
  edit(copy)
  return copy
}

/** Edits the KUBE_RBAC_PROXY_CONFIG inside a (copied) Deployment. */
function editRbacProxyConfig(m: Manifests, edit: (c: RbacProxyConfig) => void): void {
  const config = rbacProxyConfig(m)
  edit(config)
  const env = container(m, RBAC_PROXY_CONTAINER).env?.find((e) => e.name === 'KUBE_RBAC_PROXY_CONFIG')
  if (env) env.value = stringify(config)
}

void t.test('every manifest parses and validates against its schema', (t) => {
  t.ok(manifests.objects.length >= 10, `${manifests.objects.length} objects`)
  t.equal(manifests.kustomization.apiVersion, 'kustomize.config.k8s.io/v1beta1')
  t.equal(manifests.kustomization.kind, 'Kustomization')
  for (const { file, object } of manifests.objects) {
    t.doesNotThrow(() => validate(object), `${file}: ${object.kind} ${object.metadata.name}`)
  }
  const config = rbacProxyConfig(manifests)
  t.ok(config.upstreams.length > 0, 'KUBE_RBAC_PROXY_CONFIG parses')
  // The schemas are really applied: a wrong type is caught.
  const bad = broken((m) => {
    ;(deployment(m).spec as { replicas: unknown }).replicas = 'three'
  })
  t.throws(() => validate(deployment(bad)), /replicas/)
  const badVpa = broken((m) => {
    const vpa = m.objects.find((o) => o.object.kind === 'VerticalPodAutoscaler')?.object as unknown as { spec: { updatePolicy: { updateMode: string } } }
    vpa.spec.updatePolicy.updateMode = 'Sometimes'
  })
  const vpa = badVpa.objects.find((o) => o.object.kind === 'VerticalPodAutoscaler')?.object
  t.throws(() => validate(vpa as K8sObject), /updateMode/)
  t.end()
})

void t.test('the proxy container passes only flags the binary accepts', (t) => {
  t.same(checkFlags(manifests), [])
  const unknown = broken((m) => container(m, PROXY_CONTAINER).args?.push('--cache-size=2Gi'))
  t.match(checkFlags(unknown), [/no flag --cache-size/])
  const badValue = broken((m) => container(m, PROXY_CONTAINER).args?.push('--log-level=verbose'))
  t.match(checkFlags(badValue), [/rejects the args: --log-level/])
  const kubeconfig = broken((m) => container(m, PROXY_CONTAINER).args?.push('--kubeconfig=/etc/kubeconfig'))
  t.match(checkFlags(kubeconfig), [/in-cluster/])
  const exposed = broken((m) => {
    const c = container(m, PROXY_CONTAINER)
    c.args = (c.args ?? []).map((a) => (a.startsWith('--listen-address=') ? '--listen-address=0.0.0.0:5080' : a))
  })
  t.match(checkFlags(exposed), [/bypasses kube-rbac-proxy/])
  t.end()
})

void t.test('the cache emptyDir limit sits above the retention size plus overshoot', (t) => {
  t.same(checkCache(manifests), [])
  const c = container(manifests, PROXY_CONTAINER)
  const retention = parseQuantity(argValue(c.args, 'cache-retention-size') ?? '')
  const volume = deployment(manifests).spec.template.spec.volumes?.find((v) => v.name === 'cache')
  const limit = parseQuantity(volume?.emptyDir?.sizeLimit ?? '')
  t.ok(limit > retention, 'sizeLimit > --cache-retention-size')
  t.comment(
    `retention ${retention} B, needed >= ${minimumCacheVolume(retention)} B, sizeLimit ${limit} B (headroom ${((limit / retention - 1) * 100).toFixed(0)}%)`,
  )
  // The old deployment's defect: a 1G (10^9 B) emptyDir under a 1Gi (2^30 B) cache.
  const upstream = broken((m) => {
    const v = deployment(m).spec.template.spec.volumes?.find((x) => x.name === 'cache')
    if (v?.emptyDir) v.emptyDir.sizeLimit = '1G'
  })
  t.match(checkCache(upstream), [/sizeLimit 1G .* below --cache-retention-size 1Gi/])
  const grown = broken((m) => {
    const pc = container(m, PROXY_CONTAINER)
    pc.args = (pc.args ?? []).map((a) => (a.startsWith('--cache-retention-size=') ? '--cache-retention-size=1200Mi' : a))
  })
  t.match(checkCache(grown), [/below --cache-retention-size 1200Mi/])
  const moved = broken((m) => {
    const pc = container(m, PROXY_CONTAINER)
    pc.args = (pc.args ?? []).map((a) => (a.startsWith('--cache-directory=') ? '--cache-directory=/var/cache/rpp' : a))
  })
  t.match(checkCache(moved), [/no volume is mounted at the cache directory/])
  t.end()
})

void t.test('every server route has a kube-rbac-proxy rule or an exclusion', async (t) => {
  const routes = await serverRoutes(t.testdir())
  t.ok(
    routes.some((r) => r.path === '/package'),
    `routes: ${routes.map((r) => `${r.method} ${r.path}`).join(', ')}`,
  )
  t.same(checkRoutes(manifests, routes), [])

  const noSubtree = broken((m) => editRbacProxyConfig(m, (c) => (c.upstreams = c.upstreams.filter((u) => u.path !== '/cache/'))))
  t.match(checkRoutes(noSubtree, routes), [
    /GET \/cache\/\{digest\}: kube-rbac-proxy has no upstream/,
    /DELETE \/cache\/\{digest\}: kube-rbac-proxy has no upstream/,
  ])
  const open = broken((m) => editRbacProxyConfig(m, (c) => c.excludePaths?.push('/package')))
  t.match(checkRoutes(open, routes).join('\n'), /GET \/package: excluded from authorization/)
  const wrongSubresource = broken((m) =>
    editRbacProxyConfig(m, (c) => {
      const metrics = c.upstreams.find((u) => u.path === '/metrics')?.authorization?.resourceAttributes
      if (metrics) metrics.subresource = 'http'
    }),
  )
  t.match(checkRoutes(wrongSubresource, routes), [/GET \/metrics: authorized as .*"http".*expected .*"prometheus-metrics"/])
  const newRoute = [...routes, { method: 'get', path: '/debug' }]
  t.match(checkRoutes(manifests, newRoute), [/GET \/debug: kube-rbac-proxy has no upstream/])
  const noCacheRole = broken((m) => (m.objects = m.objects.filter((o) => o.object.metadata.name !== 'access-to-registry-packages-proxy-cache')))
  t.match(checkRoutes(noCacheRole, routes).join('\n'), /DELETE \/cache\/\{digest\}: no Role grants delete apps\/deployments\/cache/)
  const elsewhere = broken((m) =>
    editRbacProxyConfig(m, (c) => {
      const pkg = c.upstreams.find((u) => u.path === '/package')
      if (pkg) pkg.upstream = 'http://127.0.0.1:5081/package'
    }),
  )
  t.match(checkRoutes(elsewhere, routes), [/forwards \/package to http:\/\/127.0.0.1:5081\/package/])
})

void t.test('probes reach real endpoints', async (t) => {
  const routes = await serverRoutes(t.testdir())
  t.same(checkProbes(manifests, routes), [])
  const podIp = broken((m) => delete container(m, PROXY_CONTAINER).livenessProbe?.httpGet?.host)
  t.match(checkProbes(podIp, routes), [/probes the pod IP on 5080/])
  const notExcluded = broken((m) => editRbacProxyConfig(m, (c) => (c.excludePaths = (c.excludePaths ?? []).filter((p) => p !== '/readyz'))))
  t.match(checkProbes(notExcluded, routes), [/kube-rbac-proxy readinessProbe: \/readyz is not excluded/])
  const livenessOnReadiness = broken((m) => {
    const get = container(m, PROXY_CONTAINER).livenessProbe?.httpGet
    if (get) get.path = '/readyz'
  })
  t.match(checkProbes(livenessOnReadiness, routes), [/liveness on \/readyz/])
  const missingPath = broken((m) => {
    const get = container(m, PROXY_CONTAINER).readinessProbe?.httpGet
    if (get) get.path = '/ready'
  })
  t.match(checkProbes(missingPath, routes), [/the server has no GET \/ready$/])
})

void t.test('the pod runs on every master, in the host network, before the pod network exists', (t) => {
  const drain = drainSeconds()
  t.same(checkPlacement(manifests, drain), [])
  const pod = (m: Manifests): ReturnType<typeof deployment>['spec']['template']['spec'] => deployment(m).spec.template.spec
  t.match(
    checkPlacement(
      broken((m) => (pod(m).hostNetwork = false)),
      drain,
    ),
    [/hostNetwork/],
  )
  t.match(
    checkPlacement(
      broken((m) => (pod(m).tolerations = (pod(m).tolerations ?? []).filter((x) => x.key !== 'node.kubernetes.io/not-ready'))),
      drain,
    ),
    [/not-ready/],
  )
  t.match(
    checkPlacement(
      broken((m) => {
        const strategy = deployment(m).spec.strategy
        if (strategy?.rollingUpdate) strategy.rollingUpdate.maxSurge = 1
      }),
      drain,
    ),
    [/maxSurge/],
  )
  t.match(
    checkPlacement(
      broken((m) => (pod(m).terminationGracePeriodSeconds = drain)),
      drain,
    ),
    [/does not cover the 25 s drain/],
  )
  t.match(
    checkPlacement(
      broken((m) => (container(m, PROXY_CONTAINER).env = [])),
      drain,
    ),
    [/registry-packages-proxy: reaches the API server through the Service IP/],
  )
  t.end()
})

void t.test('security contexts are restrictive and match the image user', (t) => {
  const uid = imageUser()
  t.equal(uid, 65534)
  t.same(checkSecurity(manifests, uid), [])
  const writable = broken((m) => {
    const sc = container(m, RBAC_PROXY_CONTAINER).securityContext
    if (sc) sc.readOnlyRootFilesystem = false
  })
  t.match(checkSecurity(writable, uid), [/kube-rbac-proxy: readOnlyRootFilesystem/])
  t.match(checkSecurity(manifests, 1000), [/runAsUser 65534 is not the image's user 1000/])
  const capable = broken((m) => {
    const sc = container(m, PROXY_CONTAINER).securityContext
    if (sc?.capabilities) sc.capabilities.add = ['NET_BIND_SERVICE']
  })
  t.match(checkSecurity(capable, uid), [/adds capabilities NET_BIND_SERVICE/])
  t.end()
})

void t.test('PDB, VPA, PodMonitor, token Secret and kustomization point at the Deployment', (t) => {
  t.same(checkWiring(manifests), [])
  const pdbElsewhere = broken((m) => {
    const pdb = m.objects.find((o) => o.object.kind === 'PodDisruptionBudget')?.object as unknown as {
      spec: { selector: { matchLabels: Record<string, string> } }
    }
    pdb.spec.selector.matchLabels = { app: 'other' }
  })
  t.match(checkWiring(pdbElsewhere), [/PDB .* does not select the pods/])
  const tokenForOther = broken((m) => {
    const secret = m.objects.find((o) => o.object.kind === 'Secret')?.object
    if (secret?.metadata.annotations) secret.metadata.annotations['kubernetes.io/service-account.name'] = POD_ACCOUNT
    unbindHttp(m, POD_ACCOUNT)
  })
  t.match(checkWiring(tokenForOther), [/registry-packages-proxy may not get apps\/deployments\/http/, /the proxies may not call each other/])
  const peersUnbound = broken((m) => unbindHttp(m, POD_ACCOUNT))
  t.match(checkWiring(peersUnbound), [/the proxies may not call each other's \/package/, /the proxies may not call each other's \/peers\//])
  const unlisted = broken((m) => (m.kustomization.resources = m.kustomization.resources.filter((f) => f !== 'pdb.yaml')))
  t.match(checkWiring(unlisted).join('\n'), /kustomization resources .* differ/)
  const vpaForGhost = broken((m) => {
    const vpa = m.objects.find((o) => o.object.kind === 'VerticalPodAutoscaler')?.object as unknown as {
      spec: { resourcePolicy: { containerPolicies: Array<{ containerName: string }> } }
    }
    const first = vpa.spec.resourcePolicy.containerPolicies[0]
    if (first) first.containerName = 'proxy'
  })
  t.match(checkWiring(vpaForGhost), [/container proxy the pod lacks/])
  const namespaced = broken((m) => (m.kustomization.namespace = 'd8-cloud-instance-manager'))
  t.match(checkWiring(namespaced), [/sets a namespace/])
  t.end()
})

void t.test('the README tells how to apply and fetch through kube-rbac-proxy', (t) => {
  const readme = readFileSync(join(ROOT, 'README.md'), 'utf8')
  const section = /^## Deployment\n([\s\S]*?)(?=^## |(?![\s\S]))/m.exec(readme)?.[1]
  if (!section) {
    t.fail('README.md has no "## Deployment" section')
    return t.end()
  }
  t.match(section, /kubectl apply -k infra/)
  const token = manifests.objects.find((o) => o.object.kind === 'Secret')?.object.metadata.name ?? ''
  t.ok(section.includes(token), `names the token Secret ${token}`)
  t.match(section, /curl[^\n]*\\?\n?[\s\S]*Authorization: Bearer/)
  t.match(section, /:4219\/package\?digest=sha256:/)
  t.end()
})

void t.test('the Ingress publishes /v1/images/ only, to kube-rbac-proxy; the rpp-get port is on the node', (t) => {
  t.same(checkIngress(manifests), [])
  t.same(checkBootstrap(manifests), [])
  const ingress = (
    m: Manifests,
  ): K8sObject & {
    spec: { rules: Array<{ http: { paths: Array<{ path: string; backend: { service: { port: { name?: string; number?: number } } } }> } }> }
  } => {
    const found = m.objects.find((o) => o.object.kind === 'Ingress')?.object
    if (!found) throw new Error('no Ingress')
    return found as never
  }
  const wider = broken((m) =>
    ingress(m).spec.rules[0]?.http.paths.push({ ...structuredClone(ingress(m).spec.rules[0]?.http.paths[0] ?? ({} as never)), path: '/package' }),
  )
  t.match(checkIngress(wider), [/publishes \/package/])
  const buffered = broken((m) => {
    const a = ingress(m).metadata.annotations
    if (a) a['nginx.ingress.kubernetes.io/proxy-buffering'] = 'on'
  })
  t.match(checkIngress(buffered), [/proxy-buffering is on/])
  const noHostPort = broken((m) => {
    for (const p of container(m, PROXY_CONTAINER).ports ?? []) delete p.hostPort
  })
  t.match(checkBootstrap(noHostPort), [/not a hostPort/])
  t.end()
})

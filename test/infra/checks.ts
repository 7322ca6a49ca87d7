/**
 * The deployment's invariants as functions from manifests (and the server's route table) to a
 * list of problems, empty when all hold. Tests run them on infra/ as it is, and on broken
 * copies to show each one would notice.
 */
import { envName, FLAG_NAMES, parseFlags } from '../../config/flags.js'
import { parseQuantity } from '../../config/quantity.js'
import { DEFAULT_MEMO_BYTES } from '../../plugins/peers/manifest-memo.js'
import { rbacProxyConfig, reviewAttributes, routeRequest } from './kube-rbac-proxy.js'
import {
  all,
  APP,
  argValue,
  container,
  deployment,
  NAMESPACE,
  PROXY_CONTAINER,
  RBAC_PROXY_CONTAINER,
  SERVICE_ACCOUNT,
  yamlFiles,
  type Binding,
  type Container,
  type K8sObject,
  type Manifests,
  type Probe,
  type Subject,
} from './manifests.js'
import { allows, describe, grantsFor } from './rbac.js'

/** A route of the hapi server (`server.table()`), method lower-case as hapi gives it. */
export interface ServerRoute {
  method: string
  path: string
}

/** The kube-rbac-proxy subresource each route is authorized as (the decision). */
export const ROUTE_SUBRESOURCES: Readonly<Record<string, string>> = {
  '/package': 'http',
  // Peer fill: the proxies call each other with the same permission as /package.
  '/peers/manifests/{digest}': 'http',
  '/v1/images/deckhouse-cli/tags': 'cli-binary',
  '/v1/images/deckhouse-cli/images/{version}': 'cli-binary',
  '/v1/images/deckhouse-cli/manifests/{ref}': 'cli-binary',
  '/v1/images/deckhouse-cli/plugins/{plugin}/tags': 'cli-binary',
  '/v1/images/deckhouse-cli/plugins/{plugin}/images/{version}': 'cli-binary',
  '/v1/images/deckhouse-cli/plugins/{plugin}/manifests/{ref}': 'cli-binary',
  '/v1/images/{path*}': 'cli-binary',
  // Only 404s and 405s live here (icons are excluded from auth): authorized like the rest.
  '/v1/packages/{path*}': 'packages',
  '/metrics': 'prometheus-metrics',
  '/cache': 'cache',
  '/cache/{digest}': 'cache',
}

/** Routes kube-rbac-proxy must let through unauthenticated: the kubelet probes, the console's icons. */
export const UNAUTHENTICATED_ROUTES: readonly string[] = ['/healthz', '/readyz', '/v1/packages/{repository}/{package}/metadata/icon/{version?}']

/** The excludePaths that may skip auth: the routes above, icons as Go path.Match globs. */
export const EXCLUDED_PATHS: readonly string[] = [
  '/healthz',
  '/readyz',
  '/v1/packages/*/*/metadata/icon',
  '/v1/packages/*/*/metadata/icon/',
  '/v1/packages/*/*/metadata/icon/*',
]

/** The port kube-rbac-proxy serves clients on (README, "Deployment": bootstrap scripts call it). */
export const CLIENT_PORT = 4219

/**
 * The cache volume's headroom rule: the retention size, plus 10% for filesystem block rounding
 * of many small files and the shard directories, plus 64 MiB for the SQLite index, its WAL and
 * shared-memory file, plus twice the bound of the manifests kept for peers (`peer-manifests/`,
 * bounded apart from the cache: files of a few KiB each take up to a whole block). Fill temp
 * files are reserved inside the retention size by design.
 */
export function minimumCacheVolume(retentionBytes: number): number {
  return Math.ceil(retentionBytes * 1.1) + 64 * 2 ** 20 + 2 * DEFAULT_MEMO_BYTES
}

/** A concrete request path for a route pattern (`{digest}` -> a digest). */
export function samplePath(pattern: string): string {
  return pattern.replace(/\{[^}]+\}/g, `sha256:${'0'.repeat(64)}`)
}

function proxyFlags(m: Manifests): ReturnType<typeof parseFlags> {
  return parseFlags(container(m, PROXY_CONTAINER).args ?? [], {}, '/')
}

/** Container args and RPP_* env vars: only flags the binary accepts, in `--name=value` form. */
export function checkFlags(m: Manifests): string[] {
  const problems: string[] = []
  const c = container(m, PROXY_CONTAINER)
  const args = c.args ?? []
  for (const arg of args) {
    const name = /^--([a-z-]+)=/.exec(arg)?.[1]
    if (name === undefined) problems.push(`arg "${arg}" is not --name=value`)
    else if (!FLAG_NAMES.includes(name)) problems.push(`arg "${arg}": the binary has no flag --${name}`)
  }
  const envFlags = new Set(FLAG_NAMES.map(envName))
  for (const e of c.env ?? []) {
    if (e.name.startsWith('RPP_') && !envFlags.has(e.name)) problems.push(`env ${e.name} names no flag`)
  }
  if (c.command !== undefined) problems.push('command overrides the image ENTRYPOINT')
  try {
    const flags = proxyFlags(m)
    if (flags.kubeconfig !== undefined) problems.push('--kubeconfig is set: in a pod the proxy must use the in-cluster config')
    if (flags.registryConfig !== undefined) problems.push('--registry-config is set: in a cluster the sources come from Kubernetes')
    if (flags.disableCache) problems.push('--disable-cache is set: the cache volume would go unused')
    if (flags.listenHost !== '127.0.0.1') problems.push(`--listen-address host is ${flags.listenHost}: with hostNetwork anything but loopback bypasses kube-rbac-proxy`)
  } catch (err) {
    problems.push(`the binary rejects the args: ${(err as Error).message}`)
  }
  return problems
}

/** The cache directory is the emptyDir, whose sizeLimit clears the retention size with headroom. */
export function checkCache(m: Manifests): string[] {
  const problems: string[] = []
  const d = deployment(m)
  const c = container(m, PROXY_CONTAINER)
  const dir = argValue(c.args, 'cache-directory')
  const retention = argValue(c.args, 'cache-retention-size')
  if (dir === undefined) problems.push('--cache-directory is not set')
  if (retention === undefined) problems.push('--cache-retention-size is not set (the default may change)')
  const mount = c.volumeMounts?.find((v) => v.mountPath === dir)
  const volume = d.spec.template.spec.volumes?.find((v) => v.name === mount?.name)
  if (!mount || !volume) {
    problems.push(`no volume is mounted at the cache directory ${dir}`)
    return problems
  }
  if (mount.readOnly) problems.push('the cache volume is mounted read-only')
  if (!volume.emptyDir) problems.push(`the cache volume ${volume.name} is not an emptyDir`)
  const sizeLimit = volume.emptyDir?.sizeLimit
  if (sizeLimit === undefined) {
    problems.push('the cache emptyDir has no sizeLimit')
    return problems
  }
  if (retention !== undefined) {
    const limitBytes = parseQuantity(sizeLimit)
    const retentionBytes = parseQuantity(retention)
    const needed = minimumCacheVolume(retentionBytes)
    if (limitBytes < needed) {
      problems.push(
        `emptyDir sizeLimit ${sizeLimit} (${limitBytes} B) is below --cache-retention-size ${retention} + overshoot (${needed} B): the kubelet would evict the pod`,
      )
    }
  }
  const request = c.resources?.requests?.['ephemeral-storage']
  if (request === undefined || parseQuantity(request) < parseQuantity(sizeLimit)) {
    problems.push(`ephemeral-storage request ${request} does not reserve the cache volume's ${sizeLimit}`)
  }
  return problems
}

/**
 * Every server route is reachable through kube-rbac-proxy, forwarded to the same path on the
 * proxy's listen address, and either authorized as its decided subresource or (health only)
 * excluded; no upstream points at a path the server does not serve; each authorized path is
 * granted to someone by a consumer Role.
 */
export function checkRoutes(m: Manifests, routes: readonly ServerRoute[]): string[] {
  const problems: string[] = []
  const config = rbacProxyConfig(m)
  const flags = proxyFlags(m)
  const listen = `${flags.listenHost}:${flags.listenPort}`
  const usedUpstreams = new Set<string>()
  for (const route of routes) {
    const what = `${route.method.toUpperCase()} ${route.path}`
    const sample = samplePath(route.path)
    const routed = routeRequest(config, sample)
    if (!routed) {
      problems.push(`${what}: kube-rbac-proxy has no upstream for ${sample} (clients get 404)`)
      continue
    }
    usedUpstreams.add(routed.upstream.path)
    const target = new URL(routed.target)
    if (target.protocol !== 'http:' || target.host !== listen || target.pathname !== sample) {
      problems.push(`${what}: kube-rbac-proxy forwards ${sample} to ${routed.target}, not http://${listen}${sample}`)
    }
    const health = UNAUTHENTICATED_ROUTES.includes(route.path)
    if (routed.excluded && !health) problems.push(`${what}: excluded from authorization, so anyone on the network may call it`)
    if (health) {
      if (!routed.excluded) problems.push(`${what}: not in excludePaths, so the kubelet's probe gets 401`)
      continue
    }
    const subresource = ROUTE_SUBRESOURCES[route.path]
    if (subresource === undefined) {
      problems.push(`${what}: no kube-rbac-proxy subresource decided for this route (add it to the config and ROUTE_SUBRESOURCES)`)
      continue
    }
    const ra = routed.upstream.authorization?.resourceAttributes
    const expected = { namespace: NAMESPACE, apiGroup: 'apps', resource: 'deployments', subresource, name: APP }
    const actual = { namespace: ra?.namespace, apiGroup: ra?.apiGroup, resource: ra?.resource, subresource: ra?.subresource, name: ra?.name }
    if (JSON.stringify(actual) !== JSON.stringify(expected)) {
      problems.push(`${what}: authorized as ${JSON.stringify(actual)}, expected ${JSON.stringify(expected)}`)
    }
    const verbMethod = route.method.toUpperCase()
    if (verbMethod !== '*') {
      const attrs = reviewAttributes(routed.upstream, verbMethod)
      if (!attrs) problems.push(`${what}: kube-rbac-proxy cannot authorize ${verbMethod} (no verb for it)`)
      else if (![...all(m, 'Role'), ...all(m, 'ClusterRole')].some((r) => allows(grantsFor(roleAsBound(r), roleSubject), attrs))) {
        problems.push(`${what}: no Role grants ${describe(attrs)}`)
      }
    }
  }
  for (const u of config.upstreams) {
    if (!usedUpstreams.has(u.path)) problems.push(`kube-rbac-proxy upstream ${u.path} serves no server route`)
  }
  for (const p of config.excludePaths ?? []) {
    if (!EXCLUDED_PATHS.includes(p)) problems.push(`excludePaths has ${p}: only ${EXCLUDED_PATHS.join(', ')} may skip auth`)
  }
  return problems
}

/** A subject and a one-Role world that binds the Role to it: "does this Role grant X?". */
const roleSubject: Subject = { kind: 'User', name: 'role-check' }
function roleAsBound(role: K8sObject): Manifests {
  const binding = {
    apiVersion: 'rbac.authorization.k8s.io/v1',
    kind: 'RoleBinding',
    metadata: { name: 'role-check', namespace: role.metadata.namespace ?? NAMESPACE },
    roleRef: { kind: role.kind, name: role.metadata.name },
    subjects: [roleSubject],
  }
  return { kustomization: { resources: [] }, objects: [{ file: '', object: role }, { file: '', object: binding }] }
}

/**
 * The Ingress publishes /v1/images/ and nothing else, to kube-rbac-proxy over HTTPS (never to
 * the proxy's plain port), unbuffered, without a body limit, with 300 s timeouts.
 */
export function checkIngress(m: Manifests): string[] {
  const problems: string[] = []
  type Ingress = K8sObject & {
    spec: { rules?: Array<{ http?: { paths: Array<{ path?: string; pathType?: string; backend: { service?: { name: string; port: { name?: string; number?: number } } } }> } }> }
  }
  type Service = K8sObject & { spec: { selector?: Record<string, string>; ports: Array<{ name?: string; port: number; targetPort?: number | string }> } }
  const ingresses = all<Ingress>(m, 'Ingress')
  if (ingresses.length !== 1) problems.push(`expected one Ingress, found ${ingresses.length}`)
  for (const ing of ingresses) {
    const a = ing.metadata.annotations ?? {}
    const expected: Record<string, string> = {
      'nginx.ingress.kubernetes.io/backend-protocol': 'HTTPS',
      'nginx.ingress.kubernetes.io/proxy-body-size': '0',
      'nginx.ingress.kubernetes.io/proxy-buffering': 'off',
      'nginx.ingress.kubernetes.io/proxy-read-timeout': '300',
      'nginx.ingress.kubernetes.io/proxy-send-timeout': '300',
    }
    for (const [k, v] of Object.entries(expected)) if (a[k] !== v) problems.push(`Ingress ${ing.metadata.name}: ${k} is ${a[k]}, expected ${v}`)
    for (const path of (ing.spec.rules ?? []).flatMap((r) => r.http?.paths ?? [])) {
      if (path.path !== '/v1/images/' || path.pathType !== 'Prefix') problems.push(`Ingress ${ing.metadata.name} publishes ${path.path} (${path.pathType}): only /v1/images/ (Prefix) may be public`)
      const backend = path.backend.service
      const service = all<Service>(m, 'Service').find((s) => s.metadata.name === backend?.name && s.metadata.namespace === ing.metadata.namespace)
      const port = service?.spec.ports.find((p) => (backend?.port.name !== undefined ? p.name === backend.port.name : p.port === backend?.port.number))
      if (!service || !port) problems.push(`Ingress ${ing.metadata.name}: backend ${backend?.name} is no Service port in the manifests`)
      else if (Number(port.targetPort ?? port.port) !== CLIENT_PORT || !matchesLabels(service.spec.selector, deployment(m).spec.template.metadata.labels)) {
        problems.push(`Ingress ${ing.metadata.name}: its Service does not lead to kube-rbac-proxy on ${CLIENT_PORT}`)
      }
    }
  }
  return problems
}

/** The rpp-get listener's port is published on the node (hostPort) and its UUID comes from the ConfigMap. */
export function checkBootstrap(m: Manifests): string[] {
  const problems: string[] = []
  const c = container(m, PROXY_CONTAINER)
  const flags = proxyFlags(m)
  if (!flags.bootstrap) return ['--bootstrap-listen-address is not set: nodes without rpp-get cannot fetch it']
  const port = c.ports?.find((p) => p.containerPort === flags.bootstrap?.port)
  if (!port || port.hostPort !== flags.bootstrap.port) problems.push(`the bootstrap port ${flags.bootstrap.port} is not a hostPort of the proxy container`)
  if (flags.bootstrap.host !== '$(POD_IP)' || envFromField(c, 'POD_IP') !== 'status.podIP') problems.push('the bootstrap listener does not bind the node IP (POD_IP from status.podIP)')
  return problems
}

function probes(c: Container): Array<[string, Probe]> {
  return (['startupProbe', 'livenessProbe', 'readinessProbe'] as const).flatMap((k) => (c[k] ? [[k, c[k]] as [string, Probe]] : []))
}

/**
 * Every probe reaches a real endpoint: on the proxy's port it must name the proxy's loopback
 * host (the pod IP is the node's, where nothing listens on that port); on kube-rbac-proxy's port
 * it must be HTTPS and either kube-rbac-proxy's own --livez-path or an excluded path forwarded
 * to a GET route. A liveness probe must never be /readyz: an API-server outage would restart it.
 */
export function checkProbes(m: Manifests, routes: readonly ServerRoute[]): string[] {
  const problems: string[] = []
  const flags = proxyFlags(m)
  const config = rbacProxyConfig(m)
  const getPaths = new Set(routes.filter((r) => r.method.toLowerCase() === 'get').map((r) => r.path))
  const livez = argValue(container(m, RBAC_PROXY_CONTAINER).args, 'livez-path')
  for (const c of deployment(m).spec.template.spec.containers) {
    const kinds = probes(c)
    for (const needed of ['livenessProbe', 'readinessProbe']) {
      if (!kinds.some(([k]) => k === needed)) problems.push(`${c.name}: no ${needed}`)
    }
    for (const [kind, probe] of kinds) {
      const what = `${c.name} ${kind}`
      const get = probe.httpGet
      if (!get) {
        if (!probe.tcpSocket) problems.push(`${what}: neither httpGet nor tcpSocket`)
        continue
      }
      const path = get.path ?? '/'
      if (kind === 'livenessProbe' && path === '/readyz') problems.push(`${what}: liveness on /readyz restarts the pod whenever it is not ready`)
      if (Number(get.port) === flags.listenPort) {
        if (get.host !== flags.listenHost) problems.push(`${what}: probes the pod IP on ${get.port}, but the proxy listens on ${flags.listenHost} only`)
        if ((get.scheme ?? 'HTTP') !== 'HTTP') problems.push(`${what}: the proxy speaks plain HTTP`)
        if (!getPaths.has(path)) problems.push(`${what}: the server has no GET ${path}`)
      } else if (Number(get.port) === CLIENT_PORT) {
        if (get.scheme !== 'HTTPS') problems.push(`${what}: kube-rbac-proxy speaks HTTPS on ${CLIENT_PORT}`)
        if (get.host !== undefined) problems.push(`${what}: kube-rbac-proxy listens on the pod IP, not ${get.host}`)
        if (path === livez) continue
        const routed = routeRequest(config, path)
        if (!routed) problems.push(`${what}: kube-rbac-proxy has no upstream for ${path}`)
        else if (!routed.excluded) problems.push(`${what}: ${path} is not excluded from auth, so the kubelet gets 401`)
        else if (!getPaths.has(new URL(routed.target).pathname)) problems.push(`${what}: forwarded to ${routed.target}, which the server does not serve`)
      } else {
        problems.push(`${what}: port ${get.port} is neither the proxy's ${flags.listenPort} nor kube-rbac-proxy's ${CLIENT_PORT}`)
      }
    }
  }
  return problems
}

function envFromField(c: Container, name: string): string | undefined {
  return c.env?.find((e) => e.name === name)?.valueFrom?.fieldRef?.fieldPath
}

/**
 * Where and how the pod runs: on every master, in the host network, before the pod network
 * exists (tolerations, the API server reached on the node), one per node, rolled one at a time.
 */
export function checkPlacement(m: Manifests, drainSeconds: number): string[] {
  const problems: string[] = []
  const d = deployment(m)
  const pod = d.spec.template.spec
  const labels = d.spec.template.metadata.labels
  if (pod.hostNetwork !== true) problems.push('hostNetwork is not true: nodes without a pod network could not reach it')
  if (pod.dnsPolicy !== 'ClusterFirstWithHostNet') problems.push(`dnsPolicy is ${pod.dnsPolicy}, not ClusterFirstWithHostNet`)
  if (pod.priorityClassName !== 'system-cluster-critical') problems.push(`priorityClassName is ${pod.priorityClassName}`)
  if (!pod.nodeSelector || !('node-role.kubernetes.io/control-plane' in pod.nodeSelector)) problems.push('no control-plane node selector')
  for (const key of ['node-role.kubernetes.io/control-plane', 'node.kubernetes.io/not-ready', 'node.kubernetes.io/network-unavailable', 'node.deckhouse.io/uninitialized', 'node.deckhouse.io/csi-not-bootstrapped']) {
    if (!pod.tolerations?.some((t) => t.key === key && t.operator === 'Exists' && t.effect === undefined)) problems.push(`no toleration of ${key} (any effect)`)
  }
  const anti = pod.affinity?.podAntiAffinity?.requiredDuringSchedulingIgnoredDuringExecution ?? []
  if (!anti.some((a) => a.topologyKey === 'kubernetes.io/hostname' && matchesLabels(a.labelSelector?.matchLabels, labels))) {
    problems.push('no required pod anti-affinity across nodes')
  }
  if (!matchesLabels(d.spec.selector.matchLabels, labels)) problems.push('the selector does not match the pod labels')
  if (String(d.spec.strategy?.rollingUpdate?.maxSurge) !== '0') problems.push('maxSurge is not 0: a surge pod cannot schedule next to one holding the host port')
  if (pod.serviceAccountName !== SERVICE_ACCOUNT) problems.push(`serviceAccountName is ${pod.serviceAccountName}`)
  if (pod.automountServiceAccountToken === false) problems.push('the service-account token is not mounted: no in-cluster config')
  if ((pod.terminationGracePeriodSeconds ?? 30) <= drainSeconds) problems.push(`terminationGracePeriodSeconds ${pod.terminationGracePeriodSeconds} does not cover the ${drainSeconds} s drain`)
  const rbacProxy = container(m, RBAC_PROXY_CONTAINER)
  const port = rbacProxy.ports?.find((p) => p.containerPort === CLIENT_PORT)
  if (!port || port.hostPort !== CLIENT_PORT) problems.push(`kube-rbac-proxy does not declare host port ${CLIENT_PORT}`)
  if (argValue(rbacProxy.args, 'secure-listen-address') !== `$(KUBE_RBAC_PROXY_LISTEN_ADDRESS):${CLIENT_PORT}`) problems.push('kube-rbac-proxy does not listen on the pod IP')
  if (envFromField(rbacProxy, 'KUBE_RBAC_PROXY_LISTEN_ADDRESS') !== 'status.podIP') problems.push('KUBE_RBAC_PROXY_LISTEN_ADDRESS is not the pod IP')
  for (const c of pod.containers) {
    if (envFromField(c, 'KUBERNETES_SERVICE_HOST') !== 'status.hostIP') problems.push(`${c.name}: reaches the API server through the Service IP, which needs the pod network`)
  }
  return problems
}

function matchesLabels(selector: Record<string, string> | undefined, labels: Record<string, string>): boolean {
  return selector !== undefined && Object.keys(selector).length > 0 && Object.entries(selector).every(([k, v]) => labels[k] === v)
}

/** Non-root (the image's user), no privilege escalation, no capabilities, read-only root. */
export function checkSecurity(m: Manifests, imageUser: number): string[] {
  const problems: string[] = []
  const pod = deployment(m).spec.template.spec
  const psc = pod.securityContext ?? {}
  if (psc.runAsNonRoot !== true) problems.push('pod: runAsNonRoot is not true')
  if (psc.runAsUser !== imageUser) problems.push(`pod: runAsUser ${psc.runAsUser} is not the image's user ${imageUser}`)
  if (psc.seccompProfile?.type !== 'RuntimeDefault') problems.push('pod: seccompProfile is not RuntimeDefault')
  for (const c of pod.containers) {
    const sc = c.securityContext ?? {}
    if (sc.allowPrivilegeEscalation !== false) problems.push(`${c.name}: allowPrivilegeEscalation is not false`)
    if (sc.readOnlyRootFilesystem !== true) problems.push(`${c.name}: readOnlyRootFilesystem is not true`)
    if (sc.privileged) problems.push(`${c.name}: privileged`)
    if (!sc.capabilities?.drop?.includes('ALL')) problems.push(`${c.name}: capabilities are not all dropped`)
    if (sc.capabilities?.add?.length) problems.push(`${c.name}: adds capabilities ${sc.capabilities.add.join(', ')}`)
    if (sc.runAsUser === 0) problems.push(`${c.name}: runs as root`)
    if (!c.resources?.requests?.cpu || !c.resources.requests.memory) problems.push(`${c.name}: no cpu and memory requests`)
    if (!c.resources?.limits?.memory) problems.push(`${c.name}: no memory limit`)
  }
  return problems
}

/**
 * The objects around the Deployment point at it and at each other: PDB and PodMonitor select
 * its pods, the VPA targets it and names its containers, the token Secret's account may fetch
 * packages, every namespaced object names its namespace, and the kustomization lists every
 * manifest and every image.
 */
export function checkWiring(m: Manifests, dir?: string): string[] {
  const problems: string[] = []
  const d = deployment(m)
  const labels = d.spec.template.metadata.labels
  const containerNames = d.spec.template.spec.containers.map((c) => c.name)
  const clusterScoped = new Set(['ClusterRole', 'ClusterRoleBinding', 'Namespace'])
  for (const { file, object } of m.objects) {
    const id = `${file}: ${object.kind} ${object.metadata.name}`
    if (!clusterScoped.has(object.kind) && !object.metadata.namespace) problems.push(`${id} names no namespace`)
    if (object.metadata.labels?.app !== APP) problems.push(`${id} lacks the app=${APP} label`)
  }
  if (m.kustomization.namespace !== undefined) problems.push('the kustomization sets a namespace: it would move the d8-system Role and the PodMonitor')
  const listed = [...m.kustomization.resources].sort()
  const files = yamlFiles(dir)
  if (JSON.stringify(listed) !== JSON.stringify(files)) problems.push(`kustomization resources ${listed.join(', ')} differ from the manifests ${files.join(', ')}`)
  for (const c of d.spec.template.spec.containers) {
    if (!m.kustomization.images?.some((i) => i.name === c.image)) problems.push(`image ${c.image} has no kustomization images entry`)
  }
  if (!m.kustomization.replicas?.some((r) => r.name === d.metadata.name)) problems.push('the kustomization does not set the replica count')

  for (const pdb of all<K8sObject & { spec: { selector?: { matchLabels?: Record<string, string> }; maxUnavailable?: number } }>(m, 'PodDisruptionBudget')) {
    if (!matchesLabels(pdb.spec.selector?.matchLabels, labels)) problems.push(`PDB ${pdb.metadata.name} does not select the pods`)
    if (pdb.metadata.namespace !== NAMESPACE) problems.push(`PDB ${pdb.metadata.name} is not in ${NAMESPACE}`)
  }
  if (all(m, 'PodDisruptionBudget').length !== 1) problems.push('expected one PodDisruptionBudget')

  type Vpa = K8sObject & { spec: { targetRef: { kind: string; name: string }; resourcePolicy?: { containerPolicies?: Array<{ containerName: string }> } } }
  const vpas = all<Vpa>(m, 'VerticalPodAutoscaler')
  if (vpas.length !== 1) problems.push('expected one VerticalPodAutoscaler')
  for (const v of vpas) {
    if (v.spec.targetRef.kind !== 'Deployment' || v.spec.targetRef.name !== d.metadata.name || v.metadata.namespace !== NAMESPACE) problems.push('the VPA does not target the Deployment')
    for (const p of v.spec.resourcePolicy?.containerPolicies ?? []) {
      if (p.containerName !== '*' && !containerNames.includes(p.containerName)) problems.push(`the VPA has a policy for a container ${p.containerName} the pod lacks`)
    }
  }

  type PodMonitor = K8sObject & {
    spec: { selector: { matchLabels?: Record<string, string> }; namespaceSelector?: { matchNames?: string[] }; podMetricsEndpoints: Array<{ port?: string; path?: string; scheme?: string }> }
  }
  const monitors = all<PodMonitor>(m, 'PodMonitor')
  if (monitors.length !== 1) problems.push('expected one PodMonitor')
  const rbacProxyPorts = container(m, RBAC_PROXY_CONTAINER).ports ?? []
  for (const pm of monitors) {
    if (!matchesLabels(pm.spec.selector.matchLabels, labels)) problems.push('the PodMonitor does not select the pods')
    if (pm.metadata.namespace !== NAMESPACE && !pm.spec.namespaceSelector?.matchNames?.includes(NAMESPACE)) problems.push(`the PodMonitor does not look in ${NAMESPACE}`)
    for (const e of pm.spec.podMetricsEndpoints) {
      if (!rbacProxyPorts.some((p) => p.name === e.port)) problems.push(`the PodMonitor scrapes port ${e.port}, which kube-rbac-proxy does not name`)
      if (e.path !== '/metrics' || e.scheme !== 'https') problems.push('the PodMonitor does not scrape https /metrics')
    }
  }

  // The token Secret: a service-account token for an account that may GET /package.
  const tokens = all<K8sObject & { type?: string }>(m, 'Secret').filter((s) => s.type === 'kubernetes.io/service-account-token')
  if (tokens.length !== 1) problems.push('expected one service-account token Secret')
  const config = rbacProxyConfig(m)
  const packageRoute = routeRequest(config, '/package')
  const packageReview = packageRoute && reviewAttributes(packageRoute.upstream, 'GET')
  const metricsRoute = routeRequest(config, '/metrics')
  const metricsReview = metricsRoute && reviewAttributes(metricsRoute.upstream, 'GET')
  for (const s of tokens) {
    const account = s.metadata.annotations?.['kubernetes.io/service-account.name']
    if (!account || !all(m, 'ServiceAccount').some((a) => a.metadata.name === account && a.metadata.namespace === s.metadata.namespace)) {
      problems.push(`token Secret ${s.metadata.name} names no ServiceAccount in the manifests`)
    } else if (packageReview && !allows(grantsFor(m, { kind: 'ServiceAccount', name: account, namespace: s.metadata.namespace ?? '' }), packageReview)) {
      problems.push(`token Secret ${s.metadata.name}: ${account} may not ${describe(packageReview)}, so its token cannot fetch packages`)
    }
  }
  // Somebody may fetch packages and scrape metrics: node bootstrap, and Prometheus.
  const bound = (review: ReturnType<typeof reviewAttributes>, subject: Subject): boolean => review !== undefined && allows(grantsFor(m, subject), review)
  if (!bound(packageReview, { kind: 'Group', name: 'system:bootstrappers:d8-node-manager' })) problems.push('bootstrapping nodes may not GET /package')
  if (!bound(metricsReview, { kind: 'User', name: 'd8-monitoring:scraper' })) problems.push('the Prometheus scraper may not GET /metrics')
  // Peer fill: each proxy calls the others' kube-rbac-proxy with its own service-account token.
  // Checked whether or not the Deployment turns it on (it needs an installer-made certificate):
  // the grants are in place, so turning it on is only the flags and the Secret.
  const self: Subject = { kind: 'ServiceAccount', name: SERVICE_ACCOUNT, namespace: NAMESPACE }
  for (const path of ['/package', samplePath('/peers/manifests/{digest}')]) {
    const route = routeRequest(config, path)
    if (!bound(route && reviewAttributes(route.upstream, 'GET'), self)) problems.push(`the proxies may not call each other's ${path === '/package' ? path : '/peers/'} (peer fill)`)
  }
  for (const b of [...all<Binding>(m, 'RoleBinding'), ...all<Binding>(m, 'ClusterRoleBinding')]) {
    const kind = b.roleRef.kind
    const exists = all(m, kind).some((r) => r.metadata.name === b.roleRef.name && (kind === 'ClusterRole' || r.metadata.namespace === b.metadata.namespace))
    if (!exists) problems.push(`${b.kind} ${b.metadata.name} refers to a missing ${kind} ${b.roleRef.name}`)
  }
  return problems
}

/**
 * Loads infra/ the way kustomize would (the kustomization's resources, every YAML document)
 * and gives typed access to the objects the invariant checks read. Only the fields those checks
 * use are typed; schema validation is kubernetes-models' job.
 */
import { readdirSync, readFileSync } from 'node:fs'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { parse, parseAllDocuments } from 'yaml'

export const ROOT = fileURLToPath(new URL('../..', import.meta.url))
export const INFRA_DIR = join(ROOT, 'infra')

/** The names the deployment is built around (README, "Deployment"). */
export const NAMESPACE = 'd8-cloud-instance-manager'
export const APP = 'registry-packages-proxy'
export const PROXY_CONTAINER = 'registry-packages-proxy'
export const RBAC_PROXY_CONTAINER = 'kube-rbac-proxy'
export const SERVICE_ACCOUNT = 'registry-packages-proxy'

export interface Metadata {
  name: string
  namespace?: string
  labels?: Record<string, string>
  annotations?: Record<string, string>
}

export interface K8sObject {
  apiVersion: string
  kind: string
  metadata: Metadata
  [field: string]: unknown
}

export interface HttpGet {
  host?: string
  port: number | string
  path?: string
  scheme?: string
}

export interface Probe {
  httpGet?: HttpGet
  tcpSocket?: { port: number | string }
  exec?: unknown
}

export interface EnvVar {
  name: string
  value?: string
  valueFrom?: { fieldRef?: { fieldPath: string } }
}

export interface SecurityContext {
  allowPrivilegeEscalation?: boolean
  readOnlyRootFilesystem?: boolean
  runAsNonRoot?: boolean
  runAsUser?: number
  runAsGroup?: number
  privileged?: boolean
  capabilities?: { drop?: string[]; add?: string[] }
  seccompProfile?: { type: string }
}

export interface Container {
  name: string
  image: string
  command?: string[]
  args?: string[]
  env?: EnvVar[]
  ports?: Array<{ name?: string; containerPort: number; hostPort?: number }>
  startupProbe?: Probe
  livenessProbe?: Probe
  readinessProbe?: Probe
  resources?: { requests?: Record<string, string>; limits?: Record<string, string> }
  securityContext?: SecurityContext
  volumeMounts?: Array<{ name: string; mountPath: string; readOnly?: boolean; subPath?: string }>
}

export interface Toleration {
  key?: string
  operator?: string
  effect?: string
}

export interface PodSpec {
  serviceAccountName?: string
  automountServiceAccountToken?: boolean
  hostNetwork?: boolean
  dnsPolicy?: string
  priorityClassName?: string
  terminationGracePeriodSeconds?: number
  nodeSelector?: Record<string, string>
  tolerations?: Toleration[]
  affinity?: {
    podAntiAffinity?: {
      requiredDuringSchedulingIgnoredDuringExecution?: Array<{ labelSelector?: { matchLabels?: Record<string, string> }; topologyKey: string }>
    }
  }
  securityContext?: SecurityContext & { fsGroup?: number }
  containers: Container[]
  volumes?: Volume[]
}

export interface Volume {
  name: string
  emptyDir?: { sizeLimit?: string }
  configMap?: { name: string }
  secret?: { secretName: string; items?: Array<{ key: string; path: string }>; optional?: boolean; defaultMode?: number }
}

export interface Deployment extends K8sObject {
  spec: {
    replicas?: number
    selector: { matchLabels: Record<string, string> }
    strategy?: { type?: string; rollingUpdate?: { maxSurge?: number | string; maxUnavailable?: number | string } }
    template: { metadata: { labels: Record<string, string> }; spec: PodSpec }
  }
}

export interface PolicyRule {
  apiGroups?: string[]
  resources?: string[]
  resourceNames?: string[]
  verbs: string[]
  nonResourceURLs?: string[]
}

export interface Subject {
  kind: string
  name: string
  namespace?: string
}

export interface Role extends K8sObject {
  rules: PolicyRule[]
}

export interface Binding extends K8sObject {
  roleRef: { kind: string; name: string }
  subjects: Subject[]
}

export interface Kustomization {
  apiVersion?: string
  kind?: string
  namespace?: string
  resources: string[]
  replicas?: Array<{ name: string; count: number }>
  images?: Array<{ name: string; newName?: string; newTag?: string; digest?: string }>
}

export interface Manifests {
  kustomization: Kustomization
  /** Every object, with the file it came from. */
  objects: Array<{ file: string; object: K8sObject }>
}

/** Parses the kustomization and every document of every resource it lists. Throws on YAML errors. */
export function loadManifests(dir = INFRA_DIR): Manifests {
  const kustomization = parse(readFileSync(join(dir, 'kustomization.yaml'), 'utf8')) as Kustomization
  const objects: Manifests['objects'] = []
  for (const file of kustomization.resources) {
    for (const doc of parseAllDocuments(readFileSync(join(dir, file), 'utf8'))) {
      if (doc.errors.length > 0) throw new Error(`${file}: ${doc.errors.map((e) => e.message).join('; ')}`)
      const object = doc.toJS() as K8sObject | null
      if (object !== null) objects.push({ file, object })
    }
  }
  return { kustomization, objects }
}

/** The YAML files in infra/ besides the kustomization itself. */
export function yamlFiles(dir = INFRA_DIR): string[] {
  return readdirSync(dir)
    .filter((f) => /\.ya?ml$/.test(f) && f !== 'kustomization.yaml')
    .sort()
}

export function all<T extends K8sObject = K8sObject>(m: Manifests, kind: string): T[] {
  return m.objects.filter((o) => o.object.kind === kind).map((o) => o.object as T)
}

export function one<T extends K8sObject = K8sObject>(m: Manifests, kind: string, name: string, namespace?: string): T {
  const found = all<T>(m, kind).filter((o) => o.metadata.name === name && (namespace === undefined || o.metadata.namespace === namespace))
  if (found.length !== 1) throw new Error(`expected one ${kind} ${namespace ? `${namespace}/` : ''}${name}, found ${found.length}`)
  return found[0] as T
}

export function deployment(m: Manifests): Deployment {
  return one<Deployment>(m, 'Deployment', APP, NAMESPACE)
}

export function container(m: Manifests, name: string): Container {
  const c = deployment(m).spec.template.spec.containers.find((x) => x.name === name)
  if (!c) throw new Error(`the Deployment has no container ${name}`)
  return c
}

/** A deep copy to mutate in "this check would fail if…" tests. */
export function cloneManifests(m: Manifests): Manifests {
  return structuredClone(m)
}

/** The value of `--name=value` in an argument list. */
export function argValue(args: readonly string[] | undefined, name: string): string | undefined {
  const prefix = `--${name}=`
  return args?.find((a) => a.startsWith(prefix))?.slice(prefix.length)
}

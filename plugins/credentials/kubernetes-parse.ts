import { credentialsFromDockerConfig, decodeBase64, parseCa, parseScheme, registrySource, SourceError, splitRepository, type RegistrySource } from './source.js'

/** Where the default source lives in a cluster (README, "Registry sources from Kubernetes"). RBAC grants exactly this one. */
export const REGISTRY_SECRET = Object.freeze({ namespace: 'd8-system', name: 'deckhouse-registry' })

/** The cluster-scoped custom resource that names every other registry. */
export const MODULE_SOURCE = Object.freeze({ group: 'deckhouse.io', version: 'v1alpha1', plural: 'modulesources' })

/** The fields of a Kubernetes object that these parsers read; everything else is ignored. */
export interface KubeObjectMeta {
  name?: string
  namespace?: string
  resourceVersion?: string
}

export interface SecretObject {
  metadata?: KubeObjectMeta
  /** Every value base64, as the API server returns `data`. */
  data?: Record<string, string>
}

export interface ModuleSourceObject {
  metadata?: KubeObjectMeta
  spec?: { registry?: { repo?: unknown; dockerCfg?: unknown; ca?: unknown; scheme?: unknown } }
}

function asRecord(value: unknown): Record<string, unknown> | undefined {
  return typeof value === 'object' && value !== null && !Array.isArray(value) ? (value as Record<string, unknown>) : undefined
}

/** A Secret `data` value, base64-decoded; undefined when the key is absent or empty. */
function secretValue(data: Record<string, unknown>, key: string, what: string): string | undefined {
  const raw = data[key]
  if (raw === undefined || raw === null || raw === '') return undefined
  if (typeof raw !== 'string') throw new SourceError(`${what}: data.${key} must be a base64 string`)
  return decodeBase64(raw, `${what}: data.${key}`)
}

/**
 * The default source from the `d8-system/deckhouse-registry` Secret: keys `address`, `path`,
 * `scheme`, `ca`, `.dockerconfigjson`, all base64 in `data`; repository `address/path`;
 * credentials from `auths[<registry host>]`. Throws a {@link SourceError} that names the key at
 * fault, never its value.
 */
export function parseRegistrySecret(secret: SecretObject): RegistrySource {
  const what = `Secret ${secret.metadata?.namespace ?? REGISTRY_SECRET.namespace}/${secret.metadata?.name ?? REGISTRY_SECRET.name}`
  const data = asRecord(secret.data)
  if (!data) throw new SourceError(`${what}: has no data`)
  const address = secretValue(data, 'address', what)?.trim()
  if (!address) throw new SourceError(`${what}: data.address is required`)
  const path = (secretValue(data, 'path', what) ?? '').trim().replace(/^\/+|\/+$/g, '')
  const { registry, namePrefix } = splitRepository(path ? `${address}/${path}` : address, `${what}: data.address/path`)
  const scheme = parseScheme(secretValue(data, 'scheme', what)?.trim(), what)
  const ca = parseCa(secretValue(data, 'ca', what), `${what}: data.ca`)
  const dockerConfig = secretValue(data, '.dockerconfigjson', what)
  const credentials = dockerConfig ? credentialsFromDockerConfig(dockerConfig, registry, `${what}: data..dockerconfigjson`) : undefined
  return registrySource({ name: 'default', kind: 'default', registry, namePrefix, scheme, ca, credentials })
}

/**
 * A module source from a `ModuleSource` (`spec.registry.{repo, dockerCfg, ca, scheme}`):
 * `dockerCfg` is base64 docker config JSON, looked up under the repo's host; `ca` is PEM.
 * Throws a {@link SourceError} that names the object and key at fault, never a value.
 */
export function parseModuleSource(obj: ModuleSourceObject): RegistrySource {
  const name = obj.metadata?.name
  if (!name) throw new SourceError('ModuleSource without metadata.name')
  const what = `ModuleSource ${name}`
  const registrySpec = asRecord(asRecord(obj.spec)?.registry)
  if (!registrySpec) throw new SourceError(`${what}: spec.registry is missing`)
  const repo = registrySpec.repo
  if (typeof repo !== 'string' || repo.trim() === '') throw new SourceError(`${what}: spec.registry.repo is required`)
  const { registry, namePrefix } = splitRepository(repo.trim(), `${what}: spec.registry.repo`)
  const scheme = parseScheme(registrySpec.scheme, `${what}: spec.registry`)
  const ca = parseCa(registrySpec.ca, `${what}: spec.registry.ca`)
  const dockerCfg = registrySpec.dockerCfg
  if (dockerCfg !== undefined && dockerCfg !== null && typeof dockerCfg !== 'string') {
    throw new SourceError(`${what}: spec.registry.dockerCfg must be a base64 string`)
  }
  const credentials = dockerCfg
    ? credentialsFromDockerConfig(decodeBase64(dockerCfg, `${what}: spec.registry.dockerCfg`), registry, `${what}: spec.registry.dockerCfg`)
    : undefined
  return registrySource({ name, kind: 'module-source', registry, namePrefix, scheme, ca, credentials })
}

/** What a watch remembers of one object: the version it parsed, and its source when valid. */
export interface ParsedObject {
  resourceVersion: string | undefined
  source?: RegistrySource
}

/**
 * Parses a listed set of objects, reusing the parse of each whose resourceVersion did not
 * change (an informer re-list sends every object again). An object that throws a SourceError is
 * remembered without a source, so it is not parsed again until it changes; `parsed` and
 * `rejected` are told (with what was known of it before) so the caller can log.
 */
export function reparse<T extends { metadata?: KubeObjectMeta }>(
  objects: readonly T[],
  previous: ReadonlyMap<string, ParsedObject>,
  parse: (obj: T) => RegistrySource,
  on: {
    parsed(name: string, source: RegistrySource, before: ParsedObject | undefined): void
    rejected(name: string, err: SourceError, before: ParsedObject | undefined): void
  },
): Map<string, ParsedObject> {
  const next = new Map<string, ParsedObject>()
  for (const obj of objects) {
    const name = obj.metadata?.name ?? ''
    const resourceVersion = obj.metadata?.resourceVersion
    const before = previous.get(name)
    if (before && resourceVersion !== undefined && before.resourceVersion === resourceVersion) {
      next.set(name, before)
      continue
    }
    try {
      const source = parse(obj)
      next.set(name, { resourceVersion, source })
      on.parsed(name, source, before)
    } catch (err) {
      if (!(err instanceof SourceError)) throw err
      next.set(name, { resourceVersion })
      on.rejected(name, err, before)
    }
  }
  return next
}

import { credentialsFromDockerConfig, Credentials, decodeBase64, parseCa, parseScheme, registrySource, SourceError, splitRepository } from './source.js'
import type { RegistrySource } from './source.js'

/** The cluster-scoped custom resource that names package repositories (icons come from them). */
export const PACKAGE_REPOSITORY = Object.freeze({ group: 'deckhouse.io', version: 'v1alpha1', plural: 'packagerepositories' })

/** `spec.registry` of a PackageRepository, and an entry of `packageRepositories` in the file. */
export interface PackageRepositorySpec {
  repo?: unknown
  scheme?: unknown
  ca?: unknown
  login?: unknown
  password?: unknown
  dockerCfg?: unknown
}

export interface PackageRepositoryObject {
  metadata?: { name?: string; resourceVersion?: string }
  spec?: { registry?: PackageRepositorySpec }
}

function optionalString(value: unknown, what: string): string | undefined {
  if (value === undefined || value === null || value === '') return undefined
  if (typeof value !== 'string') throw new SourceError(`${what} must be a string`)
  return value
}

/**
 * A package repository as a source named by its `name`: `repo` is `host[:port]/path`;
 * credentials are `login`/`password` when both are set, else `dockerCfg` (base64 docker config
 * JSON) under the repo's host, else none (anonymous). Throws a {@link SourceError} naming the
 * key at fault, never a value.
 */
function packageRepositorySource(name: string, spec: PackageRepositorySpec, what: string): RegistrySource {
  const repo = optionalString(spec.repo, `${what}.repo`)?.trim()
  if (!repo) throw new SourceError(`${what}.repo is required`)
  const { registry, namePrefix } = splitRepository(repo, `${what}.repo`)
  const scheme = parseScheme(spec.scheme, what)
  const ca = parseCa(spec.ca, `${what}.ca`)
  const login = optionalString(spec.login, `${what}.login`)
  const password = optionalString(spec.password, `${what}.password`)
  const dockerCfg = optionalString(spec.dockerCfg, `${what}.dockerCfg`)
  let credentials: Credentials | undefined
  if (login !== undefined && password !== undefined) credentials = new Credentials(login, password)
  else if (dockerCfg !== undefined) credentials = credentialsFromDockerConfig(decodeBase64(dockerCfg, `${what}.dockerCfg`), registry, `${what}.dockerCfg`)
  return registrySource({ name, kind: 'package-repository', registry, namePrefix, scheme, ca, credentials })
}

/** A `PackageRepository` object (`deckhouse.io/v1alpha1`, `spec.registry.{repo, scheme, ca, login, password, dockerCfg}`). */
export function parsePackageRepository(obj: PackageRepositoryObject): RegistrySource {
  const name = obj.metadata?.name
  if (!name) throw new SourceError('PackageRepository without metadata.name')
  const registry = obj.spec?.registry
  if (typeof registry !== 'object' || registry === null || Array.isArray(registry)) throw new SourceError(`PackageRepository ${name}: spec.registry is missing`)
  return packageRepositorySource(name, registry, `PackageRepository ${name}: spec.registry`)
}

/** `packageRepositories` of the `--registry-config` file: `[{name, repo, scheme, ca, login, password, dockerCfg}]`. */
export function parsePackageRepositoriesConfig(value: unknown, what: string): RegistrySource[] {
  if (!Array.isArray(value)) throw new SourceError(`${what}: packageRepositories must be an array`)
  const out: RegistrySource[] = []
  value.forEach((raw, i) => {
    const where = `${what}: packageRepositories[${i}]`
    if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) throw new SourceError(`${where} must be an object`)
    const entry = raw as PackageRepositorySpec & { name?: unknown }
    const name = optionalString(entry.name, `${where}.name`)
    if (!name) throw new SourceError(`${where}.name is required`)
    if (out.some((s) => s.name === name)) throw new SourceError(`${where}: duplicate name "${name}"`)
    out.push(packageRepositorySource(name, entry, where))
  })
  return out
}

import { parsePackageRepositoriesConfig } from './package-repository.js'
import { credentialsFromDockerConfig, decodeBase64, parseCa, parseScheme, registrySource, SourceError, splitRepository, type RegistrySource } from './source.js'

/**
 * Parses the text of a `--registry-config` file (README, "Registry sources"; FileSourceWatcher
 * reads the file); every problem is a {@link SourceError} that names the file and the key at
 * fault. A JSON syntax error names its position only:
 * V8's message quotes the text around it, which may be a password.
 */
export function parseRegistryConfigText(text: string, what: string): RegistrySource[] {
  let doc: unknown
  try {
    doc = JSON.parse(text)
  } catch (err) {
    const message = (err as Error).message
    const position = /at position (\d+)/.exec(message)?.[1]
    const detail = [
      message.includes('"') ? 'unexpected token' : message.replace(/ in JSON at position \d+.*$/, ''),
      ...(position === undefined ? [] : [lineAndColumn(text, Number(position))]),
    ].join(', ')
    throw new SourceError(`${what}: not valid JSON (${detail})`)
  }
  return parseRegistryConfig(doc, what)
}

function lineAndColumn(text: string, position: number): string {
  const before = text.slice(0, position).split('\n')
  return `line ${before.length}, column ${(before.at(-1)?.length ?? 0) + 1}`
}

function asObject(value: unknown, what: string): Record<string, unknown> {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) throw new SourceError(`${what} must be an object`)
  return value as Record<string, unknown>
}

function optionalString(obj: Record<string, unknown>, key: string, what: string): string | undefined {
  const v = obj[key]
  if (v === undefined || v === null) return undefined
  if (typeof v !== 'string') throw new SourceError(`${what}.${key} must be a string`)
  return v
}

/** Validates the parsed config document; exported for tests and for the Kubernetes shapes. */
export function parseRegistryConfig(doc: unknown, what: string): RegistrySource[] {
  const root = asObject(doc, what)
  const unknownKeys = Object.keys(root).filter((k) => k !== 'default' && k !== 'moduleSources' && k !== 'packageRepositories')
  if (unknownKeys.length > 0) throw new SourceError(`${what}: unknown key "${unknownKeys[0]}" (expected default, moduleSources, packageRepositories)`)
  const sources: RegistrySource[] = []
  if (root.default !== undefined) {
    const d = asObject(root.default, `${what}: default`)
    const address = optionalString(d, 'address', `${what}: default`)
    if (!address) throw new SourceError(`${what}: default.address is required`)
    const path = (optionalString(d, 'path', `${what}: default`) ?? '').replace(/^\/+|\/+$/g, '')
    const repository = path ? `${address}/${path}` : address
    const { registry, namePrefix } = splitRepository(repository, `${what}: default.address/path`)
    const ca = parseCa(d.ca, `${what}: default.ca`)
    const dockerConfigJson = optionalString(d, 'dockerConfigJson', `${what}: default`)
    const credentials = dockerConfigJson ? credentialsFromDockerConfig(dockerConfigJson, registry, `${what}: default.dockerConfigJson`) : undefined
    sources.push(registrySource({ name: 'default', kind: 'default', registry, namePrefix, scheme: parseScheme(d.scheme, `${what}: default`), ca, credentials }))
  }
  if (root.moduleSources !== undefined) {
    if (!Array.isArray(root.moduleSources)) throw new SourceError(`${what}: moduleSources must be an array`)
    root.moduleSources.forEach((raw, i) => {
      const where = `${what}: moduleSources[${i}]`
      const m = asObject(raw, where)
      const name = optionalString(m, 'name', where)
      if (!name) throw new SourceError(`${where}.name is required`)
      const repo = optionalString(m, 'repo', where)
      if (!repo) throw new SourceError(`${where}.repo is required`)
      const { registry, namePrefix } = splitRepository(repo, `${where}.repo`)
      const ca = parseCa(m.ca, `${where}.ca`)
      const dockerCfg = optionalString(m, 'dockerCfg', where)
      const credentials = dockerCfg ? credentialsFromDockerConfig(decodeBase64(dockerCfg, `${where}.dockerCfg`), registry, `${where}.dockerCfg`) : undefined
      if (sources.some((s) => s.kind === 'module-source' && s.name === name)) throw new SourceError(`${where}: duplicate name "${name}"`)
      sources.push(registrySource({ name, kind: 'module-source', registry, namePrefix, scheme: parseScheme(m.scheme, where), ca, credentials }))
    })
  }
  if (root.packageRepositories !== undefined) sources.push(...parsePackageRepositoriesConfig(root.packageRepositories, what))
  return sources
}

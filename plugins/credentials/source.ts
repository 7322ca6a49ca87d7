import { X509Certificate } from 'node:crypto'
import { inspect } from 'node:util'

/**
 * Registry credentials. The secret never leaves this object by accident: `JSON.stringify`,
 * `util.inspect` and template strings all print `[redacted]`; only {@link basicHeader}
 * reveals it, at the moment a request is sent.
 */
export class Credentials {
  readonly #username: string
  readonly #password: string
  constructor(username: string, password: string) {
    this.#username = username
    this.#password = password
  }
  /** The value of an `Authorization: Basic` header. */
  basicHeader(): string {
    return `Basic ${Buffer.from(`${this.#username}:${this.#password}`).toString('base64')}`
  }
  /** A stable, non-reversible identity for cache keys (tokens are cached per identity). */
  get username(): string {
    return this.#username
  }
  toJSON(): string {
    return '[redacted]'
  }
  toString(): string {
    return '[redacted]'
  }
  [inspect.custom](): string {
    return 'Credentials([redacted])'
  }
}

/** One registry the proxy may talk to, and how. */
export interface RegistrySource {
  /** `default`, or the ModuleSource (PackageRepository) name: for logs only, never a metric label. */
  readonly name: string
  /** A `package-repository` serves package icons only (by name), never `/package`. */
  readonly kind: 'default' | 'module-source' | 'package-repository'
  /** What a request's `repository` must equal: `host[:port]/path`. */
  readonly repository: string
  /** `host[:port]` of the registry. */
  readonly registry: string
  /** The repository path inside the registry (`deckhouse/ce`), possibly empty. */
  readonly namePrefix: string
  readonly scheme: 'http' | 'https'
  /** Extra CA certificates (PEM), added to the system roots. */
  readonly ca?: string
  readonly credentials?: Credentials
}

/**
 * A source from its parsed parts, the same way for every provider: `repository` is rebuilt
 * from the split `registry` and `namePrefix`, and absent `ca` and `credentials` are left out.
 */
export function registrySource(parts: {
  name: string
  kind: RegistrySource['kind']
  registry: string
  namePrefix: string
  scheme: RegistrySource['scheme']
  ca: string | undefined
  credentials: Credentials | undefined
}): RegistrySource {
  const { ca, credentials, ...rest } = parts
  return {
    ...rest,
    repository: rest.namePrefix ? `${rest.registry}/${rest.namePrefix}` : rest.registry,
    ...(ca ? { ca } : {}),
    ...(credentials ? { credentials } : {}),
  }
}

/** A source definition is wrong; the message names the source and key, never the secret. */
export class SourceError extends Error {
  readonly code = 'ESOURCE'
  override readonly name = 'SourceError'
}

const HOST = /^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*|\[[0-9a-fA-F:.]+\])(?::[0-9]{1,5})?$/
const COMPONENT = /^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$/

/** True for `host[:port]` as the OCI reference grammar allows it. */
export function isRegistryHost(text: string): boolean {
  return HOST.test(text)
}

/** True for a `/`-separated OCI repository path: no empty or `..` segments. */
export function isRepositoryPath(text: string): boolean {
  return text.length > 0 && text.length <= 255 && text.split('/').every((c) => COMPONENT.test(c))
}

/** Splits `host[:port]/a/b` into host and path; throws a SourceError naming `what`. */
export function splitRepository(repository: string, what: string): { registry: string; namePrefix: string } {
  const cleaned = repository.replace(/\/+$/, '')
  const slash = cleaned.indexOf('/')
  const registry = slash === -1 ? cleaned : cleaned.slice(0, slash)
  const namePrefix = slash === -1 ? '' : cleaned.slice(slash + 1)
  if (!isRegistryHost(registry)) throw new SourceError(`${what}: "${registry}" is not a registry host[:port]`)
  if (namePrefix !== '' && !isRepositoryPath(namePrefix)) {
    throw new SourceError(`${what}: "${namePrefix}" is not a valid repository path`)
  }
  return { registry, namePrefix }
}

export function parseScheme(value: unknown, what: string): 'http' | 'https' {
  if (value === undefined || value === null || value === '') return 'https'
  if (typeof value === 'string' && /^https?$/i.test(value)) return value.toLowerCase() as 'http' | 'https'
  throw new SourceError(`${what}: scheme must be http or https`)
}

/** Checks that `pem` holds at least one parseable certificate; returns it unchanged. */
export function parseCa(pem: unknown, what: string): string | undefined {
  if (pem === undefined || pem === null || pem === '') return undefined
  if (typeof pem !== 'string') throw new SourceError(`${what}: ca must be a PEM string`)
  const blocks = pem.match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g)
  if (!blocks) throw new SourceError(`${what}: ca holds no PEM certificate`)
  for (const block of blocks) {
    try {
      new X509Certificate(block)
    } catch {
      throw new SourceError(`${what}: ca holds a certificate that does not parse`)
    }
  }
  return pem
}

/**
 * Finds the credentials for `registry` in a docker config JSON text
 * (`{"auths": {"host": {"auth": base64("user:pass")} | {"username", "password"}}}`).
 * Keys may carry a scheme or a trailing path, as `docker login` sometimes writes them.
 */
export function credentialsFromDockerConfig(json: string, registry: string, what: string): Credentials | undefined {
  let doc: unknown
  try {
    doc = JSON.parse(json)
  } catch {
    throw new SourceError(`${what}: docker config is not valid JSON`)
  }
  if (typeof doc !== 'object' || doc === null) throw new SourceError(`${what}: docker config is not a JSON object`)
  const auths = (doc as { auths?: unknown }).auths
  if (auths === undefined) return undefined
  if (typeof auths !== 'object' || auths === null) throw new SourceError(`${what}: docker config "auths" is not an object`)
  const entries = Object.entries(auths as Record<string, unknown>)
  const hostOf = (key: string): string => key.replace(/^https?:\/\//, '').replace(/\/.*$/, '')
  const match = entries.find(([k]) => k === registry) ?? entries.find(([k]) => hostOf(k) === registry)
  if (!match) return undefined
  const entry = match[1] as { auth?: unknown; username?: unknown; password?: unknown } | null
  if (typeof entry !== 'object' || entry === null) throw new SourceError(`${what}: docker config entry for the registry is not an object`)
  if (typeof entry.auth === 'string' && entry.auth !== '') {
    const decoded = decodeBase64(entry.auth, `${what}: docker config "auth"`)
    const colon = decoded.indexOf(':')
    if (colon === -1) throw new SourceError(`${what}: docker config "auth" is not base64 of user:password`)
    return new Credentials(decoded.slice(0, colon), decoded.slice(colon + 1))
  }
  if (typeof entry.username === 'string' && typeof entry.password === 'string') {
    return new Credentials(entry.username, entry.password)
  }
  return undefined
}

/** Strict base64: rejects text that Buffer.from would silently half-decode. */
export function decodeBase64(text: string, what: string): string {
  const compact = text.replace(/\s+/g, '')
  if (!/^[A-Za-z0-9+/]*={0,2}$/.test(compact) || compact.length % 4 === 1) {
    throw new SourceError(`${what} is not valid base64`)
  }
  return Buffer.from(compact, 'base64').toString('utf8')
}

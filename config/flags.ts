import { isIP } from 'node:net'
import { resolve } from 'node:path'
import { parseArgs } from 'node:util'
import { parseQuantity } from './quantity.js'

export type LogLevel = 'debug' | 'info' | 'warn' | 'error'

/** The process configuration, as README's flag table ("Running it") defines it. */
export interface Flags {
  listenHost: string
  listenPort: number
  cacheDirectory: string
  cacheRetentionBytes: number
  disableCache: boolean
  /** Bytes per second the background scrubber re-hashes cached files; 0 turns it off. */
  scrubBytesPerSecond: number
  kubeconfig?: string
  registryConfig?: string
  logLevel: LogLevel
  /** `--bootstrap-listen-address`: the second, rpp-get-only listener (off when absent). */
  bootstrap?: { host: string; port: number; clusterUuid: string }
  /** `--peers`: every replica's `host:port` for peer fill (empty: off). */
  peers: string[]
  /** `--peer-timeout`: first-byte and idle bound for a peer's answer, in ms. */
  peerTimeoutMs: number
  /** `--peer-ca-file`: in a pod, peer fill among the Deployment's pods, verified against this CA. */
  peerCaFile?: string
  /** `--peer-server-name`: the DNS name the peers' serving certificates carry. */
  peerServerName?: string
}

/** A flag or config problem: main prints the message on one line and exits with code 2. */
export class ConfigError extends Error {
  readonly code = 'ECONFIG'
  override readonly name = 'ConfigError'
}

/** The folder used when neither the flag nor its env var is given (the image sets /cache). */
export const DEFAULT_CACHE_DIRECTORY = 'cache'

interface FlagSpec {
  name: string
  boolean?: boolean
  default?: string
}

const SPECS: FlagSpec[] = [
  { name: 'listen-address', default: '127.0.0.1:5080' },
  { name: 'cache-directory', default: DEFAULT_CACHE_DIRECTORY },
  { name: 'cache-retention-size', default: '1Gi' },
  { name: 'disable-cache', boolean: true, default: 'false' },
  // 4 MiB/s costs well under 1% of a core (BENCHMARKS.md) and checks a full 1 GiB cache in
  // about 4.5 minutes.
  { name: 'scrub-rate', default: '4Mi' },
  { name: 'kubeconfig' },
  { name: 'registry-config' },
  { name: 'log-level', default: 'info' },
  { name: 'bootstrap-listen-address' },
  { name: 'cluster-uuid' },
  { name: 'peers' },
  // Peers are near: a peer that says nothing for this long is slower than the registry.
  { name: 'peer-timeout', default: '5s' },
  { name: 'peer-ca-file' },
  { name: 'peer-server-name' },
]

export const FLAG_NAMES: readonly string[] = SPECS.map((s) => s.name)

/** `--cache-directory` -> `RPP_CACHE_DIRECTORY`. */
export function envName(flag: string): string {
  return `RPP_${flag.toUpperCase().replace(/-/g, '_')}`
}

function parseBoolean(flag: string, text: string): boolean {
  if (/^(true|1|yes)$/i.test(text)) return true
  if (/^(false|0|no|)$/i.test(text)) return false
  throw new ConfigError(`--${flag}: "${text}" is not a boolean (true or false)`)
}

/** Splits `host:port` or `[v6]:port`; the port must be 0-65535. */
export function parseListenAddress(text: string, flag = 'listen-address'): { host: string; port: number } {
  const m = /^(?:\[([^\]]+)\]|([^:]*)):(\d{1,5})$/.exec(text)
  const port = m ? Number(m[3]) : NaN
  if (!m || port > 65535) {
    throw new ConfigError(`--${flag}: "${text}" is not host:port (example: 127.0.0.1:5080)`)
  }
  return { host: m[1] ?? (m[2] || '0.0.0.0'), port }
}

const DNS_NAME = /^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$/i

/**
 * An IP address (IPv6 in brackets) or a DNS name whose last label is not all digits (such a
 * name is an IPv4 address to a URL parser: `10.0.0.256` and `1.2.3.4.5` are no address at
 * all), and one a URL accepts: the peer client builds one from it for every request.
 */
function isPeerHost(host: string, bracketed: boolean): boolean {
  const ip = isIP(host)
  if (bracketed ? ip !== 6 : ip === 6) return false
  if (ip === 0 && (!DNS_NAME.test(host) || /(^|\.)\d+$/.test(host))) return false
  try {
    new URL(`http://${bracketed ? `[${host}]` : host}:1`)
    return true
  } catch {
    return false
  }
}

/** `--peers`: `host:port,host:port,…`, each as `--listen-address` writes it; duplicates dropped. */
function parsePeers(text: string): string[] {
  const members = text
    .split(',')
    .map((p) => p.trim())
    .filter((p) => p !== '')
  for (const m of members) {
    const { host, port } = parseListenAddress(m, 'peers')
    if (host === '0.0.0.0' || host === '::' || port === 0) throw new ConfigError(`--peers: "${m}" is not an address another replica can reach`)
    if (!isPeerHost(host, m.startsWith('['))) throw new ConfigError(`--peers: "${m}" is not host:port with an IP address or DNS name as host`)
  }
  return [...new Set(members)]
}

/** A duration: `500ms`, `5s`. */
function parseDuration(flag: string, text: string): number {
  const m = /^(\d{1,7})(ms|s)$/.exec(text)
  if (!m) throw new ConfigError(`--${flag}: "${text}" is not a duration (examples: 500ms, 5s)`)
  const ms = Number(m[1]) * (m[2] === 's' ? 1000 : 1)
  if (ms === 0) throw new ConfigError(`--${flag} must be more than 0`)
  return ms
}

/**
 * Parses argv (without node and script) over the environment. Flags win over `RPP_*` env
 * vars, which win over defaults. Throws {@link ConfigError} naming the flag on any problem.
 */
export function parseFlags(argv: readonly string[], env: NodeJS.ProcessEnv = process.env, cwd = process.cwd()): Flags {
  const values = new Map<string, string>()
  for (const spec of SPECS) {
    const fromEnv = env[envName(spec.name)]
    if (fromEnv !== undefined && fromEnv !== '') values.set(spec.name, fromEnv)
    else if (spec.default !== undefined) values.set(spec.name, spec.default)
  }
  // node:util parses; what it leaves to us: the RPP_* fallback above, and one-line messages
  // that name the flag (main exits 2 with them).
  const { tokens } = parseArgs({
    args: [...argv],
    options: Object.fromEntries(SPECS.map((s) => [s.name, { type: s.boolean ? 'boolean' : 'string' }] as const)),
    strict: false,
    allowPositionals: true,
    tokens: true,
  })
  for (const token of tokens) {
    const arg = argv[token.index] ?? ''
    if (token.kind !== 'option' || !/^--[a-z-]+$/.test(token.rawName)) throw new ConfigError(`unexpected argument "${arg}" (flags look like --name=value)`)
    const spec = SPECS.find((s) => s.name === token.name)
    if (!spec) throw new ConfigError(`unknown flag --${token.name} (known: ${SPECS.map((s) => `--${s.name}`).join(', ')})`)
    const value = token.value ?? (spec.boolean ? 'true' : undefined)
    if (value === undefined) throw new ConfigError(`--${token.name} needs a value`)
    values.set(token.name, value)
  }

  const listen = parseListenAddress(values.get('listen-address') ?? '')
  let retention: number
  try {
    retention = parseQuantity(values.get('cache-retention-size') ?? '')
  } catch (err) {
    throw new ConfigError(`--cache-retention-size: ${(err as Error).message}`)
  }
  let scrub: number
  try {
    scrub = parseQuantity(values.get('scrub-rate') ?? '')
  } catch (err) {
    throw new ConfigError(`--scrub-rate: ${(err as Error).message} (bytes per second, 0 turns the scrubber off)`)
  }
  const logLevel = values.get('log-level') ?? 'info'
  if (!['debug', 'info', 'warn', 'error'].includes(logLevel)) {
    throw new ConfigError(`--log-level: "${logLevel}" is not one of debug, info, warn, error`)
  }
  const cacheDirectory = values.get('cache-directory') ?? ''
  if (cacheDirectory === '') throw new ConfigError('--cache-directory must not be empty')
  const kubeconfig = values.get('kubeconfig')
  const registryConfig = values.get('registry-config')
  const bootstrapAddress = values.get('bootstrap-listen-address')
  const clusterUuid = values.get('cluster-uuid')
  let bootstrap: Flags['bootstrap']
  if (bootstrapAddress) {
    // The UUID is a path segment the client sends: anything that cannot be one is a mistake.
    if (!clusterUuid) throw new ConfigError('--bootstrap-listen-address needs --cluster-uuid (or RPP_CLUSTER_UUID)')
    if (!/^[^/?#%\s]{1,128}$/.test(clusterUuid)) throw new ConfigError('--cluster-uuid must be one URL path segment (no "/", "?", "#", "%" or spaces)')
    bootstrap = { ...parseListenAddress(bootstrapAddress, 'bootstrap-listen-address'), clusterUuid }
  }
  const peers = parsePeers(values.get('peers') ?? '')
  const peerTimeoutMs = parseDuration('peer-timeout', values.get('peer-timeout') ?? '')
  const peerCaFile = values.get('peer-ca-file')
  const peerServerName = values.get('peer-server-name')
  // SNI and the certificate check want a DNS name; a peer's IP is checked without this flag.
  if (peerServerName !== undefined && !/^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$/i.test(peerServerName)) {
    throw new ConfigError(`--peer-server-name: "${peerServerName}" is not a DNS name`)
  }
  if (peerServerName !== undefined && isIP(peerServerName))
    throw new ConfigError("--peer-server-name must be a DNS name: without it the certificate must name the peer's IP")
  return {
    peers,
    peerTimeoutMs,
    ...(peerCaFile ? { peerCaFile: resolve(cwd, peerCaFile) } : {}),
    ...(peerServerName ? { peerServerName } : {}),
    listenHost: listen.host,
    listenPort: listen.port,
    cacheDirectory: resolve(cwd, cacheDirectory),
    cacheRetentionBytes: retention,
    disableCache: parseBoolean('disable-cache', values.get('disable-cache') ?? 'false'),
    scrubBytesPerSecond: scrub,
    ...(kubeconfig ? { kubeconfig: resolve(cwd, kubeconfig) } : {}),
    ...(registryConfig ? { registryConfig: resolve(cwd, registryConfig) } : {}),
    logLevel: logLevel as LogLevel,
    ...(bootstrap ? { bootstrap } : {}),
  }
}

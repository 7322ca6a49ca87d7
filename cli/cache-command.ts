import { readFileSync } from 'node:fs'
import { request as httpRequest, type IncomingMessage } from 'node:http'
import { request as httpsRequest } from 'node:https'
import { join, resolve } from 'node:path'
import { DEFAULT_CACHE_DIRECTORY } from '../config/flags.js'
import { formatBytes } from '../config/quantity.js'
import type { CacheEntryView, CacheListView } from '../handlers/cache.js'
import { ADMIN_TOKEN_FILE, ADMIN_TOKEN_HEADER, readAdminToken } from '../plugins/packages/cache/admin-token.js'
import { DIGEST } from '../plugins/packages/manifest.js'

/** `registry-packages-proxy cache ls|show <digest>|rm <digest> [--url URL] [--json]`. */
const CACHE_USAGE =
  'usage: registry-packages-proxy cache ls|show <digest>|rm <digest> [--url http://127.0.0.1:5080] [--json] [--sort lastAccess|size|hits|createdAt|digest] [--limit N]' +
  ' [--token-file <cache directory>/admin-token] [--bearer-token-file FILE] [--insecure]'

export interface CliIo {
  out: (text: string) => void
  err: (text: string) => void
}

/** How to reach the proxy: an `https://` URL (kube-rbac-proxy) may need a bearer token and trust. */
interface Target {
  base: string
  /** Headers sent with every request (`Authorization` for kube-rbac-proxy). */
  headers: Record<string, string>
  /** Skip certificate verification (kube-rbac-proxy's self-signed certificate), like curl -k. */
  insecure: boolean
}

function call(target: Target, method: string, path: string, headers: Record<string, string> = {}): Promise<{ status: number; body: unknown }> {
  const url = new URL(path, target.base)
  const https = url.protocol === 'https:'
  if (!https && url.protocol !== 'http:') return Promise.reject(new Error(`--url must be http:// or https://, not ${url.protocol}`))
  const options = { method, timeout: 10_000, headers: { ...target.headers, ...headers }, ...(https && target.insecure ? { rejectUnauthorized: false } : {}) }
  return new Promise((resolve, reject) => {
    const onResponse = (res: IncomingMessage): void => {
      const chunks: Buffer[] = []
      res.on('data', (c: Buffer) => chunks.push(c))
      res.on('end', () => {
        const text = Buffer.concat(chunks).toString('utf8')
        let body: unknown = text
        try {
          body = JSON.parse(text)
        } catch {
          // not JSON: keep the text
        }
        resolve({ status: res.statusCode ?? 0, body })
      })
    }
    const req = https ? httpsRequest(url, options, onResponse) : httpRequest(url, options, onResponse)
    req.on('timeout', () => req.destroy(new Error('timed out after 10 s')))
    req.on('error', reject)
    req.end()
  })
}

/**
 * Where `rm` finds the admin token by default: the cache directory as the proxy resolves it
 * (`RPP_CACHE_DIRECTORY`, which the image sets to /cache, else `./cache`). Inside the container
 * (kubectl exec) that is the running proxy's own file.
 */
function defaultTokenFile(env: NodeJS.ProcessEnv): string {
  return join(resolve(env.RPP_CACHE_DIRECTORY || DEFAULT_CACHE_DIRECTORY), ADMIN_TOKEN_FILE)
}

function short(digest: string): string {
  return digest.replace(/^sha256:/, '').slice(0, 12)
}

function table(rows: string[][]): string {
  const widths = rows[0]?.map((_, i) => Math.max(...rows.map((r) => (r[i] ?? '').length))) ?? []
  return rows
    .map((r) =>
      r
        .map((c, i) => c.padEnd(widths[i] ?? 0))
        .join('  ')
        .trimEnd(),
    )
    .join('\n')
}

function entryRows(items: CacheEntryView[]): string[][] {
  return [
    ['LAYER', 'SIZE', 'HITS', 'LAST ACCESS', 'MANIFESTS'],
    ...items.map((e) => [short(e.digest), formatBytes(e.size), String(e.hits), e.lastAccess.replace(/\.\d+Z$/, 'Z'), e.manifests.map(short).join(',') || '-']),
  ]
}

/** Runs the subcommand; returns the process exit code (0 ok, 1 not found or failed, 2 usage). */
export async function runCacheCommand(argv: readonly string[], io: CliIo, env: NodeJS.ProcessEnv = process.env): Promise<number> {
  let url = env.RPP_URL ?? 'http://127.0.0.1:5080'
  let json = false
  let sort: string | undefined
  let limit: string | undefined
  let tokenFile: string | undefined
  let bearerFile: string | undefined
  let insecure = false
  const positional: string[] = []
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i] ?? ''
    const eq = a.indexOf('=')
    const [flag, inline] = a.startsWith('--') && eq > 0 ? [a.slice(0, eq), a.slice(eq + 1)] : [a, undefined]
    const value = (): string => {
      const v = inline ?? argv[++i]
      if (v === undefined) throw new Error(`${flag} needs a value`)
      return v
    }
    try {
      if (flag === '--json') json = true
      else if (flag === '--url') url = value()
      else if (flag === '--sort') sort = value()
      else if (flag === '--limit') limit = value()
      else if (flag === '--token-file') tokenFile = value()
      else if (flag === '--bearer-token-file') bearerFile = value()
      else if (flag === '--insecure') insecure = true
      else if (a.startsWith('--')) throw new Error(`unknown flag ${flag}`)
      else positional.push(a)
    } catch (err) {
      io.err(`${(err as Error).message}\n${CACHE_USAGE}`)
      return 2
    }
  }
  const headers: Record<string, string> = {}
  if (bearerFile !== undefined) {
    try {
      headers.Authorization = `Bearer ${readFileSync(bearerFile, 'utf8').trim()}`
    } catch (err) {
      io.err(`cannot read --bearer-token-file ${bearerFile} (${(err as NodeJS.ErrnoException).code ?? 'error'})`)
      return 1
    }
  }
  const target: Target = { base: url, headers, insecure }
  const [command, digest] = positional
  if (command === 'ls' && positional.length === 1) {
    const qs = new URLSearchParams({ ...(sort ? { sort } : {}), ...(limit ? { limit } : {}) }).toString()
    return fetchAnd(io, target, 'GET', `/cache${qs ? `?${qs}` : ''}`, {}, (body) => {
      if (json) return JSON.stringify(body, null, 2)
      const s = body as CacheListView
      const head =
        `cache ${s.enabled ? 'enabled' : 'DISABLED'}: ${formatBytes(s.usedBytes)} of ${formatBytes(s.limitBytes)} in ${s.entries} entries; ` +
        `hits ${s.hit}, misses ${s.miss}, coalesced ${s.coalesced}, bypassed ${s.bypass}, hit ratio ${(s.hitRatio * 100).toFixed(1)}%; evictions ${s.evictions}`
      const why = s.unavailable ? `\n${s.unavailable}` : ''
      return s.items.length === 0 ? `${head}${why}` : `${head}${why}\n\n${table(entryRows(s.items))}`
    })
  }
  if ((command === 'show' || command === 'rm') && digest && positional.length === 2) {
    if (!DIGEST.test(digest)) {
      io.err(`"${digest}" is not sha256:<64 lowercase hex>`)
      return 2
    }
    // Deleting needs the proxy's admin token (see plugins/packages/admin-token.ts).
    const extra: Record<string, string> = {}
    if (command === 'rm') {
      const file = tokenFile ?? defaultTokenFile(env)
      try {
        extra[ADMIN_TOKEN_HEADER] = readAdminToken(file)
      } catch (err) {
        io.err(
          `cannot read the cache admin token ${file} (${(err as NodeJS.ErrnoException).code ?? 'error'}): run this where the proxy runs (kubectl exec), or pass --token-file`,
        )
        return 1
      }
    }
    return fetchAnd(io, target, command === 'show' ? 'GET' : 'DELETE', `/cache/${digest}`, extra, (body) => {
      if (json) return JSON.stringify(body, null, 2)
      if (command === 'rm') return `removed ${(body as { removed: CacheEntryView }).removed.digest}`
      const e = body as CacheEntryView
      return table([
        ['layer', e.digest],
        ['manifests', e.manifests.join(', ') || '-'],
        ['size', `${formatBytes(e.size)} (${e.size} bytes)`],
        ['hits', String(e.hits)],
        ['last access', e.lastAccess],
        ['cached since', e.createdAt],
      ])
    })
  }
  io.err(CACHE_USAGE)
  return 2
}

async function fetchAnd(
  io: CliIo,
  target: Target,
  method: string,
  path: string,
  headers: Record<string, string>,
  render: (body: unknown) => string,
): Promise<number> {
  let res
  try {
    res = await call(target, method, path, headers)
  } catch (err) {
    io.err(`cannot reach ${target.base}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`)
    return 1
  }
  if (res.status !== 200) {
    const message = typeof res.body === 'object' && res.body !== null ? String((res.body as { message?: unknown }).message) : String(res.body)
    io.err(`${res.status}: ${message}`)
    return 1
  }
  io.out(render(res.body))
  return 0
}

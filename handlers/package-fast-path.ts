import type { IncomingMessage, ServerResponse } from 'node:http'
import type { SourceSet } from '../plugins/credentials/source-set.js'
import type { PackageService } from '../plugins/packages/package-service.js'
import { parsePackageQuery } from './package-request.js'

export interface FastPathDeps {
  sources: SourceSet
  packages: PackageService
  /** Told about every request answered here, as hapi's 'response' event would be. */
  onServed: (info: { id: string; digest: string; repository?: string; source: string; path?: string; bytes: number; ms: number; finished: boolean }) => void
}

/**
 * The plain GET of a package whose bytes are in memory, answered before hapi routes it.
 *
 * Such a hit is most of the traffic during a cluster roll-out and costs one socket write; hapi's
 * request lifecycle (routing, lifecycle extensions, response marshalling) would double its CPU
 * cost. Everything else (misses, HEAD, Range, conditional requests, any invalid input) returns
 * false and goes to the hapi route, which stays the one definition of the API: the headers here
 * are the ones `handlers/package.ts` sends, and a test compares the two byte for byte.
 */
export function packageFastPath(deps: FastPathDeps): (req: IncomingMessage, res: ServerResponse) => boolean {
  let counter = 0
  return (req, res) => {
    if (req.method !== 'GET' || !req.url?.startsWith('/package?')) return false
    const h = req.headers
    if (h.range !== undefined || h['if-none-match'] !== undefined || h['if-range'] !== undefined) return false
    const params = new URLSearchParams(req.url.slice('/package?'.length))
    const query: Record<string, string | string[]> = {}
    for (const key of new Set(params.keys())) {
      const all = params.getAll(key)
      query[key] = all.length === 1 ? (all[0] ?? '') : all
    }
    let parsed
    let source
    try {
      parsed = parsePackageQuery(query)
      source = deps.sources.match(parsed.repository)
    } catch {
      return false // hapi answers the 400 or 404
    }
    const hit = deps.packages.memoryHit(parsed.digest)
    if (!hit) return false
    const started = Date.now()
    const hex = parsed.digest.slice('sha256:'.length)
    res.writeHead(200, {
      etag: `"${parsed.digest}"`,
      'cache-control': 'public, max-age=31536000, immutable',
      'accept-ranges': 'bytes',
      'content-type': 'application/x-gzip',
      'content-disposition': `attachment; filename="${hex}.tar.gz"`,
      'content-length': String(hit.length),
      'x-cache': 'HIT',
    })
    res.end(hit)
    const id = `fast:${started}:${++counter}`
    res.once('close', () =>
      deps.onServed({
        id,
        digest: parsed.digest,
        ...(parsed.repository ? { repository: parsed.repository } : {}),
        source: source.name,
        ...(parsed.path ? { path: parsed.path } : {}),
        bytes: hit.length,
        ms: Date.now() - started,
        finished: res.writableFinished,
      }),
    )
    return true
  }
}

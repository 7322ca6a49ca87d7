import type { IncomingMessage, ServerResponse } from 'node:http'
import type { SourceSet } from '../plugins/credentials/source-set.js'
import { ReadBuffers, sendFile } from '../plugins/packages/file-sender.js'
import type { PackageService } from '../plugins/packages/package-service.js'
import { packageHeaders, parsePackageQuery, queryOf, type PackageQuery } from './package-request.js'
import { delivered, whenClosed } from './response-end.js'

type Listener = (req: IncomingMessage, res: ServerResponse) => void

export interface FastPathDeps {
  sources: SourceSet
  packages: PackageService
  /** hapi's own listener: every request the fast path declines, or gives back, goes there unchanged. */
  fallback: Listener
  /** Told about every request answered here, as hapi's 'response' event would be. */
  onServed: (hit: { id: string; asked: AskedPackage; source: string; bytes: number; ms: number; finished: boolean }) => void
  /** Large read buffers for hits from disk (shared by every response). */
  buffers?: ReadBuffers
}

/**
 * The plain GET of a whole cached package, answered before hapi routes it.
 *
 * Hits are most of the traffic during a cluster roll-out, and this is where a master's CPU goes:
 * hapi's request lifecycle (routing, lifecycle extensions, response marshalling) would double
 * the cost of a hit from memory, and its stream plumbing (a Buffer allocated per 64 KiB read,
 * then piped) quadruples that of a hit from disk. A hit from memory is one socket write; a hit
 * from disk is sent by {@link sendFile} in 1 MiB reads into reused buffers. Everything else
 * (misses, HEAD, Range, conditional requests, any invalid input, a file that fails its check)
 * goes to the hapi route, which stays the one definition of the API: the headers are
 * {@link packageHeaders} both ways, and a test compares the two byte for byte.
 */
export function packageFastPath(deps: FastPathDeps): { listener: Listener } {
  let counter = 0
  const buffers = deps.buffers ?? new ReadBuffers()
  const queries = new QueryMemo()
  const listener: Listener = (req, res) => {
    const request = parse(req, deps.sources, queries)
    const hit = request && deps.packages.cachedHit(request.query.digest)
    if (!request || !hit) return deps.fallback(req, res)
    const { query, asked, source } = request
    const started = Date.now()
    const id = `fast:${started}:${++counter}`
    const served = (bytes: number): void => deps.onServed({ id, asked, source, bytes, ms: Date.now() - started, finished: delivered(res) })
    if ('buffer' in hit) {
      res.writeHead(200, packageHeaders(query.digest, hit.buffer.length, 'HIT'))
      res.end(hit.buffer)
      whenClosed(req, res, () => {
        hit.release()
        served(hit.buffer.length)
      })
      return
    }
    hit.open().then(
      (file) => {
        if (!file) return deps.fallback(req, res)
        if (res.destroyed || req.socket.destroyed) {
          file.close()
          return served(0)
        }
        res.writeHead(200, packageHeaders(query.digest, file.size, 'HIT'))
        whenClosed(req, res, () => served(file.size))
        sendFile(res, (f) => whenClosed(req, res, f), file.handle.fd, 0, file.size - 1, buffers, file.close, file.unchanged)
      },
      () => deps.fallback(req, res),
    )
  }
  return { listener }
}

/** The query and source of a plain whole-package GET; undefined for anything hapi must answer. */
function parse(req: IncomingMessage, sources: SourceSet, queries: QueryMemo): (Remembered & { source: string }) | undefined {
  const url = req.url
  // A fragment is not part of the query; hapi drops it, so such a request is hapi's to answer.
  if (req.method !== 'GET' || url === undefined || !url.startsWith('/package?') || url.includes('#')) return undefined
  const h = req.headers
  if (h.range !== undefined || h['if-none-match'] !== undefined || h['if-range'] !== undefined) return undefined
  try {
    const { query, asked } = queries.get(url)
    // The source is matched every time: the set of sources changes with the cluster's config.
    return { query, asked, source: sources.match(query.repository).name }
  } catch {
    return undefined // hapi answers the 400 or 404
  }
}

/**
 * The package a request asked for, as its line in the request log shows it: the parameters as
 * the client sent them, as the hapi route logs them (package-request.ts, requestQuery: before the trailing
 * `/` of `repository` and the leading `/` of `path` are dropped), so that one URL is logged one
 * way whichever path answers it.
 */
export interface AskedPackage {
  digest: string
  repository: string | undefined
  path: string | undefined
}

/** A URL's query, validated, and as it was sent. */
export interface Remembered {
  query: PackageQuery
  asked: AskedPackage
}

/**
 * Valid `/package` queries by URL, as parsed. A roll-out's nodes ask for the same few URLs
 * thousands of times, and splitting and validating each again was a twentieth of a memory hit's
 * CPU. Parsing is a pure function of the URL, so a remembered answer is always the right one;
 * invalid URLs are not remembered (they go to hapi), and past `max` entries the memo starts
 * over, so hostile URLs cost at most `max` short strings.
 */
export class QueryMemo {
  private readonly parsed = new Map<string, Remembered>()
  constructor(private readonly max = 256) {}

  /** URLs remembered (at most `max`). */
  get size(): number {
    return this.parsed.size
  }

  /** The URL's query, validated, and as sent; throws as parsePackageQuery does. */
  get(url: string): Remembered {
    const known = this.parsed.get(url)
    if (known) return known
    const sent = queryOf(url.slice('/package?'.length))
    const query = parsePackageQuery(sent)
    // parsePackageQuery refuses a parameter given twice: each is one string, or absent.
    const asked = { digest: query.digest, repository: sent.repository as string | undefined, path: sent.path as string | undefined }
    const remembered = Object.freeze({ query: Object.freeze(query), asked: Object.freeze(asked) })
    if (url.length <= 1024) {
      if (this.parsed.size >= this.max) this.parsed.clear()
      this.parsed.set(url, remembered)
    }
    return remembered
  }
}

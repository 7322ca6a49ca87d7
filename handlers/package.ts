import type { Request, ResponseObject, ResponseToolkit } from '@hapi/hapi'
import { RangeNotSatisfiableError } from '../errors.js'
import type { SourceSet } from '../plugins/credentials/source-set.js'
import { verifyDigest } from '../plugins/packages/manifest.js'
import { PEER_WORKING_INTERVAL_MS, type PeerRequest } from '../plugins/packages/peer-port.js'
import type { PackageResult, PackageService } from '../plugins/packages/package-service.js'
import { matchesIfNoneMatch, packageHeaders, parsePackageQuery, parseRange, requestQuery } from './package-request.js'
import { whenClosed } from './response-end.js'

function header(request: Request, name: string): string | undefined {
  const v: unknown = request.headers[name]
  return typeof v === 'string' ? v : undefined
}

/** Marks a request from another replica: `1` (fill if you must, never forward) or `cached`. */
export const PEER_HEADER = 'x-rpp-peer'

/**
 * Who sent the request. Anyone may send the header: it only narrows what this replica does
 * (no peer is asked, or nothing but the cache is used), so it grants nothing.
 */
function peerOrigin(request: Request): PeerRequest['from'] {
  const v = header(request, PEER_HEADER)
  return v === 'cached' ? 'cached' : v === undefined ? 'client' : 'peer'
}

export interface PackageHandlerDeps {
  sources: SourceSet
  packages: PackageService
  /** Told how each request was served (logs, metrics). */
  onResult?: (request: Request, result: PackageResult | 'not-modified' | 'head') => void
  /** Told when a body fails after the headers went out (the connection is then aborted). */
  onStreamError?: (request: Request, result: PackageResult, err: Error) => void
}

/**
 * `GET|HEAD /package`: validate, pick the source (an unknown repository is a 404 before any
 * connection), resolve the manifest, then answer 304, 416, HEAD headers, or stream the bytes.
 * Errors are thrown as errors.ts classes; the route (plugins/packages/routes.ts) maps them with toBoom.
 */
export function packageHandler(deps: PackageHandlerDeps) {
  return async (request: Request, h: ResponseToolkit): Promise<ResponseObject> => {
    const query = parsePackageQuery(requestQuery(request.raw.req.url))
    const source = deps.sources.match(query.repository)
    request.app.source = source.name
    const name = [source.namePrefix, query.path].filter(Boolean).join('/')
    const etag = `"${query.digest}"`
    const common = (response: ResponseObject): ResponseObject =>
      response.header('ETag', etag).header('Cache-Control', 'public, max-age=31536000, immutable').header('Accept-Ranges', 'bytes')

    // The ETag is the digest the client asked for: a match needs no registry at all.
    const ifNoneMatch = header(request, 'if-none-match')
    if (matchesIfNoneMatch(ifNoneMatch, etag)) {
      deps.onResult?.(request, 'not-modified')
      return common(h.response().code(304))
    }

    const from = peerOrigin(request)
    const member = header(request, 'x-rpp-from')
    const instance = header(request, 'x-rpp-instance')
    const via = { ...(member !== undefined ? { member } : {}), ...(instance !== undefined ? { instance } : {}) }
    const peer: PeerRequest = { ...query, from, ...(from === 'peer' ? { via } : {}) }
    if (peer.from !== 'client') request.app.peer = peer.from
    // The requester bounds its wait for our answer by --peer-timeout; while our own registry
    // is slow (the lookup, the fill's first answer) we tell it we are working, so that its
    // bound measures this replica, not the registry.
    const stopWorking = peer.from === 'peer' ? working(request) : undefined
    try {
      return await answer()
    } finally {
      stopWorking?.()
    }

    async function answer(): Promise<ResponseObject> {
      const pkg = await deps.packages.resolve(source, name, query.digest, peer)
      // `*` only now: it means "you have it", which is known once the manifest was found.
      if (matchesIfNoneMatch(ifNoneMatch, etag, true)) {
        deps.onResult?.(request, 'not-modified')
        return common(h.response().code(304))
      }
      const size = pkg.layer.size
      // A layer the manifest says is empty is never downloaded, so its digest is checked here:
      // zero bytes hash to one digest only, and any other is a mismatch, not an empty package.
      if (size === 0) verifyDigest('layer', Buffer.alloc(0), pkg.layer.digest)
      const ifRange = header(request, 'if-range')
      const range = ifRange && ifRange !== etag ? undefined : parseRange(header(request, 'range'), size)
      if (range === 'unsatisfiable') throw new RangeNotSatisfiableError(size)
      const start = range?.start ?? 0
      const end = range?.end ?? size - 1
      const withHeaders = (response: ResponseObject, cache: string): ResponseObject => {
        for (const [name, value] of Object.entries(packageHeaders(query.digest, end - start + 1, cache))) response.header(name, value)
        if (range) response.code(206).header('Content-Range', `bytes ${start}-${end}/${size}`)
        return response
      }

      // HEAD needs only the manifest: never start a layer download for it.
      if (request.method === 'head' || size === 0) {
        deps.onResult?.(request, 'head')
        return withHeaders(h.response(size === 0 ? '' : undefined), pkg.cached ? 'HIT' : 'MISS').code(range ? 206 : 200)
      }

      const body = await deps.packages.open(source, name, pkg, start, end, peer)
      deps.onResult?.(request, body.result)
      if (body.release) whenClosed(request.raw.req, request.raw.res, body.release)
      if (body.buffer) return withHeaders(h.response(body.buffer), body.result.toUpperCase())
      const stream = body.stream
      stream.once('error', (err: Error) => deps.onStreamError?.(request, body.result, err))
      return withHeaders(h.response(stream), body.result.toUpperCase())
    }
  }
}

/**
 * Sends `102 Processing` now and every {@link PEER_WORKING_INTERVAL_MS} until stopped (the final
 * answer is about to go out): the requesting replica re-arms its first-byte bound on each.
 */
function working(request: Request): () => void {
  const res = request.raw.res
  const send = (): void => {
    if (typeof res.writeProcessing === 'function' && !res.headersSent && !res.destroyed) res.writeProcessing()
  }
  send()
  const timer = setInterval(send, PEER_WORKING_INTERVAL_MS)
  timer.unref()
  return () => clearInterval(timer)
}

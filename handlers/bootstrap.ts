import type { IncomingMessage, ServerResponse } from 'node:http'
import { BadRequestError, MethodNotAllowedError, NotFoundError, toBoom } from '../errors.js'
import type { RppGetFiles } from '../plugins/bootstrap/rpp-get.js'
import type { SourceSet } from '../plugins/credentials/source-set.js'
import { DIGEST } from '../plugins/packages/manifest.js'
import { delivered, watchDelivery, whenClosed } from './response-end.js'
import { defaultSource } from './v1-common.js'

export interface BootstrapDeps {
  clusterUuid: string
  sources: SourceSet
  files: RppGetFiles
  /** Told how each request ended: its route pattern, status, result and error (metrics, log). */
  onDone: (info: {
    route: string
    method: string
    status: number
    result: string
    bytes: number
    ms: number
    /** The answer began (a 200) but was cut off: `status` is 499, as on the main listener. */
    aborted?: boolean
    err?: unknown
  }) => void
}

export const RPP_GET_ROUTE = '/{uuid}/rpp-get'

function send(res: ServerResponse, status: number, headers: Record<string, string>, body: Buffer | undefined): void {
  res.writeHead(status, { ...headers, 'Content-Length': String(body?.length ?? 0) })
  res.end(body)
}

/** The one thing the bootstrap listener serves, checked in order: path (404), method (405), digest (400). */
function parse(req: IncomingMessage, clusterUuid: string): { digest: string } {
  const url = new URL(req.url ?? '/', 'http://bootstrap')
  const m = /^\/([^/]+)\/rpp-get$/.exec(url.pathname)
  if (!m || m[1] !== clusterUuid) throw new NotFoundError('not found')
  if (req.method !== 'GET') throw new MethodNotAllowedError('only GET is allowed', ['GET'])
  const digests = url.searchParams.getAll('digest')
  const digest = digests[0]
  if (digests.length !== 1 || digest === undefined || !DIGEST.test(digest))
    throw new BadRequestError('"digest" must be given once as sha256:<64 lowercase hex>')
  return { digest }
}

/**
 * `GET /<cluster UUID>/rpp-get?digest=<manifest digest>` on the plain-HTTP bootstrap listener:
 * the `rpp-get` binary for nodes that do not have it yet. Everything else is 404 (another
 * path or UUID), 405 (another method) or 400 (no or a malformed digest); error bodies are the
 * same JSON as the main listener's.
 */
export function bootstrapHandler(deps: BootstrapDeps) {
  return (req: IncomingMessage, res: ServerResponse): void => {
    const started = Date.now()
    watchDelivery(req, res)
    // A request body is never read: drain it so the connection stays usable.
    req.resume()
    void (async () => {
      let route = 'bootstrap:/{p*}'
      try {
        // The path as parse() reads it: an absolute-form target (`GET http://host/…`) too.
        if (/^\/[^/]+\/rpp-get$/.test(new URL(req.url ?? '/', 'http://bootstrap').pathname)) route = RPP_GET_ROUTE
        const { digest } = parse(req, deps.clusterUuid)
        const source = defaultSource(deps.sources)
        const { data, result } = await deps.files.get(source, digest)
        send(
          res,
          200,
          {
            'Content-Type': 'application/octet-stream',
            'Content-Disposition': 'attachment; filename="rpp-get"',
            'Cache-Control': 'no-store',
            'X-Content-Type-Options': 'nosniff',
          },
          data,
        )
        // Told once the answer is done with: a node cut off mid-download (it stopped reading, or
        // a stop's budget ran out) got a 499, not the whole binary.
        whenClosed(req, res, () => {
          const ms = Date.now() - started
          if (delivered(res)) deps.onDone({ route, method: req.method ?? '', status: 200, result, bytes: data.length, ms })
          else deps.onDone({ route, method: req.method ?? '', status: 499, result, bytes: 0, ms, aborted: true })
        })
      } catch (err) {
        const boom = toBoom(err)
        const body = Buffer.from(JSON.stringify(boom.output.payload))
        const headers: Record<string, string> = { 'Content-Type': 'application/json; charset=utf-8' }
        for (const [k, v] of Object.entries(boom.output.headers)) if (v !== undefined) headers[k] = String(v)
        const status = boom.output.statusCode
        const done = (bytes: number): void =>
          deps.onDone({ route, method: req.method ?? '', status, result: status === 404 ? 'not-found' : 'error', bytes, ms: Date.now() - started, err })
        if (res.headersSent) {
          res.destroy()
          return done(0)
        }
        send(res, status, headers, body)
        // As for a 200: told once the answer is done with, counting the body only if it went
        // out (a HEAD's never does).
        whenClosed(req, res, () => done(delivered(res) && req.method !== 'HEAD' ? body.length : 0))
      }
    })()
  }
}

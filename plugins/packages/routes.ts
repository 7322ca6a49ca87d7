import type { Lifecycle, Request, ResponseToolkit, Server } from '@hapi/hapi'
import { BusyError, DigestError, MethodNotAllowedError, RangeNotSatisfiableError, toBoom } from '../../errors.js'
import { deleteCacheEntryHandler, listCacheHandler, showCacheEntryHandler, type CacheHandlerDeps, type ResultCounts } from '../../handlers/cache.js'
import { packageHandler } from '../../handlers/package.js'
import { delivered } from '../../handlers/response-end.js'
import type { SourceSet } from '../credentials/source-set.js'
import type { Metrics } from '../metrics/metrics.js'
import { describe } from './log.js'
import { PACKAGE_RESULTS, type PackageResult, type PackageService } from './package-service.js'

const SERVED: ReadonlySet<string> = new Set(PACKAGE_RESULTS)

/**
 * Counts one way a package request ended, in the metrics and in `GET /cache`'s counts: for the
 * route and for the hits the fast path answers (server.ts).
 */
export function resultCounter(metrics: Metrics, counts: ResultCounts): (result: string) => void {
  return (result) => {
    metrics.packageResults.inc({ result })
    if (SERVED.has(result)) counts[result as PackageResult]++
  }
}

/** `GET|HEAD /package` (and 405 for other methods), with its results counted and logged. */
export function packageRoutes(
  server: Server,
  o: { sources: SourceSet; metrics: Metrics; service: PackageService; countResult: (result: string) => void },
): void {
  const onResult = (request: Request, result: string): void => {
    o.countResult(result)
    request.app.result = result
  }
  const onStreamError = (request: Request, _result: string, err: Error): void => {
    request.app.err = describe(err)
  }
  const handler = packageHandler({ sources: o.sources, packages: o.service, onResult, onStreamError })
  server.route({
    method: 'GET',
    path: '/package',
    options: { response: { ranges: false, emptyStatusCode: 200 } },
    handler: async (request, h) => {
      try {
        return await handler(request, h)
      } catch (err) {
        // A Range past the end is the client's question, not a failure to serve: no result.
        if (err instanceof RangeNotSatisfiableError) throw toBoom(err)
        if (err instanceof DigestError) o.metrics.digestMismatches.inc({ what: err.what })
        onResult(request, 'error')
        request.app.err = describe(err)
        if (err instanceof BusyError) o.metrics.downloadsRefused.inc({ kind: err.kind })
        throw toBoom(err)
      }
    },
  })
  server.route({
    method: '*',
    path: '/package',
    // Never read or parse a refused request's body: the answer is 405 whatever it holds.
    options: { payload: { parse: false, output: 'stream' } },
    handler: () => toBoom(new MethodNotAllowedError('only GET and HEAD are allowed on /package')),
  })
  server.events.on('response', (request) => {
    const result = request.app.result
    const length = Number(request.response && 'headers' in request.response ? request.response.headers['content-length'] : 0)
    // Only bodies that went out whole: an aborted response did not deliver its length.
    if (result && SERVED.has(result) && delivered(request.raw.res) && length > 0) o.metrics.bytesServed.inc(length)
  })
}

/** `GET /cache`, `GET|DELETE /cache/{digest}`: the on-call view of the cache. */
export function cacheRoutes(server: Server, deps: CacheHandlerDeps): void {
  // The handlers throw errors.ts classes; toBoom gives them their status and code.
  const mapped =
    (handler: (request: Request, h: ResponseToolkit) => Lifecycle.ReturnValue | Promise<Lifecycle.ReturnValue>): Lifecycle.Method =>
    async (request, h) => {
      try {
        return await handler(request, h)
      } catch (err) {
        throw toBoom(err)
      }
    }
  server.route([
    { method: 'GET', path: '/cache', handler: mapped(listCacheHandler(deps)) },
    { method: 'GET', path: '/cache/{digest}', handler: mapped(showCacheEntryHandler(deps)) },
    { method: 'DELETE', path: '/cache/{digest}', handler: mapped(deleteCacheEntryHandler(deps)) },
  ])
}

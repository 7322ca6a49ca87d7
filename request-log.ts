import type { Logger } from 'pino'
import type { describe } from './plugins/packages/log.js'

/** What one request was and how it ended, from hapi's lifecycle or from the fast path. */
export interface RequestFacts {
  id: string
  method: string
  path: string
  status: number
  /** Bytes of a body that went out whole; undefined when it was cut off (see `sentStatus`). */
  bytes: number | undefined
  /** The status the client saw when the body was cut off (hapi reports its own 500/499). */
  sentStatus?: number
  ms: number | undefined
  /** `/package` only: what was asked and where it came from. */
  pkg?: { digest: unknown; repository: unknown; source: string | undefined; path: unknown; peer?: string | undefined }
  /** `/v1/...` only: the route pattern (never the raw path). */
  route?: string
  result?: string | undefined
  err?: ReturnType<typeof describe> | undefined
}

const QUIET = new Set(['/healthz', '/readyz', '/metrics'])

/**
 * The one JSON line per request, written the same way for hapi's routes and for the hits the
 * fast path answers: probes and scrapes at debug, failures and cut-off bodies at warn.
 */
export function logRequest(log: Logger, f: RequestFacts): void {
  const aborted = f.bytes === undefined
  const line = {
    req: f.id,
    method: f.method,
    path: f.path,
    status: f.status,
    ...(aborted ? { aborted: true, sentStatus: f.sentStatus } : { bytes: f.bytes }),
    ms: f.ms,
    ...(f.pkg
      ? {
          digest: f.pkg.digest,
          repository: f.pkg.repository,
          source: f.pkg.source,
          pkgPath: f.pkg.path,
          result: f.result,
          ...(f.pkg.peer ? { peer: f.pkg.peer } : {}),
        }
      : {}),
    ...(f.route ? { route: f.route, result: f.result } : {}),
    ...(f.err ? { err: f.err } : {}),
  }
  if (QUIET.has(f.path)) log.debug(line, 'request')
  else if (f.status >= 500 || aborted) log.warn(line, 'request')
  else log.info(line, 'request')
}

import Boom from '@hapi/boom'

/**
 * Every failure a request can meet has a class with a stable `code` and the facts it needs.
 * They are translated into HTTP responses in exactly one place, {@link toBoom}, so that no
 * raw upstream text (which may echo a credential) ever reaches a client.
 */
export class ProxyError extends Error {
  readonly code: string
  readonly status: number
  constructor(code: string, status: number, message: string, options?: { cause?: unknown }) {
    super(message, options)
    this.name = new.target.name
    this.code = code
    this.status = status
  }
}

/** The request itself is malformed (400). */
export class BadRequestError extends ProxyError {
  constructor(message: string) {
    super('EBADREQUEST', 400, message)
  }
}

/** `repository` names no configured source (404); no outbound connection was made. */
export class NoSourceError extends ProxyError {
  constructor(readonly repository: string) {
    super('ENOSOURCE', 404, `repository ${repository} matches no registry source`)
  }
}

/**
 * Something is not known *yet*: a source provider has not delivered its first sync (the API
 * server is unreachable, a master just rebooted). 503 with `Retry-After`, never a 404: the
 * bootstrap clients call node IPs directly, so readiness cannot hold them off, and a 404 would
 * tell them the package does not exist.
 */
export class NotSyncedError extends ProxyError {
  readonly retryAfterSeconds = 5
  constructor(message: string) {
    super('ENOTSYNCED', 503, message)
  }
}

/** `repository` matches no source *yet* (see {@link NotSyncedError}). */
export class SourcesNotSyncedError extends NotSyncedError {
  constructor(
    readonly repository: string,
    readonly pending: readonly string[],
  ) {
    super(`repository ${repository} matches no registry source yet: source providers not synced yet (${pending.join(', ')})`)
  }
}

/** `GET|DELETE /cache/{digest}`: no cache entry has that layer or manifest digest (404). */
export class NotCachedError extends ProxyError {
  constructor(readonly digest: string) {
    super('ENOTCACHED', 404, `${digest} is not in the cache`)
  }
}

/** The request lacks the credential an admin operation needs, such as the cache token (403). */
export class ForbiddenError extends ProxyError {
  constructor(message: string) {
    super('EFORBIDDEN', 403, message)
  }
}

/** A method the path does not serve (405, with `Allow`). */
export class MethodNotAllowedError extends ProxyError {
  constructor(
    message: string,
    readonly allow: readonly string[] = ['GET', 'HEAD'],
  ) {
    super('EMETHOD', 405, message)
  }
}

/**
 * A `Range` that starts past the end of an object of `size` bytes: 416 with
 * `Content-Range: bytes *\/<size>`, as RFC 9110 asks and hapijs/inert sends.
 */
export class RangeNotSatisfiableError extends ProxyError {
  constructor(
    readonly size: number,
    what: 'package' | 'image' = 'package',
  ) {
    super('ERANGE', 416, `the ${what} has ${size} bytes`)
  }
}

/** The registry says the manifest or blob does not exist, or nothing is served at the path (404). */
export class NotFoundError extends ProxyError {
  constructor(message: string) {
    super('ENOTFOUND', 404, message)
  }
}

/** The registry failed: an error status, a refused connection, TLS, a broken stream (502). */
export class UpstreamError extends ProxyError {
  constructor(
    message: string,
    readonly upstreamStatus?: number,
    options?: { cause?: unknown },
  ) {
    super('EUPSTREAM', 502, message, options)
  }
}

/** The registry sent something that cannot be a valid manifest for the request (502). */
export class ManifestError extends ProxyError {
  constructor(message: string) {
    super('EMANIFEST', 502, message)
  }
}

/** Bytes did not hash to the digest that names them (502); carries both digests. */
export class DigestError extends ProxyError {
  constructor(
    readonly what: 'manifest' | 'layer',
    readonly expected: string,
    readonly found: string,
  ) {
    super('EDIGEST', 502, `${what} digest mismatch: expected ${expected}, got ${found}`)
  }
}

/**
 * The registry did not connect, answer or keep sending within its timeout, or a whole layer
 * download (`fill`, plugins/packages/downloads.ts) outlived its deadline (504).
 */
export class TimeoutError extends ProxyError {
  constructor(
    readonly phase: 'connect' | 'headers' | 'idle' | 'fill',
    readonly ms: number,
  ) {
    super('ETIMEOUT', 504, phase === 'fill' ? `the layer download did not finish within ${ms} ms` : `registry did not ${TIMEOUT_VERB[phase]} within ${ms} ms`)
  }
}

const TIMEOUT_VERB = { connect: 'accept the connection', headers: 'answer', idle: 'send data' } as const

/**
 * Too many layer downloads (or manifest lookups) are running and waiting already (503, with
 * `Retry-After`): the request was refused before anything was registered or sent upstream.
 */
export class BusyError extends ProxyError {
  constructor(
    message: string,
    readonly retryAfterSeconds: number,
    readonly kind: 'layer' | 'manifest' = 'layer',
  ) {
    super('EBUSY', 503, message)
  }
}

/**
 * The errors an abort produces that are not ours: `AbortSignal.timeout()` rejects with a
 * `DOMException` named `TimeoutError`, `AbortController.abort()` without a reason with one named
 * `AbortError`, and Node's streams and timers wrap them in an `AbortError` with the reason as
 * `cause`. None of them is a {@link ProxyError}, and without this they became a bare 500.
 */
function abortKind(err: unknown): 'timeout' | 'abort' | undefined {
  for (let e: unknown = err, depth = 0; e instanceof Error && depth < 8; e = e.cause, depth++) {
    if (e.name === 'TimeoutError') return 'timeout'
  }
  return err instanceof Error && err.name === 'AbortError' ? 'abort' : undefined
}

/** The first {@link ProxyError} in an error's `cause` chain (a wrapped one still maps as itself). */
function proxyErrorIn(err: unknown): ProxyError | undefined {
  for (let e: unknown = err, depth = 0; e instanceof Error && depth < 8; e = e.cause, depth++) {
    if (e instanceof ProxyError) return e
  }
  return undefined
}

/** A Boom whose JSON body carries the stable `code` beside `statusCode`, `error` and `message`. */
function coded(message: string, statusCode: number, code: string): Boom.Boom {
  const boom = new Boom.Boom(message, { statusCode })
  boom.output.payload.code = code
  return boom
}

/**
 * Maps any error to the Boom response the client sees: its status, our own message and the
 * error's stable `code` in the JSON body (README, "HTTP API"). A timeout that is not ours is a
 * 504 and an abort a 503 with `Retry-After` (the work was cancelled, typically by a shutdown:
 * another replica or a retry will do); only errors that are none of these become a bare 500.
 */
export function toBoom(err: unknown): Boom.Boom {
  if (Boom.isBoom(err)) return err
  const known = proxyErrorIn(err)
  if (known) {
    const boom = coded(known.message, known.status, known.code)
    const headers = boom.output.headers
    if (known instanceof BusyError || known instanceof NotSyncedError) headers['Retry-After'] = String(known.retryAfterSeconds)
    if (known instanceof MethodNotAllowedError) headers.Allow = known.allow.join(', ')
    if (known instanceof RangeNotSatisfiableError) {
      // None of the package's caching headers or ETag: a 416 is an error, not the package.
      Object.assign(headers, { 'Content-Range': `bytes */${known.size}`, 'Accept-Ranges': 'bytes' })
      // RFC 9110's name, which these bodies always carried; Node's table still has RFC 2616's.
      boom.output.payload.error = 'Range Not Satisfiable'
    }
    return boom
  }
  const kind = abortKind(err)
  if (kind === 'timeout') return coded('the operation timed out', 504, 'ETIMEOUT')
  if (kind === 'abort') {
    const boom = coded('the operation was cancelled; try again', 503, 'EABORTED')
    boom.output.headers['Retry-After'] = '5'
    return boom
  }
  return Boom.internal()
}

/**
 * The registry sent a layer the proxy cannot read for a file inside it (502): not gzip,
 * truncated, a broken tar header, a compression it does not support (zstd), or one that
 * inflates past the bound on work per request. Its message says which, for the log.
 */
export class LayerContentError extends ProxyError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ELAYERCONTENT', 502, message, options)
  }
}

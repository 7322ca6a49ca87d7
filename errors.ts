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
 * `repository` matches no source *yet*: a source provider has not delivered its first sync (the
 * API server is unreachable, a master just rebooted). 503 with `Retry-After`, never a 404: the
 * bootstrap clients call node IPs directly, so readiness cannot hold them off, and a 404 would
 * tell them the package does not exist.
 */
export class SourcesNotSyncedError extends ProxyError {
  constructor(
    readonly repository: string,
    readonly pending: readonly string[],
    readonly retryAfterSeconds = 5,
  ) {
    super('ENOTSYNCED', 503, `repository ${repository} matches no registry source yet: source providers not synced yet (${pending.join(', ')})`)
  }
}

/** The registry says the manifest or blob does not exist (404). */
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

/** The registry did not connect, answer or keep sending within its timeout (504). */
export class TimeoutError extends ProxyError {
  constructor(
    readonly phase: 'connect' | 'headers' | 'idle' | 'fill',
    readonly ms: number,
  ) {
    super('ETIMEOUT', 504, `registry did not ${phase === 'connect' ? 'accept the connection' : phase === 'headers' ? 'answer' : 'send data'} within ${ms} ms`)
  }
}

/** The local cache failed (disk full, I/O error); the request may still be served. */
export class CacheError extends ProxyError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ECACHE', 500, message, options)
  }
}

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

/**
 * Maps any error to the Boom response the client sees. A timeout that is not ours is a 504 and
 * an abort a 503 with `Retry-After` (the work was cancelled, typically by a shutdown: another
 * replica or a retry will do); only errors that are none of these become a bare 500.
 */
export function toBoom(err: unknown): Boom.Boom {
  if (Boom.isBoom(err)) return err
  const known = proxyErrorIn(err)
  if (known) {
    const boom = new Boom.Boom(known.message, { statusCode: known.status, data: { code: known.code } })
    if (known instanceof BusyError || known instanceof SourcesNotSyncedError) boom.output.headers['Retry-After'] = String(known.retryAfterSeconds)
    return boom
  }
  const kind = abortKind(err)
  if (kind === 'timeout') return new Boom.Boom('the operation timed out', { statusCode: 504, data: { code: 'ETIMEOUT' } })
  if (kind === 'abort') {
    const boom = new Boom.Boom('the operation was cancelled; try again', { statusCode: 503, data: { code: 'EABORTED' } })
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

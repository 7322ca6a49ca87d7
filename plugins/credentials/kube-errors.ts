import { ApiException } from '@kubernetes/client-node'

/** A watch that the server ended cleanly at once, with no event: treated as a failure. */
export class WatchClosedEarlyError extends Error {
  readonly code = 'EWATCHCLOSED'
}

/**
 * A watch the API server ended with an ERROR event (a `Status` object instead of a change), or
 * with HTTP 410 Gone. Treated as a failure: backoff, a log line and a restart counted, where
 * client-node would re-watch at once from the same resourceVersion and spin. `relist` says the
 * resourceVersion is unusable, so the restart lists again first.
 */
export class WatchErrorEvent extends Error {
  readonly code = 'EWATCHERROR'
  constructor(
    readonly status: number | undefined,
    readonly reason: string | undefined,
    readonly relist: boolean,
    detail: string | undefined,
  ) {
    super(['watch ended with an ERROR event', status === undefined ? undefined : `HTTP ${status}`, reason, detail].filter(Boolean).join(': '))
    this.name = 'WatchErrorEvent'
  }

  /**
   * From the event's object. The resourceVersion is unusable, as client-go decides it, when
   * the code is 410 or the reason `Expired` or `Gone`; an API server (or an older one) may
   * also say only "too old resource version" in the message.
   */
  static from(object: unknown): WatchErrorEvent {
    const o = (typeof object === 'object' && object !== null ? object : {}) as { code?: unknown; reason?: unknown; message?: unknown }
    const status = typeof o.code === 'number' ? o.code : undefined
    const reason = typeof o.reason === 'string' ? o.reason.slice(0, 100) : undefined
    const message = typeof o.message === 'string' ? o.message.slice(0, 300) : undefined
    const relist = status === 410 || reason === 'Expired' || reason === 'Gone' || /too old resource version/i.test(message ?? '')
    return new WatchErrorEvent(status, reason, relist, message)
  }
}

function statusOf(body: unknown): { reason?: string; message?: string } | undefined {
  let value = body
  if (typeof value === 'string') {
    try {
      value = JSON.parse(value)
    } catch {
      return undefined
    }
  }
  if (typeof value !== 'object' || value === null) return undefined
  const s = value as { kind?: unknown; reason?: unknown; message?: unknown }
  if (s.kind !== 'Status') return undefined
  return {
    ...(typeof s.reason === 'string' ? { reason: s.reason } : {}),
    ...(typeof s.message === 'string' ? { message: s.message.slice(0, 300) } : {}),
  }
}

/**
 * One short line about a Kubernetes client failure, safe to log: never an error's raw message
 * where that may quote a response body (a Secret's data) or a request header (the token).
 */
export function describeKubeError(err: unknown): string {
  if (err instanceof ApiException) {
    const status = statusOf(err.body)
    return [`HTTP ${err.code}`, status?.reason, status?.message].filter(Boolean).join(': ')
  }
  if (typeof err !== 'object' || err === null) return String(err)
  const e = err as { name?: unknown; code?: unknown; statusCode?: unknown; type?: unknown; message?: unknown }
  if (err instanceof WatchClosedEarlyError || err instanceof WatchErrorEvent) return err.message
  if (typeof e.statusCode === 'number') return `watch answered HTTP ${e.statusCode}`
  if (e.name === 'AbortError') return 'request aborted (timed out or stopped)'
  if (err instanceof SyntaxError) return 'the API server sent a response that is not valid JSON'
  const code = typeof e.code === 'string' || typeof e.code === 'number' ? String(e.code) : undefined
  const name = typeof e.name === 'string' ? e.name : 'Error'
  if (name === 'FetchError') return `connection failed: ${code ?? (typeof e.type === 'string' ? e.type : 'network error')}`
  if (err instanceof TypeError || err instanceof RangeError) return `${name}: ${String(e.message).slice(0, 200)}`
  return code ? `${name} ${code}` : name
}

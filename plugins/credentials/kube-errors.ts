import { ApiException } from '@kubernetes/client-node'

/** A watch that the server ended cleanly at once, with no event: treated as a failure. */
export class WatchClosedEarlyError extends Error {
  readonly code = 'EWATCHCLOSED'
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
  if (err instanceof WatchClosedEarlyError) return err.message
  if (typeof e.statusCode === 'number') return `watch answered HTTP ${e.statusCode}`
  if (e.name === 'AbortError') return 'request aborted (timed out or stopped)'
  if (err instanceof SyntaxError) return 'the API server sent a response that is not valid JSON'
  const code = typeof e.code === 'string' || typeof e.code === 'number' ? String(e.code) : undefined
  const name = typeof e.name === 'string' ? e.name : 'Error'
  if (name === 'FetchError') return `connection failed: ${code ?? (typeof e.type === 'string' ? e.type : 'network error')}`
  if (err instanceof TypeError || err instanceof RangeError) return `${name}: ${String(e.message).slice(0, 200)}`
  return code ? `${name} ${code}` : name
}

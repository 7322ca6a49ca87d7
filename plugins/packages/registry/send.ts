import type { Readable } from 'node:stream'
import axios, { type AxiosResponse } from 'axios'
import { TimeoutError } from '../../../errors.js'
import type { RegistrySource } from '../../credentials/source.js'
import { MAX_STALE_RETRIES, resetBeforeAnswer, translate } from './http.js'
import type { RegistryTimeouts, Transport } from './transport.js'

/** The upstream call kinds, as metric labels. */
export type UpstreamKind = 'manifest' | 'blob' | 'token'

/** Told about every upstream HTTP exchange (for metrics); never given URLs or headers. */
export type UpstreamObserver = (kind: UpstreamKind, status: number | 'error', seconds: number) => void

/** What one send needs: connections, timeouts, and whom to tell about the exchange. */
export interface SendContext {
  transport: Transport
  timeouts: RegistryTimeouts
  observe: UpstreamObserver
}

/**
 * Sends one GET and resolves with the response headers (the body streams on), within the
 * headers timeout. A request that never reached the registry (a connection reset before any
 * answer) goes out again, as the comments below say; anything else fails with our error.
 */
export async function sendOnce(
  o: SendContext,
  source: RegistrySource,
  kind: UpstreamKind,
  url: string,
  headers: Record<string, string>,
  signal: AbortSignal | undefined,
): Promise<AxiosResponse<Readable>> {
  const started = process.hrtime.bigint()
  const headersTimer = new AbortController()
  const timer = setTimeout(() => headersTimer.abort(new TimeoutError('headers', o.timeouts.headersMs)), o.timeouts.headersMs)
  const combined = signal ? AbortSignal.any([signal, headersTimer.signal]) : headersTimer.signal
  const seconds = (): number => Number(process.hrtime.bigint() - started) / 1e9
  let staleRetries = 0
  let resetRetries = 0
  try {
    for (;;) {
      try {
        const res = await axios.request<Readable>({
          url,
          method: 'GET',
          headers: { 'User-Agent': 'registry-packages-proxy', ...headers },
          responseType: 'stream',
          // Layers are gzip files: deliver the bytes exactly as stored, they are what the digest covers.
          decompress: false,
          maxRedirects: 0,
          validateStatus: () => true,
          signal: combined,
          ...o.transport.optionsFor(url, source.ca),
        })
        o.observe(kind, res.status, seconds())
        return res
      } catch (err) {
        o.observe(kind, 'error', seconds())
        const reset = resetBeforeAnswer(err)
        if (reset !== undefined && !combined.aborted) {
          // A pooled keep-alive connection that the registry closed just as we reused it (the
          // race Node documents for `reusedSocket`): the request never reached the registry,
          // and it is a GET, so it goes out again, within the same timeout. Several pooled
          // sockets can go stale at once (the registry's idle timeout closes them together,
          // and a busy event loop has not seen their FINs yet), so a few tries.
          if (reset === 'reused' && staleRetries++ < MAX_STALE_RETRIES) continue
          // A new connection reset before any answer: a load balancer draining a backend or
          // a registry restarting. The GET is safe to repeat, once; a second reset is a
          // registry that is really down, and the client hears of it at once.
          if (reset === 'new' && resetRetries++ < 1) continue
        }
        throw translate(err, headersTimer.signal, signal, source)
      }
    }
  } finally {
    clearTimeout(timer)
  }
}

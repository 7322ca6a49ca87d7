import { PassThrough, type Readable } from 'node:stream'
import axios from 'axios'
import { ProxyError, TimeoutError, UpstreamError } from '../../../errors.js'
import type { RegistrySource } from '../../credentials/source.js'

/**
 * The HTTP details of talking to a registry that are not the client's flow: retry pauses,
 * `Link` pages, error translation (never a credential in a message), bounded and guarded
 * bodies. Small functions, each tested through the client.
 */

/** The longest `Retry-After` we wait out inside one client request. */
export const MAX_RETRY_AFTER_MS = 10_000

/** The pause before retry `attempt` (0-based): `Retry-After` if given, else 250 ms doubling. */
export function retryDelayMs(retryAfter: string | undefined, attempt: number, now = Date.now()): number | undefined {
  if (retryAfter === undefined || retryAfter.trim() === '') return 250 * 2 ** attempt
  const seconds = /^\s*\d+\s*$/.test(retryAfter) ? Number(retryAfter) * 1000 : Date.parse(retryAfter) - now
  if (!Number.isFinite(seconds)) return 250 * 2 ** attempt
  const ms = Math.max(0, seconds)
  return ms > MAX_RETRY_AFTER_MS ? undefined : ms
}

/** Waits `ms`, or rejects when `signal` aborts first. */
export function sleep(ms: number, signal: AbortSignal | undefined): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) {
      reject(signal.reason instanceof Error ? signal.reason : new UpstreamError('request cancelled'))
      return
    }
    const onAbort = (): void => {
      clearTimeout(timer)
      reject(signal?.reason instanceof Error ? signal.reason : new UpstreamError('request cancelled'))
    }
    const timer = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort)
      resolve()
    }, ms)
    signal?.addEventListener('abort', onAbort, { once: true })
  })
}

/** The target of `rel="next"` in an RFC 8288 `Link` header, as registries send it. */
export function nextPageLink(header: string | undefined): string | undefined {
  if (!header) return undefined
  for (const part of header.split(/,(?=\s*<)/)) {
    const m = /^\s*<([^>]*)>\s*;(.*)$/.exec(part)
    if (m && /(?:^|;)\s*rel\s*=\s*"?(?:[^";]*\s)?next(?:\s[^";]*)?"?\s*(?:;|$)/i.test(m[2] ?? '')) return m[1]
  }
  return undefined
}

/** How many stale pooled connections one request may run into before its error is passed on. */
export const MAX_STALE_RETRIES = 8

/**
 * Whether a request failed because its connection was reset or closed before any response
 * came, and whether that connection was a `reused` pooled one or a `new` one.
 */
export function resetBeforeAnswer(err: unknown): 'reused' | 'new' | undefined {
  if (!axios.isAxiosError(err) || err.response !== undefined) return undefined
  if (err.code !== 'ECONNRESET' && err.code !== 'EPIPE') return undefined
  return (err.request as { reusedSocket?: unknown } | undefined)?.reusedSocket === true ? 'reused' : 'new'
}

/**
 * Refuses a token realm that would expose what is sent to it: an `http://` realm named by an
 * `https://` registry would carry the source's credentials (and bring back the token) in clear
 * text. A realm on another host is fine: the registry itself named it, as Docker allows.
 */
export function checkRealm(source: RegistrySource, realm: string): void {
  if (source.scheme === 'https' && new URL(realm).protocol !== 'https:') {
    throw new UpstreamError(`registry ${source.registry} named a token realm over plain http; nothing is sent to it`)
  }
}

/** A header's value as one string (several values joined as HTTP joins them). */
export function headerText(value: unknown): string | undefined {
  if (Array.isArray(value)) return value.map(String).join(', ')
  return typeof value === 'string' ? value : undefined
}

/**
 * Turns an axios/Node failure into our error. The axios error itself is dropped on purpose:
 * it carries the request config, headers included, and must never reach a log.
 */
export function translate(err: unknown, headersTimer: AbortSignal, caller: AbortSignal | undefined, source: RegistrySource): Error {
  if (headersTimer.aborted && headersTimer.reason instanceof Error) return headersTimer.reason
  if (caller?.aborted) return caller.reason instanceof Error ? caller.reason : new UpstreamError('request cancelled')
  for (let e: unknown = err; e instanceof Error; e = e.cause) {
    if (e instanceof ProxyError) return e
  }
  let code = 'error'
  for (let e: unknown = err; e instanceof Error; e = e.cause) {
    const c = (e as NodeJS.ErrnoException).code
    if (typeof c === 'string' && c !== 'ERR_BAD_REQUEST' && !c.startsWith('ERR_BAD_')) {
      code = c
      if (!c.startsWith('ERR_')) break
    }
  }
  return new UpstreamError(`connection to registry ${source.registry} failed (${code})`)
}

/** Reads a small body whole, refusing more than `limit` bytes. */
export async function readLimited(body: Readable, limit: number, what: string): Promise<Buffer> {
  const chunks: Buffer[] = []
  let size = 0
  try {
    for await (const chunk of body) {
      const buf = chunk as Buffer
      size += buf.length
      if (size > limit) {
        body.destroy()
        throw new UpstreamError(`${what} is larger than ${limit} bytes`)
      }
      chunks.push(buf)
    }
  } catch (err) {
    if (err instanceof ProxyError) throw err
    throw new UpstreamError(`registry broke off the ${what} (${(err as NodeJS.ErrnoException).code ?? 'error'})`)
  }
  return Buffer.concat(chunks)
}

/**
 * Re-exposes a response body so that (1) a stall longer than `idleMs` while the consumer is
 * asking for data fails it with a {@link TimeoutError}, and (2) any socket error surfaces as an
 * {@link UpstreamError} without the raw error's internals. Time spent paused by a slow consumer
 * does not count as idle.
 */
export function guardBody(res: Readable, idleMs: number): Readable {
  const out = new PassThrough({ highWaterMark: 64 * 1024 })
  const timer = setTimeout(function check() {
    if (res.isPaused()) {
      timer.refresh()
      return
    }
    fail(new TimeoutError('idle', idleMs))
  }, idleMs)
  let failed = false
  const fail = (err: Error): void => {
    // First cause wins: destroying the socket below makes it emit its own, vaguer errors.
    if (failed) return
    failed = true
    clearTimeout(timer)
    out.destroy(err)
    res.destroy()
  }
  res.pipe(out)
  res.on('data', () => timer.refresh())
  res.on('end', () => clearTimeout(timer))
  res.on('aborted', () => fail(new UpstreamError('registry closed the connection mid-body')))
  res.on('error', (err: NodeJS.ErrnoException) => {
    if (err instanceof ProxyError) fail(err)
    else fail(new UpstreamError(`registry connection broke mid-body (${err.code ?? 'error'})`))
  })
  // A premature close without 'error' (the socket just ended) must not look like success.
  res.on('close', () => {
    if (!res.readableEnded) fail(new UpstreamError('registry closed the connection mid-body'))
  })
  out.on('close', () => {
    clearTimeout(timer)
    if (!res.readableEnded) res.destroy()
  })
  return out
}

/** The token in a token server's JSON answer, and how long it lives (the spec's 60 s floor). */
export function parseTokenResponse(text: string): { token: string; expiresIn: number } {
  let doc: { token?: unknown; access_token?: unknown; expires_in?: unknown }
  try {
    doc = JSON.parse(text) as typeof doc
  } catch {
    throw new UpstreamError('token server sent a response that is not JSON')
  }
  const token = typeof doc.token === 'string' && doc.token ? doc.token : typeof doc.access_token === 'string' ? doc.access_token : ''
  if (!token) throw new UpstreamError('token server sent no token')
  // The distribution spec: a missing or too small expires_in means 60 seconds.
  const expiresIn = typeof doc.expires_in === 'number' && doc.expires_in >= 60 ? doc.expires_in : 60
  return { token, expiresIn }
}

/** The tags of one tag-list page. */
export function parseTagPage(text: string): string[] {
  let doc: { tags?: unknown }
  try {
    doc = JSON.parse(text) as typeof doc
  } catch {
    throw new UpstreamError('registry sent a tag list that is not JSON')
  }
  // distribution answers `"tags": null` for a repository whose tags were all deleted.
  if (doc.tags === null || doc.tags === undefined) return []
  if (!Array.isArray(doc.tags) || !doc.tags.every((x) => typeof x === 'string')) throw new UpstreamError('registry sent a tag list without a tags array')
  return doc.tags
}

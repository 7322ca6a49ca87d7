import { PassThrough, type Readable } from 'node:stream'
import axios, { type AxiosResponse } from 'axios'
import { NotFoundError, ProxyError, TimeoutError, UpstreamError } from '../../errors.js'
import type { RegistrySource } from '../credentials/source.js'
import { parseChallenge, type Challenge } from './auth-challenge.js'
import { TokenCache } from './token-cache.js'
import { DEFAULT_TIMEOUTS, Transport, type RegistryTimeouts } from './transport.js'

/** The upstream call kinds, as metric labels. */
export type UpstreamKind = 'manifest' | 'blob' | 'token'

/** Told about every upstream HTTP exchange (for metrics); never given URLs or headers. */
export type UpstreamObserver = (kind: UpstreamKind, status: number | 'error', seconds: number) => void

/** Everything a registry may answer for a manifest digest, best first. */
export const MANIFEST_ACCEPT = [
  'application/vnd.oci.image.manifest.v1+json',
  'application/vnd.oci.image.index.v1+json',
  'application/vnd.docker.distribution.manifest.v2+json',
  'application/vnd.docker.distribution.manifest.list.v2+json',
].join(', ')

/** Manifests are small JSON documents; anything bigger is refused rather than buffered. */
export const MAX_MANIFEST_BYTES = 4 * 1024 * 1024

const REDIRECTS = new Set([301, 302, 303, 307, 308])
const RETRYABLE = new Set([429, 502, 503, 504])
const MAX_RETRIES = 2
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

function sleep(ms: number, signal: AbortSignal | undefined): Promise<void> {
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
const MAX_REDIRECTS = 5

export interface RegistryClientOptions {
  timeouts?: Partial<RegistryTimeouts>
  /** Proxy variables come from here (default `process.env`). */
  env?: NodeJS.ProcessEnv
  observe?: UpstreamObserver
  /** Bound on cached tokens (default 1024, the token cache's MAX_TOKENS); tests shrink it. */
  maxTokens?: number
}

export interface BlobResponse {
  body: Readable
  /** Bytes the body will carry (from Content-Length). */
  length: number
  /** First byte offset of the body within the blob. */
  offset: number
}

/**
 * A streaming OCI distribution client. It authenticates the way registries expect (anonymous,
 * Basic from a docker config, Bearer tokens from the `WWW-Authenticate` challenge), follows
 * redirects to blob storage without carrying credentials to another origin, and turns every
 * failure into a {@link ProxyError} whose message holds no secret.
 */
export class RegistryClient {
  readonly #timeouts: RegistryTimeouts
  readonly #transport: Transport
  readonly #tokens: TokenCache
  readonly #observe: UpstreamObserver
  /** What each source's registry asked for last time, so later requests authenticate up front. */
  readonly #schemes = new WeakMap<RegistrySource, Challenge>()
  /** Token cache keys use a per-object id: a source replaced with new credentials gets new tokens. */
  readonly #ids = new WeakMap<RegistrySource, number>()
  #nextId = 1

  constructor(options: RegistryClientOptions = {}) {
    this.#timeouts = { ...DEFAULT_TIMEOUTS, ...options.timeouts }
    this.#transport = new Transport(this.#timeouts, options.env ?? process.env)
    this.#observe = options.observe ?? (() => undefined)
    this.#tokens = new TokenCache(Date.now, options.maxTokens)
  }

  /** Fetches a manifest (or index) by digest; the caller verifies the bytes. */
  async fetchManifest(source: RegistrySource, name: string, reference: string, signal?: AbortSignal): Promise<{ body: Buffer; mediaType: string }> {
    const res = await this.#retrying(source, 'manifest', name, `manifests/${reference}`, { Accept: MANIFEST_ACCEPT }, signal)
    this.#checkStatus(res, 'manifest', [200])
    const body = await readLimited(res.data, MAX_MANIFEST_BYTES, 'manifest')
    const mediaType = String(res.headers['content-type'] ?? '').split(';')[0]?.trim() ?? ''
    return { body, mediaType }
  }

  /**
   * Opens a blob as a stream, from `offset` when given (a Range request, used to resume).
   * Resolves once the registry answered with a success status; the body is guarded by the
   * idle-read timeout and errors with a {@link ProxyError}.
   */
  async openBlob(source: RegistrySource, name: string, digest: string, options: { offset?: number; signal?: AbortSignal } = {}): Promise<BlobResponse> {
    const offset = options.offset ?? 0
    const headers: Record<string, string> = offset > 0 ? { Range: `bytes=${offset}-` } : {}
    const res = await this.#retrying(source, 'blob', name, `blobs/${digest}`, headers, options.signal)
    // A resume may be answered 206 from the offset, or 200 from byte 0 by a registry that
    // ignores Range; the caller skips what it has in the second case.
    this.#checkStatus(res, 'blob', offset > 0 ? [206, 200] : [200])
    const length = Number(res.headers['content-length'])
    if (!Number.isSafeInteger(length) || length < 0) {
      res.data.destroy()
      throw new UpstreamError(`registry ${source.registry} sent a blob without a valid Content-Length`)
    }
    let start = 0
    if (res.status === 206) {
      const m = /^bytes (\d+)-\d+\/(?:\d+|\*)$/.exec(String(res.headers['content-range'] ?? ''))
      if (!m || Number(m[1]) !== offset) {
        res.data.destroy()
        throw new UpstreamError('registry answered a range request with the wrong range')
      }
      start = offset
    }
    return { body: guardBody(res.data, this.#timeouts.idleMs), length, offset: start }
  }

  /** Drops pooled connections (shutdown). */
  close(): void {
    this.#transport.close()
    this.#tokens.clear()
  }

  #checkStatus(res: AxiosResponse<Readable>, what: 'manifest' | 'blob', ok: number[]): void {
    if (ok.includes(res.status)) return
    res.data.resume()
    if (res.status === 404) throw new NotFoundError(`registry has no such ${what}`)
    if (res.status === 401 || res.status === 403) {
      throw new UpstreamError(`registry refused access to the ${what} (${res.status})`, res.status)
    }
    throw new UpstreamError(`registry answered ${res.status} for the ${what}`, res.status)
  }

  #sourceId(source: RegistrySource): number {
    let id = this.#ids.get(source)
    if (id === undefined) {
      id = this.#nextId++
      this.#ids.set(source, id)
    }
    return id
  }

  /**
   * Retries a request the registry asked us to repeat (429, 502, 503, 504), honouring
   * `Retry-After` up to {@link MAX_RETRY_AFTER_MS}; a registry that wants a longer pause gets
   * its error passed on at once (the bootstrap scripts retry on their own schedule).
   */
  async #retrying(
    source: RegistrySource,
    kind: 'manifest' | 'blob',
    name: string,
    path: string,
    headers: Record<string, string>,
    signal: AbortSignal | undefined,
  ): Promise<AxiosResponse<Readable>> {
    for (let attempt = 0; ; attempt++) {
      const res = await this.#exchange(source, kind, name, path, headers, signal)
      if (!RETRYABLE.has(res.status) || attempt >= MAX_RETRIES) return res
      const delay = retryDelayMs(headerText(res.headers['retry-after']), attempt)
      if (delay === undefined) return res
      res.data.resume()
      await sleep(delay, signal)
    }
  }

  /**
   * One logical request: authenticate with what the registry asked for before, and on a 401
   * learn the challenge (or drop a refused token) and try again, at most twice.
   *
   * A challenge is learned only from the registry's own origin. A 401 from a host a redirect
   * led to (blob storage, a CDN) fails the request instead: that host did not get credentials
   * and must not be able to name a realm they would be sent to.
   */
  async #exchange(
    source: RegistrySource,
    kind: 'manifest' | 'blob',
    name: string,
    path: string,
    headers: Record<string, string>,
    signal: AbortSignal | undefined,
  ): Promise<AxiosResponse<Readable>> {
    const url = `${source.scheme}://${source.registry}/v2/${name}/${path}`
    const scope = `repository:${name}:pull`
    for (let attempt = 0; ; attempt++) {
      const auth = await this.#authorization(source, scope, signal)
      const { res, redirected } = await this.#followRedirects(source, kind, url, { ...headers, ...(auth ? { Authorization: auth.header } : {}) }, signal)
      if (res.status !== 401) return res
      if (redirected) {
        res.data.resume()
        throw new UpstreamError(`the ${kind} storage that registry ${source.registry} redirected to asked for credentials; none are sent to it`, 401)
      }
      if (attempt >= 2) return res
      res.data.resume()
      if (auth?.tokenKey) this.#tokens.drop(auth.tokenKey, auth.token ?? '')
      const challenge = parseChallenge(headerText(res.headers['www-authenticate']))
      if (challenge.scheme === 'bearer') checkRealm(source, challenge.realm)
      this.#schemes.set(source, challenge)
      // Nothing new to try: an unknown scheme, Basic without credentials, or Basic credentials
      // that this very request already sent. (Whether *this* request sent them, not whether the
      // source's scheme was known: concurrent first requests all go out anonymous, and each must
      // retry with the credentials the first 401 taught us.)
      if (challenge.scheme === 'unknown') return res
      if (challenge.scheme === 'basic' && (!source.credentials || auth?.basic === true)) return res
    }
  }

  async #authorization(
    source: RegistrySource,
    scope: string,
    signal: AbortSignal | undefined,
  ): Promise<{ header: string; basic?: boolean; tokenKey?: string; token?: string } | undefined> {
    const challenge = this.#schemes.get(source)
    if (!challenge || challenge.scheme === 'unknown') return undefined
    if (challenge.scheme === 'basic') return source.credentials ? { header: source.credentials.basicHeader(), basic: true } : undefined
    const key = `${this.#sourceId(source)}\n${challenge.realm}\n${challenge.service ?? ''}\n${scope}`
    // The fetch is shared with concurrent requests for the same scope, so it runs on its own
    // timeouts, not on this caller's signal, which only ends this caller's wait.
    const token = await this.#tokens.get(key, () => this.#fetchToken(source, challenge, scope), signal)
    return { header: `Bearer ${token}`, tokenKey: key, token }
  }

  async #fetchToken(
    source: RegistrySource,
    challenge: Extract<Challenge, { scheme: 'bearer' }>,
    scope: string,
  ): Promise<{ token: string; expiresIn: number }> {
    const url = new URL(challenge.realm)
    if (challenge.service) url.searchParams.set('service', challenge.service)
    url.searchParams.set('scope', scope)
    const headers: Record<string, string> = { Accept: 'application/json' }
    if (source.credentials) headers.Authorization = source.credentials.basicHeader()
    const { res } = await this.#followRedirects(source, 'token', url.href, headers, undefined)
    if (res.status !== 200) {
      res.data.resume()
      throw new UpstreamError(`token server answered ${res.status}`, res.status)
    }
    // No caller can cancel this read (see #authorization): the idle timeout bounds it.
    const text = (await readLimited(guardBody(res.data, this.#timeouts.idleMs), 1024 * 1024, 'token')).toString('utf8')
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

  /**
   * Sends one request and follows redirects by hand: `Authorization` goes only to the origin
   * it was meant for, never to blob storage on another host. `redirected` says the final
   * response came from another origin than `url`'s.
   */
  async #followRedirects(
    source: RegistrySource,
    kind: UpstreamKind,
    url: string,
    headers: Record<string, string>,
    signal: AbortSignal | undefined,
  ): Promise<{ res: AxiosResponse<Readable>; redirected: boolean }> {
    const origin = new URL(url).origin
    let current = url
    for (let hop = 0; hop <= MAX_REDIRECTS; hop++) {
      const sameOrigin = new URL(current).origin === origin
      const sent = { ...headers }
      if (!sameOrigin) delete sent.Authorization
      const res = await this.#once(source, kind, current, sent, signal)
      const location = headerText(res.headers.location)
      if (!REDIRECTS.has(res.status) || !location) return { res, redirected: !sameOrigin }
      res.data.resume()
      const next = new URL(location, current)
      if (next.protocol !== 'http:' && next.protocol !== 'https:') throw new UpstreamError('registry redirected to a non-HTTP URL')
      current = next.href
    }
    throw new UpstreamError(`registry redirected more than ${MAX_REDIRECTS} times`)
  }

  async #once(
    source: RegistrySource,
    kind: UpstreamKind,
    url: string,
    headers: Record<string, string>,
    signal: AbortSignal | undefined,
  ): Promise<AxiosResponse<Readable>> {
    const started = process.hrtime.bigint()
    const headersTimer = new AbortController()
    const timer = setTimeout(() => headersTimer.abort(new TimeoutError('headers', this.#timeouts.headersMs)), this.#timeouts.headersMs)
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
            ...this.#transport.optionsFor(url, source.ca),
          })
          this.#observe(kind, res.status, seconds())
          return res
        } catch (err) {
          this.#observe(kind, 'error', seconds())
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

  /**
   * Every tag of repository `name`, following the registry's pagination: each page's `Link:
   * <…>; rel="next"` is requested in turn (registries page at 100 or 1000). The next page must
   * be the same repository's tag list on the same registry: a Link elsewhere is refused rather
   * than followed with credentials. A repository the registry does not know is a NotFoundError.
   * (Counted as `kind="manifest"` in the upstream metrics: tag lists are manifest metadata.)
   */
  async listTags(source: RegistrySource, name: string, signal?: AbortSignal): Promise<string[]> {
    const tags: string[] = []
    const base = `${source.scheme}://${source.registry}/v2/${name}/tags/list`
    let query = ''
    for (let page = 0; page < MAX_TAG_PAGES; page++) {
      const res = await this.#retrying(source, 'manifest', name, `tags/list${query}`, { Accept: 'application/json' }, signal)
      if (res.status !== 200) {
        res.data.resume()
        if (res.status === 404) throw new NotFoundError('registry has no such repository')
        if (res.status === 401 || res.status === 403) throw new UpstreamError(`registry refused access to the tag list (${res.status})`, res.status)
        throw new UpstreamError(`registry answered ${res.status} for the tag list`, res.status)
      }
      const text = (await readLimited(res.data, MAX_MANIFEST_BYTES, 'tag list')).toString('utf8')
      let doc: { tags?: unknown }
      try {
        doc = JSON.parse(text) as typeof doc
      } catch {
        throw new UpstreamError('registry sent a tag list that is not JSON')
      }
      // distribution answers `"tags": null` for a repository whose tags were all deleted.
      if (doc.tags !== null && doc.tags !== undefined && (!Array.isArray(doc.tags) || !doc.tags.every((x) => typeof x === 'string'))) {
        throw new UpstreamError('registry sent a tag list without a tags array')
      }
      tags.push(...(doc.tags ?? []))
      const next = nextPageLink(headerText(res.headers.link))
      if (next === undefined) return tags
      const url = new URL(next, base)
      if (url.origin !== new URL(base).origin || url.pathname !== new URL(base).pathname) {
        throw new UpstreamError('registry sent a tag list Link to another repository or host')
      }
      if (url.search === query) throw new UpstreamError('registry sent a tag list Link to the same page')
      query = url.search
    }
    throw new UpstreamError(`registry sent more than ${MAX_TAG_PAGES} pages of tags`)
  }
}

/** A bound on tag-list pages: a registry whose Links loop cannot keep a request forever. */
const MAX_TAG_PAGES = 1000

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
const MAX_STALE_RETRIES = 8

/**
 * Whether a request failed because its connection was reset or closed before any response
 * came, and whether that connection was a `reused` pooled one or a `new` one.
 */
function resetBeforeAnswer(err: unknown): 'reused' | 'new' | undefined {
  if (!axios.isAxiosError(err) || err.response !== undefined) return undefined
  if (err.code !== 'ECONNRESET' && err.code !== 'EPIPE') return undefined
  return (err.request as { reusedSocket?: unknown } | undefined)?.reusedSocket === true ? 'reused' : 'new'
}

/**
 * Refuses a token realm that would expose what is sent to it: an `http://` realm named by an
 * `https://` registry would carry the source's credentials (and bring back the token) in clear
 * text. A realm on another host is fine: the registry itself named it, as Docker allows.
 */
function checkRealm(source: RegistrySource, realm: string): void {
  if (source.scheme === 'https' && new URL(realm).protocol !== 'https:') {
    throw new UpstreamError(`registry ${source.registry} named a token realm over plain http; nothing is sent to it`)
  }
}

function headerText(value: unknown): string | undefined {
  if (Array.isArray(value)) return value.map(String).join(', ')
  return typeof value === 'string' ? value : undefined
}

/**
 * Turns an axios/Node failure into our error. The axios error itself is dropped on purpose:
 * it carries the request config, headers included, and must never reach a log.
 */
function translate(err: unknown, headersTimer: AbortSignal, caller: AbortSignal | undefined, source: RegistrySource): Error {
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
async function readLimited(body: Readable, limit: number, what: string): Promise<Buffer> {
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
function guardBody(res: Readable, idleMs: number): Readable {
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

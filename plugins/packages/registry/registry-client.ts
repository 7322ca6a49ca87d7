import type { Readable } from 'node:stream'
import type { AxiosResponse } from 'axios'
import { NotFoundError, UpstreamError } from '../../../errors.js'
import type { RegistrySource } from '../../credentials/source.js'
import { MEDIA_TYPES } from '../manifest.js'
import { parseChallenge, type Challenge } from './auth-challenge.js'
import { checkRealm, guardBody, headerText, nextPageLink, parseTagPage, parseTokenResponse, readLimited, retryDelayMs, sleep } from './http.js'
import { sendOnce, type SendContext, type UpstreamKind, type UpstreamObserver } from './send.js'
import { TokenCache } from './token-cache.js'
import { DEFAULT_TIMEOUTS, Transport, type RegistryTimeouts } from './transport.js'

export type { UpstreamKind, UpstreamObserver } from './send.js'

/** Everything a registry may answer for a manifest digest, best first. */
export const MANIFEST_ACCEPT = [MEDIA_TYPES.ociManifest, MEDIA_TYPES.ociIndex, MEDIA_TYPES.dockerManifest, MEDIA_TYPES.dockerList].join(', ')

/** One registry request: `path` under `/v2/<name>/` of the source's registry. */
interface Exchange {
  source: RegistrySource
  kind: 'manifest' | 'blob'
  name: string
  path: string
  headers: Record<string, string>
  signal: AbortSignal | undefined
}

/** Manifests are small JSON documents; anything bigger is refused rather than buffered. */
export const MAX_MANIFEST_BYTES = 4 * 1024 * 1024

const REDIRECTS = new Set([301, 302, 303, 307, 308])
const RETRYABLE = new Set([429, 502, 503, 504])
const MAX_RETRIES = 2
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
  readonly #send: SendContext
  /** What each source's registry asked for last time, so later requests authenticate up front. */
  readonly #schemes = new WeakMap<RegistrySource, Challenge>()
  /** Token cache keys use a per-object id: a source replaced with new credentials gets new tokens. */
  readonly #ids = new WeakMap<RegistrySource, number>()
  #nextId = 1

  constructor(options: RegistryClientOptions = {}) {
    this.#timeouts = { ...DEFAULT_TIMEOUTS, ...options.timeouts }
    this.#transport = new Transport(this.#timeouts, options.env ?? process.env)
    this.#send = { transport: this.#transport, timeouts: this.#timeouts, observe: options.observe ?? (() => undefined) }
    this.#tokens = new TokenCache(Date.now, options.maxTokens)
  }

  /** Fetches a manifest (or index) by digest; the caller verifies the bytes. */
  async fetchManifest(source: RegistrySource, name: string, reference: string, signal?: AbortSignal): Promise<{ body: Buffer; mediaType: string }> {
    const res = await this.#retrying({ source, kind: 'manifest', name, path: `manifests/${reference}`, headers: { Accept: MANIFEST_ACCEPT }, signal })
    this.#checkStatus(res, 'manifest', [200])
    // Guarded like every body: a registry that sends the headers and then stalls is a 504 after
    // the idle timeout, not a request (and a lookup slot) held for ever.
    const body = await readLimited(guardBody(res.data, this.#timeouts.idleMs), MAX_MANIFEST_BYTES, 'manifest')
    const mediaType =
      String(res.headers['content-type'] ?? '')
        .split(';')[0]
        ?.trim() ?? ''
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
    const res = await this.#retrying({ source, kind: 'blob', name, path: `blobs/${digest}`, headers, signal: options.signal })
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
   * `Retry-After` up to 10 s (`MAX_RETRY_AFTER_MS`); a registry that wants a longer pause gets
   * its error passed on at once (the bootstrap scripts retry on their own schedule).
   */
  async #retrying(request: Exchange): Promise<AxiosResponse<Readable>> {
    for (let attempt = 0; ; attempt++) {
      const res = await this.#exchange(request)
      if (!RETRYABLE.has(res.status) || attempt >= MAX_RETRIES) return res
      const delay = retryDelayMs(headerText(res.headers['retry-after']), attempt)
      if (delay === undefined) return res
      res.data.resume()
      await sleep(delay, request.signal)
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
  async #exchange({ source, kind, name, path, headers, signal }: Exchange): Promise<AxiosResponse<Readable>> {
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

  async #fetchToken(source: RegistrySource, challenge: Extract<Challenge, { scheme: 'bearer' }>, scope: string): Promise<{ token: string; expiresIn: number }> {
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
    return parseTokenResponse(text)
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
      const res = await sendOnce(this.#send, source, kind, current, sent, signal)
      const location = headerText(res.headers.location)
      if (!REDIRECTS.has(res.status) || !location) return { res, redirected: !sameOrigin }
      res.data.resume()
      const next = new URL(location, current)
      if (next.protocol !== 'http:' && next.protocol !== 'https:') throw new UpstreamError('registry redirected to a non-HTTP URL')
      current = next.href
    }
    throw new UpstreamError(`registry redirected more than ${MAX_REDIRECTS} times`)
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
      const res = await this.#retrying({ source, kind: 'manifest', name, path: `tags/list${query}`, headers: { Accept: 'application/json' }, signal })
      if (res.status !== 200) {
        res.data.resume()
        if (res.status === 404) throw new NotFoundError('registry has no such repository')
        if (res.status === 401 || res.status === 403) throw new UpstreamError(`registry refused access to the tag list (${res.status})`, res.status)
        throw new UpstreamError(`registry answered ${res.status} for the tag list`, res.status)
      }
      const text = (await readLimited(guardBody(res.data, this.#timeouts.idleMs), MAX_MANIFEST_BYTES, 'tag list')).toString('utf8')
      tags.push(...parseTagPage(text))
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

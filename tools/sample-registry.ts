import { createHash, randomBytes } from 'node:crypto'
import { createServer } from 'node:http'
import type { IncomingHttpHeaders, IncomingMessage, Server, ServerResponse } from 'node:http'
import type { Socket } from 'node:net'
import { setTimeout as delay } from 'node:timers/promises'
import { gunzipSync } from 'node:zlib'

/**
 * How the fake registry authenticates pulls. `bearer` follows the Docker token flow: a 401
 * challenge names a token server on its own port (a separate origin, as with real registries),
 * which may itself require Basic credentials.
 */
export type FakeAuth =
  | { kind: 'none' }
  | { kind: 'basic'; username: string; password: string }
  | { kind: 'bearer'; username?: string; password?: string; service?: string; tokenTtlSeconds?: number }

/** What {@link FakeRegistry.addImage} stored, with the digests a test needs to ask for it. */
export interface FakeImage {
  repo: string
  manifestDigest: string
  manifest: Buffer
  mediaType: string
  layers: Array<{ digest: string; data: Buffer; mediaType: string }>
  lastLayer: { digest: string; data: Buffer }
}

/**
 * Fault switches. All default off; tests mutate `registry.faults` between requests. Each request
 * reads a snapshot of them when it arrives. Byte positions count bytes of that response's body
 * (after `Range`, `corruptBlob` and `extraBlobBytes` are applied). Body faults apply where the
 * bytes are served: the registry, or the storage origin under `redirectBlobs`.
 */
export interface FakeFaults {
  /** Answer manifest GET/HEAD with this status (e.g. 404, 429, 500, 503) and a JSON OCI error body. */
  manifestStatus?: number
  /** Same for blob GET/HEAD on the registry origin. */
  blobStatus?: number
  /** The token endpoint answers this status. */
  tokenStatus?: number
  /** Delay before the token endpoint answers (after recording the request). */
  tokenDelayMs?: number
  /** Retry-After header value sent with a 429 or 503 from any of the status faults. */
  retryAfter?: string
  /** Delay before sending manifest response headers (after authentication). */
  manifestDelayMs?: number
  /** Delay before blob response headers (after authentication, on the registry origin). */
  blobDelayMs?: number
  /** Delay between body chunks of `blobChunkSize` bytes: a slow registry. */
  blobChunkDelayMs?: number
  /** Chunk size for blob bodies, default 16 KiB. */
  blobChunkSize?: number
  /** Send this many body bytes, then stop sending forever with the socket left open. */
  blobStallAfterBytes?: number
  /** Announce the full Content-Length, send only this many bytes, then destroy the socket. */
  truncateBlobAt?: number
  /** Like `truncateBlobAt`, but end with a TCP RST (`socket.resetAndDestroy()`). */
  resetBlobAt?: number
  /** Flip one bit in the middle of the blob body (same length, same headers). */
  corruptBlob?: boolean
  /** Serve manifest bytes that do not match their digest (a trailing newline: still valid JSON). */
  corruptManifest?: boolean
  /** Send the manifest's headers and this many body bytes, then nothing more, the socket left open. */
  manifestStallAfterBytes?: number
  /** Append this many extra bytes beyond the real blob; Content-Length grows accordingly. */
  extraBlobBytes?: number
  /**
   * Answer blob GETs with 307 to the storage origin, which serves the bytes without auth and
   * records the Authorization header it receives in `storageAuthHeaders`.
   */
  redirectBlobs?: boolean
  /**
   * The storage origin answers every request with 401 and this `WWW-Authenticate` header (a
   * storage or CDN that "asks for credentials", naming a realm of its choosing), after
   * recording the request. With `redirectBlobs`: a redirect target that challenges.
   */
  storageChallenge?: string
  /** Accept connections on every origin and never answer any request. */
  neverAnswer?: boolean
  /** Answer blob requests with the whole blob (200), whatever their `Range` header asks for. */
  ignoreRange?: boolean
  /** Reset the connection (TCP RST) when a manifest or blob request arrives, before any answer. */
  resetBeforeAnswer?: boolean
  /**
   * Apply the faults above only to the first N manifest/blob requests, then serve normally:
   * "fails once, then recovers" without racing the test against the server.
   */
  onlyFirst?: number
  /** Serve manifests with `Content-Type: text/plain` instead of their media type. */
  manifestWrongContentType?: boolean
}

/**
 * Upstream calls by kind. Every request is counted when it arrives, whatever the answer (a 401,
 * a fault, a 404), so a 401-then-retry shows as two manifest calls and one `unauthorized`.
 * `blob` counts blob GET and HEAD on the registry origin, `blobRange` those of them with a Range
 * header, `storage` every request to the redirect target, `unauthorized` the registry's 401s,
 * `total` every request to any origin.
 */
export interface FakeCounts {
  ping: number
  manifest: number
  manifestHead: number
  blob: number
  blobRange: number
  token: number
  storage: number
  unauthorized: number
  /** Tag-list pages requested (`GET /v2/<name>/tags/list`). */
  tags: number
  total: number
}

/** One request as an origin received it, headers included. */
export interface RecordedRequest {
  method: string
  url: string
  headers: Record<string, string | string[] | undefined>
  origin: 'registry' | 'token' | 'storage'
}

/** Options for {@link FakeRegistry.start}. */
export interface FakeRegistryOptions {
  auth?: FakeAuth
  /** Clock for token issue and expiry (ms since epoch), so expiry tests need not sleep. */
  now?: () => number
}

/** Media types the fake writes; exported so tests can compare against them. */
export const MEDIA_TYPES = Object.freeze({
  oci: Object.freeze({
    manifest: 'application/vnd.oci.image.manifest.v1+json',
    index: 'application/vnd.oci.image.index.v1+json',
    config: 'application/vnd.oci.image.config.v1+json',
    layer: 'application/vnd.oci.image.layer.v1.tar+gzip',
  }),
  docker: Object.freeze({
    manifest: 'application/vnd.docker.distribution.manifest.v2+json',
    index: 'application/vnd.docker.distribution.manifest.list.v2+json',
    config: 'application/vnd.docker.container.image.v1+json',
    layer: 'application/vnd.docker.image.rootfs.diff.tar.gzip',
  }),
})

interface StoredManifest {
  body: Buffer
  mediaType: string
}

interface RepoContent {
  manifests: Map<string, StoredManifest>
  blobs: Set<string>
  tags: Map<string, string>
}

interface IssuedToken {
  expiresAt: number
  repositories: Set<string>
}

interface Waiter {
  count: number
  match: (request: RecordedRequest) => boolean
  resolve: () => void
  reject: (err: Error) => void
}

type Route =
  | { kind: 'ping' }
  | { kind: 'manifest'; name: string; reference: string }
  | { kind: 'blob'; name: string; digest: string }
  | { kind: 'tags'; name: string }
  | { kind: 'unknown' }

const DEFAULT_CHUNK_SIZE = 16 * 1024
const DEFAULT_TOKEN_TTL_SECONDS = 300
const DEFAULT_SERVICE = 'fake-registry'
const DIGEST = /^sha256:[0-9a-f]{64}$/
const NAME = /^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:\/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*$/
const REGISTRY_PATH = /^\/v2\/(.+)\/(manifests|blobs)\/([^/]+)$/
const TAGS_PATH = /^\/v2\/(.+)\/tags\/list$/
const SCOPE = /^repository:([^:]+):([a-z*,]+)$/
const EMPTY = Buffer.alloc(0)

/**
 * A real OCI distribution registry on 127.0.0.1, port 0, with fault switches and counters of
 * every upstream call. It runs three HTTP servers, each its own origin: the registry, the token
 * server (bearer auth) and the blob storage that `redirectBlobs` sends clients to, so tests can
 * check that credentials never cross origins.
 *
 * All state lives on the instance (no module-level state), so concurrent tests each own one.
 * `close()` destroys every open socket, stalled and never-answered ones included, so a test's
 * teardown cannot hang on a fault it switched on.
 */
export class FakeRegistry {
  faults: FakeFaults = {}
  counts: FakeCounts = zeroCounts()
  /** Every request to any origin (registry, token, storage), in arrival order. */
  requests: RecordedRequest[] = []
  /** Authorization header values the storage origin received, one per request. */
  storageAuthHeaders: Array<string | undefined> = []
  /**
   * Tags per tag-list page when the client does not ask for `n` (undefined: all in one page).
   * Further pages are announced with a `Link: <…>; rel="next"` header, as distribution does.
   */
  tagPageSize: number | undefined
  /** Answer tag lists with this status (e.g. 500, 401) instead. */
  tagsStatus: number | undefined

  readonly #auth: FakeAuth
  readonly #now: () => number
  readonly #registry: Server
  readonly #token: Server
  readonly #storage: Server
  readonly #sockets = new Set<Socket>()
  readonly #repos = new Map<string, RepoContent>()
  readonly #blobs = new Map<string, Buffer>()
  readonly #tokens = new Map<string, IssuedToken>()
  readonly #waiters = new Set<Waiter>()
  /** Aborted by close() so that pending fault delays end instead of holding the process open. */
  readonly #closing = new AbortController()
  #closed: Promise<void> | undefined

  private constructor(options: FakeRegistryOptions) {
    this.#auth = options.auth ?? { kind: 'none' }
    this.#now = options.now ?? Date.now
    this.#registry = this.#createServer('registry', (req, res) => this.#serveRegistry(req, res))
    this.#token = this.#createServer('token', (req, res) => this.#serveToken(req, res))
    this.#storage = this.#createServer('storage', (req, res) => this.#serveStorage(req, res))
  }

  /** Starts the registry, token and storage servers, each on its own ephemeral port. */
  static async start(options: FakeRegistryOptions = {}): Promise<FakeRegistry> {
    const registry = new FakeRegistry(options)
    try {
      await Promise.all([registry.#registry, registry.#token, registry.#storage].map(listen))
    } catch (err) {
      await registry.close()
      throw err
    }
    return registry
  }

  /** `127.0.0.1:<port>` of the registry, as a `repository` or registry `address` names it. */
  get host(): string {
    return `127.0.0.1:${port(this.#registry)}`
  }

  get url(): string {
    return `http://${this.host}`
  }

  /** The token endpoint a bearer challenge names (`realm`). */
  get tokenUrl(): string {
    return `http://127.0.0.1:${port(this.#token)}/token`
  }

  /** The origin `redirectBlobs` sends blob GETs to. */
  get storageUrl(): string {
    return `http://127.0.0.1:${port(this.#storage)}`
  }

  /**
   * Stores an image: the layers as given, a config blob and a manifest, all addressed by sha256.
   * The image's last layer is the package. It becomes the repo's `latest` tag.
   */
  addImage(repo: string, layers: Buffer[], opts: { mediaType?: 'oci' | 'docker' } = {}): FakeImage {
    if (layers.length === 0) throw new Error('an image needs at least one layer; use addRawManifest for odd shapes')
    const types = MEDIA_TYPES[opts.mediaType ?? 'oci']
    const config = Buffer.from(
      JSON.stringify({
        architecture: 'amd64',
        os: 'linux',
        rootfs: { type: 'layers', diff_ids: layers.map(diffId) },
      }),
    )
    const configDigest = this.addBlob(repo, config)
    const storedLayers = layers.map((data) => ({ digest: this.addBlob(repo, data), data, mediaType: types.layer }))
    const manifest = Buffer.from(
      JSON.stringify({
        schemaVersion: 2,
        mediaType: types.manifest,
        config: { mediaType: types.config, digest: configDigest, size: config.length },
        layers: storedLayers.map((l) => ({ mediaType: l.mediaType, digest: l.digest, size: l.data.length })),
      }),
    )
    const manifestDigest = this.addRawManifest(repo, manifest, types.manifest)
    const last = storedLayers[storedLayers.length - 1]
    if (last === undefined) throw new Error('unreachable: layers is not empty')
    return {
      repo,
      manifestDigest,
      manifest,
      mediaType: types.manifest,
      layers: storedLayers,
      lastLayer: { digest: last.digest, data: last.data },
    }
  }

  /**
   * Stores an image index (manifest list) over images, which are made visible in `repo` too
   * (like a cross-repository mount) when they were added elsewhere.
   */
  addIndex(
    repo: string,
    entries: Array<{ image: FakeImage; os: string; architecture: string; variant?: string }>,
    opts: { mediaType?: 'oci' | 'docker' } = {},
  ): { digest: string; index: Buffer } {
    const types = MEDIA_TYPES[opts.mediaType ?? 'oci']
    for (const { image } of entries) {
      if (image.repo !== repo) this.#mount(image, repo)
    }
    const index = Buffer.from(
      JSON.stringify({
        schemaVersion: 2,
        mediaType: types.index,
        manifests: entries.map(({ image, os, architecture, variant }) => ({
          mediaType: image.mediaType,
          digest: image.manifestDigest,
          size: image.manifest.length,
          platform: variant === undefined ? { architecture, os } : { architecture, os, variant },
        })),
      }),
    )
    return { digest: this.addRawManifest(repo, index, types.index), index }
  }

  /** Stores arbitrary (possibly malformed) manifest bytes under `repo`; returns their digest. */
  addRawManifest(repo: string, body: Buffer, mediaType: string): string {
    const digest = sha256(body)
    const content = this.#repo(repo)
    content.manifests.set(digest, { body, mediaType })
    content.tags.set('latest', digest)
    return digest
  }

  /** Points `tag` of `repo` at a manifest already stored there (`addImage` only sets `latest`). */
  tag(repo: string, tag: string, digest: string): void {
    const content = this.#repo(repo)
    if (!content.manifests.has(digest)) throw new Error(`no manifest ${digest} in ${repo}`)
    content.tags.set(tag, digest)
  }

  /** Removes a tag (the manifest stays). */
  untag(repo: string, tag: string): void {
    this.#repo(repo).tags.delete(tag)
  }

  /** Stores a blob under `repo` (for raw manifests that reference one); returns its digest. */
  addBlob(repo: string, data: Buffer): string {
    const digest = sha256(data)
    this.#blobs.set(digest, data)
    this.#repo(repo).blobs.add(digest)
    return digest
  }

  /** Invalidates every issued token: the next request with one gets a 401 challenge. */
  revokeTokens(): void {
    this.#tokens.clear()
  }

  /** Zeroes the counters and empties `requests` and `storageAuthHeaders`, in place. */
  resetCounts(): void {
    Object.assign(this.counts, zeroCounts())
    this.requests.length = 0
    this.storageAuthHeaders.length = 0
  }

  /**
   * Resolves once `count` recorded requests (of any origin) satisfy `match`, counting those
   * already recorded: lets a test wait for "the upstream fetch has started" without sleeping.
   * Rejects if the registry is closed first.
   */
  waitForRequests(count: number, match: (request: RecordedRequest) => boolean = () => true): Promise<void> {
    if (this.requests.filter(match).length >= count) return Promise.resolve()
    if (this.#closing.signal.aborted) return Promise.reject(new Error('fake registry closed'))
    return new Promise((resolve, reject) => {
      this.#waiters.add({ count, match, resolve, reject })
    })
  }

  /** Stops all three servers and destroys every open socket; safe to call more than once. */
  close(): Promise<void> {
    this.#closed ??= this.#shutdown()
    return this.#closed
  }

  async #shutdown(): Promise<void> {
    this.#closing.abort()
    for (const waiter of this.#waiters) waiter.reject(new Error('fake registry closed'))
    this.#waiters.clear()
    const closed = [this.#registry, this.#token, this.#storage].map((server) => new Promise<void>((resolve) => server.close(() => resolve())))
    // server.close() only waits for connections to end; stalled ones never would.
    for (const socket of this.#sockets) socket.destroy()
    await Promise.all(closed)
  }

  #createServer(origin: RecordedRequest['origin'], serve: (req: IncomingMessage, res: ServerResponse) => Promise<void> | void): Server {
    const server = createServer((req, res) => {
      // A client that goes away mid-response must not crash the test process.
      res.on('error', ignore)
      req.on('error', ignore)
      req.resume()
      this.#record(req, origin)
      Promise.resolve()
        .then(() => serve(req, res))
        .catch((err: unknown) => abortResponse(res, err))
    })
    server.on('connection', (socket: Socket) => {
      this.#sockets.add(socket)
      socket.on('error', ignore)
      socket.once('close', () => this.#sockets.delete(socket))
    })
    server.on('clientError', (_err: Error, socket: Socket) => socket.destroy())
    return server
  }

  #record(req: IncomingMessage, origin: RecordedRequest['origin']): void {
    const request: RecordedRequest = {
      method: req.method ?? 'GET',
      url: req.url ?? '/',
      headers: { ...req.headers },
      origin,
    }
    this.requests.push(request)
    this.counts.total += 1
    if (origin === 'token') this.counts.token += 1
    if (origin === 'storage') {
      this.counts.storage += 1
      this.storageAuthHeaders.push(req.headers.authorization)
    }
    if (origin === 'registry') {
      const route = parseRoute(request.url)
      if (route.kind === 'ping') this.counts.ping += 1
      if (route.kind === 'manifest' && request.method === 'GET') this.counts.manifest += 1
      if (route.kind === 'manifest' && request.method === 'HEAD') this.counts.manifestHead += 1
      if (route.kind === 'tags') this.counts.tags += 1
      if (route.kind === 'blob') {
        this.counts.blob += 1
        if (req.headers.range !== undefined) this.counts.blobRange += 1
      }
    }
    for (const waiter of this.#waiters) {
      if (this.requests.filter(waiter.match).length >= waiter.count) {
        this.#waiters.delete(waiter)
        waiter.resolve()
      }
    }
  }

  /** The faults in force for one manifest/blob request, honouring `onlyFirst`. */
  #faultsFor(req: IncomingMessage): FakeFaults {
    const kind = parseRoute(req.url ?? '/').kind
    if (this.faults.onlyFirst === undefined || (kind !== 'manifest' && kind !== 'blob')) return { ...this.faults }
    // Counted per faults object: assigning new faults starts a new count.
    const seen = (this.#faulted.get(this.faults) ?? 0) + 1
    this.#faulted.set(this.faults, seen)
    return seen <= this.faults.onlyFirst ? { ...this.faults } : {}
  }

  readonly #faulted = new WeakMap<FakeFaults, number>()

  async #serveRegistry(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const faults = this.#faultsFor(req)
    if (faults.neverAnswer === true) return
    res.setHeader('Docker-Distribution-API-Version', 'registry/2.0')
    const route = parseRoute(req.url ?? '/')
    if (faults.resetBeforeAnswer === true && (route.kind === 'manifest' || route.kind === 'blob')) {
      req.socket.resetAndDestroy()
      return
    }
    const method = req.method ?? 'GET'
    if (route.kind === 'unknown') return sendError(req, res, 404, 'NAME_UNKNOWN', 'repository name not known to registry')
    if (method !== 'GET' && method !== 'HEAD') return sendError(req, res, 405, 'UNSUPPORTED', 'the operation is unsupported')
    const challenge = this.#authorize(req, route.kind === 'ping' ? undefined : route.name)
    if (challenge !== undefined) {
      this.counts.unauthorized += 1
      return sendError(req, res, 401, 'UNAUTHORIZED', 'authentication required', { 'WWW-Authenticate': challenge })
    }
    if (route.kind === 'ping') return sendJson(req, res, 200, {})
    if (route.kind === 'tags') return this.#serveTags(req, res, route.name)
    if (route.kind === 'manifest') return this.#serveManifest(req, res, route.name, route.reference, faults)
    return this.#serveRegistryBlob(req, res, route.name, route.digest, faults)
  }

  async #serveManifest(req: IncomingMessage, res: ServerResponse, name: string, reference: string, faults: FakeFaults): Promise<void> {
    if (!(await this.#pause(faults.manifestDelayMs))) return
    if (faults.manifestStatus !== undefined) return sendFault(req, res, faults.manifestStatus, 'manifest', faults)
    const content = this.#repos.get(name)
    const digest = DIGEST.test(reference) ? reference : content?.tags.get(reference)
    const manifest = digest === undefined ? undefined : content?.manifests.get(digest)
    if (digest === undefined || manifest === undefined) {
      return sendError(req, res, 404, 'MANIFEST_UNKNOWN', 'manifest unknown')
    }
    // Like distribution, refuse a manifest whose type the client did not say it accepts: a
    // client that forgets the index media types in Accept must fail here, not in production.
    if (!accepts(req.headers.accept, manifest.mediaType)) {
      return sendError(req, res, 404, 'MANIFEST_UNKNOWN', `manifest unknown: Accept does not allow ${manifest.mediaType}`)
    }
    const body = faults.corruptManifest === true ? Buffer.concat([manifest.body, Buffer.from('\n')]) : manifest.body
    res.statusCode = 200
    res.setHeader('Content-Type', faults.manifestWrongContentType === true ? 'text/plain; charset=utf-8' : manifest.mediaType)
    res.setHeader('Docker-Content-Digest', digest)
    res.setHeader('ETag', `"${digest}"`)
    res.setHeader('Content-Length', body.length)
    if (faults.manifestStallAfterBytes !== undefined && req.method !== 'HEAD') {
      res.write(body.subarray(0, faults.manifestStallAfterBytes))
      return
    }
    res.end(req.method === 'HEAD' ? undefined : body)
  }

  /**
   * `GET /v2/<name>/tags/list[?n=&last=]`: tags in lexical order after `last`, `n` (or
   * `tagPageSize`) per page, with a `Link` to the next page while more remain.
   */
  #serveTags(req: IncomingMessage, res: ServerResponse, name: string): void {
    if (this.tagsStatus !== undefined) return sendFault(req, res, this.tagsStatus, 'manifest', {})
    const content = this.#repos.get(name)
    if (content === undefined) return sendError(req, res, 404, 'NAME_UNKNOWN', 'repository name not known to registry')
    const url = new URL(req.url ?? '/', 'http://127.0.0.1')
    const last = url.searchParams.get('last') ?? ''
    const n = url.searchParams.has('n') ? Number(url.searchParams.get('n')) : this.tagPageSize
    const all = [...content.tags.keys()].sort().filter((t) => t > last)
    const page = n === undefined ? all : all.slice(0, n)
    const headers: Record<string, string> = {}
    const lastOfPage = page.at(-1)
    if (n !== undefined && all.length > page.length && lastOfPage !== undefined) {
      headers.Link = `</v2/${name}/tags/list?last=${encodeURIComponent(lastOfPage)}&n=${n}>; rel="next"`
    }
    sendJson(req, res, 200, { name, tags: page }, headers)
  }

  async #serveRegistryBlob(req: IncomingMessage, res: ServerResponse, name: string, digest: string, faults: FakeFaults): Promise<void> {
    if (!(await this.#pause(faults.blobDelayMs))) return
    if (faults.blobStatus !== undefined) return sendFault(req, res, faults.blobStatus, 'blob', faults)
    const data = this.#repos.get(name)?.blobs.has(digest) === true ? this.#blobs.get(digest) : undefined
    if (data === undefined) return sendError(req, res, 404, 'BLOB_UNKNOWN', 'blob unknown to registry')
    if (faults.redirectBlobs === true && req.method === 'GET') {
      res.statusCode = 307
      res.setHeader('Location', `${this.storageUrl}/blobs/${digest}`)
      res.setHeader('Content-Length', 0)
      res.end()
      return
    }
    res.setHeader('Docker-Content-Digest', digest)
    await this.#sendBlob(req, res, data, faults)
  }

  async #serveStorage(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const faults = { ...this.faults }
    if (faults.neverAnswer === true) return
    if (faults.storageChallenge !== undefined) {
      return sendError(req, res, 401, 'UNAUTHORIZED', 'storage wants credentials', { 'WWW-Authenticate': faults.storageChallenge })
    }
    const match = /^\/blobs\/(sha256:[0-9a-f]{64})$/.exec(pathOf(req.url ?? '/'))
    const data = match?.[1] === undefined ? undefined : this.#blobs.get(match[1])
    if (data === undefined) return sendError(req, res, 404, 'BLOB_UNKNOWN', 'no such object')
    if (req.method !== 'GET' && req.method !== 'HEAD') return sendError(req, res, 405, 'UNSUPPORTED', 'method not allowed')
    await this.#sendBlob(req, res, data, faults)
  }

  async #serveToken(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const faults = { ...this.faults }
    if (faults.neverAnswer === true) return
    if (!(await this.#pause(faults.tokenDelayMs))) return
    const auth = this.#auth
    if (faults.tokenStatus !== undefined) return sendFault(req, res, faults.tokenStatus, 'token', faults)
    const url = new URL(req.url ?? '/', 'http://127.0.0.1')
    if (auth.kind !== 'bearer' || url.pathname !== '/token') return sendError(req, res, 404, 'NOT_FOUND', 'not found')
    if (req.method !== 'GET') return sendError(req, res, 405, 'UNSUPPORTED', 'method not allowed')
    if ((auth.username !== undefined || auth.password !== undefined) && !hasBasic(req.headers, auth.username ?? '', auth.password ?? '')) {
      return sendError(req, res, 401, 'UNAUTHORIZED', 'invalid credentials', { 'WWW-Authenticate': 'Basic realm="fake-token"' })
    }
    if (url.searchParams.get('service') !== (auth.service ?? DEFAULT_SERVICE)) {
      return sendError(req, res, 400, 'DENIED', 'unknown service')
    }
    const repositories = new Set<string>()
    for (const scope of url.searchParams
      .getAll('scope')
      .flatMap((s) => s.split(' '))
      .filter((s) => s !== '')) {
      const parsed = SCOPE.exec(scope)
      const actions = parsed?.[2]?.split(',') ?? []
      if (parsed?.[1] === undefined || !(actions.includes('pull') || actions.includes('*'))) {
        return sendError(req, res, 400, 'DENIED', `invalid scope: ${scope}`)
      }
      repositories.add(parsed[1])
    }
    const token = `fake-${randomBytes(24).toString('hex')}`
    const ttl = auth.tokenTtlSeconds ?? DEFAULT_TOKEN_TTL_SECONDS
    const issuedAt = this.#now()
    this.#tokens.set(token, { expiresAt: issuedAt + ttl * 1000, repositories })
    sendJson(req, res, 200, { token, expires_in: ttl, issued_at: new Date(issuedAt).toISOString() })
  }

  /** Returns the WWW-Authenticate challenge when the request may not pull `name`, else undefined. */
  #authorize(req: IncomingMessage, name: string | undefined): string | undefined {
    const auth = this.#auth
    if (auth.kind === 'none') return undefined
    if (auth.kind === 'basic') {
      return hasBasic(req.headers, auth.username, auth.password) ? undefined : 'Basic realm="fake"'
    }
    const presented = /^Bearer\s+(\S+)$/i.exec(req.headers.authorization ?? '')?.[1]
    const token = presented === undefined ? undefined : this.#tokens.get(presented)
    let error: string | undefined
    if (token === undefined) {
      error = presented === undefined ? undefined : 'invalid_token'
    } else if (this.#now() >= token.expiresAt) {
      error = 'invalid_token'
    } else if (name !== undefined && !token.repositories.has(name)) {
      error = 'insufficient_scope'
    } else {
      return undefined
    }
    const params = [`realm="${this.tokenUrl}"`, `service="${auth.service ?? DEFAULT_SERVICE}"`]
    if (name !== undefined) params.push(`scope="repository:${name}:pull"`)
    if (error !== undefined) params.push(`error="${error}"`)
    return `Bearer ${params.join(',')}`
  }

  /** Sends a blob body (200, 206 or 416), applying the body faults of the snapshot. */
  async #sendBlob(req: IncomingMessage, res: ServerResponse, data: Buffer, faults: FakeFaults): Promise<void> {
    let body = data
    if (faults.corruptBlob === true && body.length > 0) {
      body = Buffer.from(body)
      const middle = Math.floor(body.length / 2)
      body.writeUInt8(body.readUInt8(middle) ^ 0x01, middle)
    }
    const extra = faults.extraBlobBytes ?? 0
    if (extra > 0) body = Buffer.concat([body, Buffer.alloc(extra, 0x5a)])
    const range = faults.ignoreRange === true ? ({ kind: 'full' } as const) : parseRange(req.headers.range, body.length)
    res.setHeader('Accept-Ranges', 'bytes')
    if (range.kind === 'unsatisfiable') {
      res.statusCode = 416
      res.setHeader('Content-Range', `bytes */${body.length}`)
      res.setHeader('Content-Length', 0)
      res.end()
      return
    }
    const payload = range.kind === 'partial' ? body.subarray(range.start, range.end + 1) : body
    res.statusCode = range.kind === 'partial' ? 206 : 200
    if (range.kind === 'partial') res.setHeader('Content-Range', `bytes ${range.start}-${range.end}/${body.length}`)
    res.setHeader('Content-Type', 'application/octet-stream')
    res.setHeader('Content-Length', payload.length)
    if (req.method === 'HEAD') {
      res.end()
      return
    }
    await this.#streamBody(res, payload, faults)
  }

  async #streamBody(res: ServerResponse, payload: Buffer, faults: FakeFaults): Promise<void> {
    const cuts: Array<{ at: number; then: 'truncate' | 'reset' | 'stall' }> = []
    if (faults.truncateBlobAt !== undefined) cuts.push({ at: faults.truncateBlobAt, then: 'truncate' })
    if (faults.resetBlobAt !== undefined) cuts.push({ at: faults.resetBlobAt, then: 'reset' })
    if (faults.blobStallAfterBytes !== undefined) cuts.push({ at: faults.blobStallAfterBytes, then: 'stall' })
    const cut = cuts.filter((c) => c.at < payload.length).sort((a, b) => a.at - b.at)[0]
    const limit = Math.max(0, cut?.at ?? payload.length)
    const chunkSize = Math.max(1, faults.blobChunkSize ?? DEFAULT_CHUNK_SIZE)
    res.flushHeaders()
    for (let offset = 0; offset < limit; offset += chunkSize) {
      if (offset > 0 && !(await this.#pause(faults.blobChunkDelayMs))) return
      // Waiting for each write to reach the socket keeps the pace real and the cut positions exact.
      if (!(await writeAndFlush(res, payload.subarray(offset, Math.min(offset + chunkSize, limit))))) return
    }
    if (cut === undefined) {
      res.end()
      return
    }
    // Let the headers and the bytes before the cut reach the client before the socket goes.
    if (!(await writeAndFlush(res, EMPTY))) return
    if (cut.then === 'truncate') res.socket?.destroy()
    if (cut.then === 'reset') res.socket?.resetAndDestroy()
    // 'stall': send nothing more; the socket stays open until the client or close() ends it.
  }

  /** Waits `ms`; false when the registry closed meanwhile, so the caller stops answering. */
  async #pause(ms: number | undefined): Promise<boolean> {
    if (ms !== undefined && ms > 0) {
      try {
        await delay(ms, undefined, { signal: this.#closing.signal })
      } catch {
        return false
      }
    }
    return !this.#closing.signal.aborted
  }

  #repo(name: string): RepoContent {
    if (!NAME.test(name)) throw new Error(`not an OCI repository name (no host, lowercase): ${name}`)
    let content = this.#repos.get(name)
    if (content === undefined) {
      content = { manifests: new Map(), blobs: new Set(), tags: new Map() }
      this.#repos.set(name, content)
    }
    return content
  }

  #mount(image: FakeImage, repo: string): void {
    const source = this.#repos.get(image.repo)
    const target = this.#repo(repo)
    const manifest = source?.manifests.get(image.manifestDigest)
    if (source === undefined || manifest === undefined) throw new Error(`image ${image.manifestDigest} is not in ${image.repo}`)
    target.manifests.set(image.manifestDigest, manifest)
    for (const digest of source.blobs) target.blobs.add(digest)
  }
}

function zeroCounts(): FakeCounts {
  return { ping: 0, manifest: 0, manifestHead: 0, blob: 0, blobRange: 0, token: 0, storage: 0, unauthorized: 0, tags: 0, total: 0 }
}

function ignore(): void {}

function sha256(data: Buffer): string {
  return `sha256:${createHash('sha256').update(data).digest('hex')}`
}

/** The config's diff_id is the digest of the uncompressed layer; non-gzip test layers hash as is. */
function diffId(layer: Buffer): string {
  try {
    return sha256(gunzipSync(layer))
  } catch {
    return sha256(layer)
  }
}

function listen(server: Server): Promise<void> {
  return new Promise((resolve, reject) => {
    server.once('error', reject)
    server.listen(0, '127.0.0.1', () => {
      server.off('error', reject)
      resolve()
    })
  })
}

function port(server: Server): number {
  const address = server.address()
  if (address === null || typeof address === 'string') throw new Error('fake registry server is not listening')
  return address.port
}

function pathOf(url: string): string {
  const query = url.indexOf('?')
  return query === -1 ? url : url.slice(0, query)
}

function parseRoute(url: string): Route {
  const path = pathOf(url)
  if (path === '/v2/' || path === '/v2') return { kind: 'ping' }
  const tags = TAGS_PATH.exec(path)?.[1]
  if (tags !== undefined) return { kind: 'tags', name: tags }
  const match = REGISTRY_PATH.exec(path)
  const [, name, kind, encoded] = match ?? []
  if (name === undefined || kind === undefined || encoded === undefined) return { kind: 'unknown' }
  let reference: string
  try {
    reference = decodeURIComponent(encoded)
  } catch {
    return { kind: 'unknown' }
  }
  return kind === 'manifests' ? { kind: 'manifest', name, reference } : { kind: 'blob', name, digest: reference }
}

function hasBasic(headers: IncomingHttpHeaders, username: string, password: string): boolean {
  const encoded = /^Basic\s+(\S+)$/i.exec(headers.authorization ?? '')?.[1]
  return encoded !== undefined && Buffer.from(encoded, 'base64').toString('utf8') === `${username}:${password}`
}

function accepts(header: string | undefined, mediaType: string): boolean {
  if (header === undefined) return true
  const types = header
    .split(',')
    .map((part) => (part.split(';')[0] ?? '').trim().toLowerCase())
    .filter((type) => type !== '')
  return types.length === 0 || types.some((type) => type === mediaType || type === '*/*' || type === 'application/*')
}

type ByteRange = { kind: 'full' } | { kind: 'partial'; start: number; end: number } | { kind: 'unsatisfiable' }

/** A single `bytes=a-b`, `bytes=a-` or `bytes=-n`; anything else is ignored (200), as RFC 9110 allows. */
function parseRange(header: string | undefined, size: number): ByteRange {
  const match = header === undefined ? null : /^bytes=(\d*)-(\d*)$/.exec(header.trim())
  const [, first = '', last = ''] = match ?? []
  if (match === null || (first === '' && last === '')) return { kind: 'full' }
  if (first === '') {
    const suffix = Number(last)
    return suffix === 0 || size === 0 ? { kind: 'unsatisfiable' } : { kind: 'partial', start: Math.max(0, size - suffix), end: size - 1 }
  }
  const start = Number(first)
  const end = last === '' ? size - 1 : Math.min(Number(last), size - 1)
  return start >= size || end < start ? { kind: 'unsatisfiable' } : { kind: 'partial', start, end }
}

function writeAndFlush(res: ServerResponse, chunk: Buffer): Promise<boolean> {
  if (res.destroyed) return Promise.resolve(false)
  return new Promise((resolve) => {
    const onClose = (): void => resolve(false)
    res.once('close', onClose)
    res.write(chunk, (err) => {
      res.off('close', onClose)
      resolve(err === undefined || err === null)
    })
  })
}

function sendJson(req: IncomingMessage, res: ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}): void {
  const bytes = Buffer.from(JSON.stringify(body))
  res.statusCode = status
  for (const [name, value] of Object.entries(headers)) res.setHeader(name, value)
  res.setHeader('Content-Type', 'application/json')
  res.setHeader('Content-Length', bytes.length)
  res.end(req.method === 'HEAD' ? undefined : bytes)
}

function sendError(req: IncomingMessage, res: ServerResponse, status: number, code: string, message: string, headers: Record<string, string> = {}): void {
  sendJson(req, res, status, { errors: [{ code, message }] }, headers)
}

/** Answers an injected status with the OCI error code a real registry would use for it. */
function sendFault(req: IncomingMessage, res: ServerResponse, status: number, kind: 'manifest' | 'blob' | 'token', faults: FakeFaults): void {
  const codes: Record<number, string> = {
    400: 'UNSUPPORTED',
    401: 'UNAUTHORIZED',
    403: 'DENIED',
    404: kind === 'manifest' ? 'MANIFEST_UNKNOWN' : kind === 'blob' ? 'BLOB_UNKNOWN' : 'NOT_FOUND',
    429: 'TOOMANYREQUESTS',
    503: 'UNAVAILABLE',
  }
  const headers: Record<string, string> = {}
  if ((status === 429 || status === 503) && faults.retryAfter !== undefined) headers['Retry-After'] = faults.retryAfter
  sendError(req, res, status, codes[status] ?? 'UNKNOWN', `injected fault: ${status}`, headers)
}

/** A bug in the fake shows as a 500 (or a cut connection once headers went out), never a crash. */
function abortResponse(res: ServerResponse, err: unknown): void {
  if (res.headersSent || res.destroyed) {
    res.destroy()
    return
  }
  const body = Buffer.from(JSON.stringify({ errors: [{ code: 'UNKNOWN', message: String(err) }] }))
  res.statusCode = 500
  res.setHeader('Content-Type', 'application/json')
  res.setHeader('Content-Length', body.length)
  res.end(body)
}

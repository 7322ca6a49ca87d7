import { createServer as createHttpServer, type IncomingMessage, type ServerResponse } from 'node:http'
import { join } from 'node:path'
import type { Socket } from 'node:net'
import type { Duplex } from 'node:stream'
import Boom from '@hapi/boom'
import Hapi from '@hapi/hapi'
import type { Logger } from 'pino'
import './request-state.js'
import { RequestLog } from './request-log.js'
import { ConnectionDrain } from './connection-drain.js'
import { packageFastPath } from './handlers/package-fast-path.js'
import { answerClientError, clientErrorFacts, clientErrorStatus } from './handlers/client-error.js'
import { requestQuery } from './handlers/package-request.js'
import { delivered, watchDelivery } from './handlers/response-end.js'
import { credentialsPlugin } from './plugins/credentials/index.js'
import { SourceSet } from './plugins/credentials/source-set.js'
import { healthPlugin } from './plugins/health/index.js'
import { bootstrapPlugin } from './plugins/bootstrap/index.js'
import { iconsPlugin } from './plugins/icons/index.js'
import { imagesPlugin } from './plugins/images/index.js'
import { ManifestResolver } from './plugins/images/manifest-resolver.js'
import { finalStatus, metricsPlugin } from './plugins/metrics/index.js'
import { Metrics } from './plugins/metrics/metrics.js'
import { peerMetrics } from './plugins/metrics/peer-metrics.js'
import { packagesPlugin, type PackagesApi } from './plugins/packages/index.js'
import type { DownloadSlotsOptions } from './plugins/packages/download-slots.js'
import { RegistryClient } from './plugins/packages/registry/registry-client.js'
import type { RegistryTimeouts } from './plugins/packages/registry/transport.js'
import { peersPlugin } from './plugins/peers/index.js'
import { MANIFEST_FILES_DIR } from './plugins/peers/manifest-files.js'
import { PEER_RESULTS } from './plugins/peers/peer-client.js'
import { kubePeers, staticPeers, type KubePeersConfig, type StaticPeersConfig } from './plugins/peers/setup.js'

export interface ServerOptions {
  host?: string
  port?: number
  cacheDirectory: string
  limitBytes: number
  disableCache?: boolean
  registryConfig?: string
  /** `--kubeconfig`; without it, in-cluster config when running in a pod (see `env`). */
  kubeconfig?: string
  logger: Logger
  /** Upstream timeouts (tests shorten them). */
  timeouts?: Partial<RegistryTimeouts>
  /** Proxy environment for the registry client and the in-cluster check (default `process.env`). */
  env?: NodeJS.ProcessEnv
  /** Prometheus process metrics (off in tests that build many servers). */
  collectDefaultMetrics?: boolean
  flushIntervalMs?: number
  /** Time a client gets to send its request headers (default 10 s). */
  headersTimeoutMs?: number
  /** Answer memory hits before hapi routes them (default on; tests compare both paths). */
  fastPath?: boolean
  /**
   * How long a stop waits for responses in progress, on every listener, before it closes the
   * connections still open (default 25 s; the pod's grace period is 40 s).
   */
  stopDrainMs?: number
  /**
   * A connection on which nothing moved either way for this long is closed (default 300 s):
   * a client that stops reading must not hold its socket, file and cache pin forever.
   */
  socketIdleTimeoutMs?: number
  /** Bounds on concurrent layer downloads and on those waiting for a slot (tests shrink them). */
  downloads?: Partial<DownloadSlotsOptions>
  /** The same for manifest lookups of cold digests. */
  lookups?: Partial<DownloadSlotsOptions>
  /** How often a cache directory that was unusable at start is tried again (tests shorten it). */
  cacheRetryMs?: number
  /** Bytes per second the background scrubber re-hashes (`--scrub-rate`); off unless given. */
  scrubBytesPerSecond?: number
  /** How long a resolved CLI tag is reused (default 5 s; tests that move tags use 0). */
  tagTtlMs?: number
  /** `--bootstrap-listen-address` and `--cluster-uuid`: the rpp-get listener (off when absent). */
  bootstrap?: { host: string; port: number; clusterUuid: string }
  /**
   * `--peers`: every replica's `host:port` (this one may be among them) for peer fill. `self`
   * is how the others name this replica (default `host:port` of this server).
   */
  peers?: StaticPeersConfig
  /**
   * `--peer-ca-file`: peer fill among this Deployment's ready pods, found through the Kubernetes
   * API (in a pod, or with `kubeconfig`); needs `POD_NAMESPACE` and `POD_IP` in `env`. `peers`
   * wins when given.
   */
  kubePeers?: KubePeersConfig
}

export interface ProxyServer {
  server: Hapi.Server
  sources: SourceSet
  metrics: Metrics
  packages: PackagesApi
}

/**
 * Composes the plugins into an initialized (not yet listening) server. Everything a test
 * needs to inspect is returned; nothing lives in module state.
 */
export async function createServer(o: ServerOptions): Promise<ProxyServer> {
  // Limits that make slow or oversized requests fail fast instead of holding sockets: a
  // slowloris client gets 10 s to send its headers, and request lines plus headers are capped.
  const headersTimeout = o.headersTimeoutMs ?? 10_000
  // Inactivity only: longer than any silence the proxy itself can cause (upstream retries and
  // resumes) and as long as the bootstrap scripts' own 300 s per-request timeout, after which
  // nobody is reading anyway. A client that stops reading must not hold its socket, file and
  // cache pin forever.
  const socketIdleTimeout = o.socketIdleTimeoutMs ?? 300_000
  const listener = createHttpServer({
    maxHeaderSize: 16 * 1024,
    headersTimeout,
    requestTimeout: Math.max(headersTimeout, 30_000),
    keepAliveTimeout: 5_000,
    // Node checks the timeouts above on this period (default 30 s): check often enough to matter.
    connectionsCheckingInterval: Math.min(1_000, headersTimeout),
  })
  // On every connection, including those answered before hapi routes them (the fast path).
  listener.setTimeout(socketIdleTimeout)
  const server = Hapi.server({
    listener,
    host: o.host ?? '127.0.0.1',
    port: o.port ?? 0,
    router: { stripTrailingSlash: false },
    routes: {
      // Package downloads can take long; upstream timeouts bound them, not a server timeout.
      // hapi re-arms the socket's inactivity timeout per request: the same one.
      timeout: { server: false, socket: socketIdleTimeout },
    },
  })
  // Registered before any plugin's hook: the listener stops accepting the moment a stop begins,
  // while plugins stop their own parts; the last hook (below) waits for the connections.
  const drainMs = o.stopDrainMs ?? 25_000
  server.ext('onPreStop', () => {
    void connections.stop(drainMs)
  })
  const sources = new SourceSet()
  const metrics = new Metrics({ collectDefaults: o.collectDefaultMetrics ?? true })
  const log = o.logger
  const peers = o.peers
    ? staticPeers(o.peers, `${o.host ?? '127.0.0.1'}:${o.port ?? 0}`, metrics, log)
    : o.kubePeers
      ? await kubePeers(o.kubePeers, { ...(o.kubeconfig ? { kubeconfig: o.kubeconfig } : {}), env: o.env ?? process.env, metrics, log })
      : undefined
  if (!peers) peerMetrics(metrics, PEER_RESULTS, () => 1)

  await server.register([
    { plugin: metricsPlugin, options: { metrics } },
    {
      plugin: credentialsPlugin,
      options: {
        sources,
        metrics,
        log,
        ...(o.registryConfig ? { registryConfig: o.registryConfig } : {}),
        ...(o.kubeconfig ? { kubeconfig: o.kubeconfig } : {}),
        ...(o.env ? { env: o.env } : {}),
        watchPackageRepositories: true,
      },
    },
    {
      plugin: packagesPlugin,
      options: {
        sources,
        metrics,
        log,
        cacheDirectory: o.cacheDirectory,
        limitBytes: o.limitBytes,
        disableCache: o.disableCache ?? false,
        ...(o.timeouts ? { timeouts: o.timeouts } : {}),
        ...(o.env ? { env: o.env } : {}),
        ...(o.flushIntervalMs ? { flushIntervalMs: o.flushIntervalMs } : {}),
        ...(o.downloads ? { downloads: o.downloads } : {}),
        ...(o.lookups ? { lookups: o.lookups } : {}),
        ...(o.cacheRetryMs ? { cacheRetryMs: o.cacheRetryMs } : {}),
        scrubBytesPerSecond: o.scrubBytesPerSecond ?? 0,
        ...(peers ? { peers: peers.peers } : {}),
      },
    },
  ])
  if (peers) {
    await server.register({
      plugin: peersPlugin,
      // Beside the cache, which is what a restarted replica keeps; with --disable-cache, nothing is written.
      options: { ...peers, log, ...(o.disableCache ? {} : { memoDirectory: join(o.cacheDirectory, MANIFEST_FILES_DIR) }) },
    })
  }
  const packages = server.plugins.packages.api
  // The v1 endpoints list tags and read manifests and icon layers themselves; layers they serve
  // whole go through `packages.service`, the same verified, cached path as /package.
  const v1Client = new RegistryClient({
    ...(o.timeouts ? { timeouts: o.timeouts } : {}),
    ...(o.env ? { env: o.env } : {}),
    observe: (kind, code, seconds) => metrics.observeUpstream(kind, code, seconds),
  })
  server.ext('onPostStop', () => v1Client.close())
  const manifests = new ManifestResolver(v1Client, o.tagTtlMs !== undefined ? { tagTtlMs: o.tagTtlMs } : {})
  const credentials = server.plugins.credentials.api
  await server.register([
    { plugin: imagesPlugin, options: { sources, metrics, packages: packages.service, client: v1Client, manifests } },
    { plugin: iconsPlugin, options: { sources, metrics, client: v1Client, manifests, synced: () => credentials.packageRepositoriesSynced() } },
  ])
  if (o.bootstrap) {
    await server.register({ plugin: bootstrapPlugin, options: { ...o.bootstrap, drainMs, sources, packages: packages.service, metrics, log: o.logger } })
  }
  await server.register({
    plugin: healthPlugin,
    options: {
      metrics,
      checks: [
        () => packages.notReady(),
        () => {
          const pending = sources.unsynced()
          return pending.length > 0 ? `credential sources not synced yet: ${pending.join(', ')}` : undefined
        },
        () => (sources.all().length === 0 ? 'no registry source is configured' : undefined),
      ],
    },
  })

  // One JSON line per request: what was asked, how it was served, how it ended (request-log.ts).
  const requestLog = new RequestLog(log)
  // A request Node could not parse (a head over 16 KiB, an unknown method, a bad header) or
  // whose head never finished: no hapi request exists, so its line is written here. hapi
  // answers every such request with a bare 400; tell clients the real reason first (431, 408).
  let clientErrors = 0
  const logClientError = (err: NodeJS.ErrnoException, socket: Duplex): void => {
    const status = clientErrorStatus(err)
    // Anything else (a reset, a timeout between requests) is a connection ending, not a request;
    // a bad body belongs to its request, which hapi answers (400) and logs as itself.
    if (status === undefined || !socket.writable || connections.receivingBody(socket as Socket)) return
    requestLog.write({
      id: `client-error:${Date.now()}:${++clientErrors}`,
      method: '',
      path: '',
      status,
      bytes: 0,
      ms: undefined,
      result: 'error',
      err: clientErrorFacts(err),
    })
    if (status !== 400) answerClientError(socket, status) // hapi's own answer is a bare 400
  }
  const hapiOnClientError = listener.listeners('clientError') as Array<(err: Error, socket: Duplex) => void>
  listener.removeAllListeners('clientError')
  listener.on('clientError', (err: NodeJS.ErrnoException, socket: Duplex) => {
    // Bytes after a request that said `Connection: close` (pipelined past it): the parser stops
    // there. The request in progress is answered and the connection closes after it, as the
    // client asked; hapi would answer that valid request with a 400 instead.
    if (err.code === 'HPE_CLOSED_CONNECTION' && connections.busy(socket as Socket)) return
    logClientError(err, socket)
    for (const l of hapiOnClientError) l.call(listener, err, socket)
  })
  server.events.on('response', (request) => {
    const response = request.response
    const status = finalStatus(request)
    const app = request.app
    // As the route read it (not hapi's request.query, which keeps 1,000 parameters at most).
    const query = request.path === '/package' ? requestQuery(request.raw.req.url) : {}
    const raw = request.raw.res
    // hapi swaps a response whose body broke off for a Boom error; the client saw the headers
    // of a success and then a cut connection: that is an aborted response, not a clean error.
    const aborted = (Boom.isBoom(response) && raw.headersSent && raw.statusCode < 400) || !delivered(raw)
    const headers = response && !Boom.isBoom(response) && 'headers' in response ? response.headers : {}
    const ended = request.info.completed || request.info.responded
    requestLog.write({
      id: request.info.id,
      method: request.method,
      path: request.path,
      status,
      // Bytes of body sent: a HEAD's Content-Length describes a body it never sends.
      bytes: aborted ? undefined : request.method === 'head' ? 0 : Number(headers['content-length'] ?? 0),
      sentStatus: raw.statusCode,
      ms: ended ? ended - request.info.received : undefined,
      ...(request.path === '/package'
        ? { pkg: { digest: query.digest, repository: query.repository, source: app.source, path: query.path, peer: app.peer } }
        : {}),
      ...(request.path.startsWith('/v1/') ? { route: request.route.path } : {}),
      result: app.result,
      err: app.err ?? codedError(response),
    })
  })
  // Plain GETs of cached packages skip hapi's lifecycle (see handlers/package-fast-path.ts);
  // everything else, and every request the fast path declines, goes to hapi's listener unchanged.
  if (o.fastPath !== false) {
    const hapiListeners = listener.listeners('request') as Array<(req: IncomingMessage, res: ServerResponse) => void>
    const fast = packageFastPath({
      sources,
      fallback: (req, res) => {
        for (const l of hapiListeners) l.call(listener, req, res)
      },
      packages: packages.service,
      onServed: (hit) => {
        packages.countHit(hit.finished ? hit.bytes : undefined)
        if (hit.finished) return requestLog.writeHit(hit.id, hit.asked, hit.source, hit.bytes, hit.ms)
        const { digest, repository, path } = hit.asked
        requestLog.write({
          id: hit.id,
          method: 'get',
          path: '/package',
          status: 499, // as hapi's lifecycle reports a client that went away
          bytes: undefined,
          sentStatus: 200,
          ms: hit.ms,
          pkg: { digest, repository, source: hit.source, path },
          result: 'hit',
        })
      },
    })
    listener.removeAllListeners('request')
    listener.on('request', fast.listener)
  }
  // A stop ends connections as their requests finish (connection-drain.ts), before hapi's own
  // stop, whose per-socket records and Node's close() both cut responses short. Made last, so
  // its count of each request comes before either path answers it.
  const connections = new ConnectionDrain(listener)
  server.ext('onPreStop', () => connections.stop(drainMs))
  // Whether each answer went out whole, for its log line and metrics (handlers/response-end.ts).
  listener.prependListener('request', watchDelivery)
  listener.prependListener('checkContinue', watchDelivery)
  await server.initialize()
  return { server, sources, metrics, packages }
}

/**
 * The `err` of a request line that no handler described: one of our coded errors answered
 * before or beside a handler (405, 416, 403), named by the `code` its body carries (by the
 * 'response' event hapi has turned the error into a response whose source is that body). Only
 * ours carry a `code`: their messages are our own text, never a client's input.
 */
function codedError(response: unknown): { type: string; code: string; message: string } | undefined {
  const body = Boom.isBoom(response)
    ? response.output.payload
    : response && typeof response === 'object' && 'statusCode' in response && Number(response.statusCode) >= 400 && 'source' in response
      ? response.source
      : undefined
  if (!body || typeof body !== 'object') return undefined
  const { code, message } = body as { code?: unknown; message?: unknown }
  return typeof code === 'string' ? { type: 'HttpError', code, message: typeof message === 'string' ? message : '' } : undefined
}

import type { Plugin } from '@hapi/hapi'
import { DigestError } from '../../errors.js'
import type { ResultCounts } from '../../handlers/cache.js'
import type { SourceSet } from '../credentials/source-set.js'
import type { Metrics } from '../metrics/metrics.js'
import { newAdminToken } from './cache/admin-token.js'
import type { CacheIndex } from './cache/cache-index.js'
import { CacheLifecycle } from './cache-lifecycle.js'
import type { DownloadSlotsOptions } from './download-slots.js'
import type { PackageLogger } from './log.js'
import type { PeerPort } from './peer-port.js'
import { PACKAGE_RESULTS, PackageService } from './package-service.js'
import { RegistryClient } from './registry/registry-client.js'
import { cacheRoutes, packageRoutes, resultCounter } from './routes.js'
import type { RegistryTimeouts } from './registry/transport.js'

export interface PackagesOptions {
  sources: SourceSet
  metrics: Metrics
  log: PackageLogger
  cacheDirectory: string
  limitBytes: number
  disableCache: boolean
  timeouts?: Partial<RegistryTimeouts>
  env?: NodeJS.ProcessEnv
  /** How often batched access times are written to SQLite. */
  flushIntervalMs?: number
  /** Bounds on concurrent layer downloads and on those waiting for a slot (503 beyond). */
  downloads?: Partial<DownloadSlotsOptions>
  /** The same for manifest lookups of cold digests. */
  lookups?: Partial<DownloadSlotsOptions>
  /** How often a cache directory that was unusable at start is tried again (default 30 s). */
  cacheRetryMs?: number
  /** Bytes per second the background scrubber re-hashes (default 4 MiB/s); 0 turns it off. */
  scrubBytesPerSecond?: number
  /** The other replicas (`--peers`): asked before and after the registry for a layer. */
  peers?: PeerPort
}

/** What the plugin exposes to the server and to other plugins (health, cache API). */
export interface PackagesApi {
  service: PackageService
  index: CacheIndex | undefined
  /** Why the cache cannot serve right now (index closed, directory not writable), or undefined. */
  notReady(): string | undefined
  /** Request outcomes since start (GET /cache). */
  counts: ResultCounts
  /**
   * Counts a hit the fast path answered, in {@link counts} and the metrics: `bytes` sent whole,
   * or undefined for an answer cut off (499).
   */
  countHit(bytes: number | undefined): void
}

// hapi's own typing for `server.plugins.packages.api`, as hapijs/inert's lib/index.d.ts types its plugin.
declare module '@hapi/hapi' {
  interface PluginProperties {
    packages: { api: PackagesApi }
  }
}

const DEFAULT_SCRUB_BYTES_PER_SECOND = 4 * 1024 * 1024

/**
 * Package handling: the registry client, the package service, the cache's lifecycle (opened
 * and reconciled before the first request, or retried while unusable), and the `/package` and
 * `/cache` routes. With `--disable-cache` nothing is opened or written.
 */
export const packagesPlugin: Plugin<PackagesOptions> = {
  name: 'packages',
  async register(server, o) {
    const m = o.metrics
    // DELETE /cache needs it (handlers/cache.ts); it is written into the cache directory when the
    // cache opens, so a cache that cannot be opened has no token, and nothing to delete either.
    const adminToken = newAdminToken()
    const client = new RegistryClient({
      ...(o.timeouts ? { timeouts: o.timeouts } : {}),
      ...(o.env ? { env: o.env } : {}),
      observe: (kind, code, seconds) => m.observeUpstream(kind, code, seconds),
    })
    const service = new PackageService({
      client,
      log: o.log,
      ...(o.downloads ? { downloads: o.downloads } : {}),
      ...(o.lookups ? { lookups: o.lookups } : {}),
      peers: o.peers,
      onFillDone: (outcome, seconds, error) => {
        m.fillSeconds.observe({ outcome }, seconds)
        // Counted once per download, however many clients read it.
        if (error instanceof DigestError) m.digestMismatches.inc({ what: error.what })
      },
      onResume: (kind) => m.upstreamResumes.inc({ kind }),
    })
    const lifecycle = new CacheLifecycle({
      directory: o.cacheDirectory,
      limitBytes: o.limitBytes,
      log: o.log,
      attach: (parts) => service.attachCache(parts),
      onRemoved: (reason, bytes, digest) => {
        service.forget(digest)
        m.evictions.inc({ reason })
        m.evictedBytes.inc({ reason }, bytes)
      },
      onScrubbed: (bytes) => m.scrubbedBytes.inc(bytes),
      scrubBytesPerSecond: o.scrubBytesPerSecond ?? DEFAULT_SCRUB_BYTES_PER_SECOND,
      adminToken,
      ...(o.cacheRetryMs !== undefined ? { retryMs: o.cacheRetryMs } : {}),
      ...(o.flushIntervalMs !== undefined ? { flushIntervalMs: o.flushIntervalMs } : {}),
    })
    if (!o.disableCache) await lifecycle.start()
    const books = () => {
      const c = service.cache
      const removed = c ? Object.values(c.removals) : []
      return {
        usedBytes: c?.usedBytes ?? 0,
        reservedBytes: c?.reservedBytes ?? 0,
        heldBytes: c?.heldBytes ?? 0,
        fillsInFlight: service.cacheFills,
        evictions: removed.reduce((n, r) => n + r.count, 0),
        evictedBytes: removed.reduce((n, r) => n + r.bytes, 0),
      }
    }
    m.attachCache({
      usedBytes: () => service.cache?.usedBytes ?? 0,
      limitBytes: () => (service.cache ? o.limitBytes : 0),
      entries: () => service.cache?.entryCount ?? 0,
      heldBytes: () => (service.cache ? service.cache.reservedBytes + service.cache.heldBytes : 0),
      activeFills: () => service.cacheFills,
      downloads: () => ({ layer: service.downloads, manifest: service.lookups }),
      memoryBytes: () => service.memoryBytes,
    })
    const counts = Object.fromEntries(PACKAGE_RESULTS.map((r) => [r, 0])) as ResultCounts
    const countResult = resultCounter(m, counts)
    packageRoutes(server, { sources: o.sources, metrics: m, service, countResult })
    cacheRoutes(server, {
      get index() {
        return lifecycle.index
      },
      get unavailable() {
        return lifecycle.unavailable
      },
      books,
      remove: (digest) => service.remove(digest),
      limitBytes: o.limitBytes,
      counts,
      adminToken,
    })
    server.expose('api', {
      service,
      get index() {
        return lifecycle.index
      },
      notReady: () => lifecycle.notReady(),
      counts,
      countHit: (bytes) => {
        counts.hit++
        // As plain numbers, added to the counters when they are read (Metrics.hits).
        if (bytes === undefined) m.hits.cut++
        else {
          m.hits.whole++
          m.hits.bytes += bytes
        }
      },
    } satisfies PackagesApi)
    server.ext('onPostStop', async () => {
      await service.close()
      client.close()
      await lifecycle.stop()
    })
  },
}

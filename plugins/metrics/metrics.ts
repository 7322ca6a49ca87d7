import client from 'prom-client'

/** Gauges read at scrape time from the live cache state. */
export interface CacheStats {
  usedBytes(): number
  limitBytes(): number
  entries(): number
  activeFills(): number
}

/**
 * Every series the proxy exports, on a registry of its own (no global state, so tests can run
 * several servers in one process). Labels are low-cardinality by construction: never a digest,
 * a repository or a host.
 */
export class Metrics {
  readonly registry = new client.Registry()
  readonly requests: client.Counter<'route' | 'method' | 'code'>
  readonly packageResults: client.Counter<'result'>
  readonly bytesServed: client.Counter
  readonly upstreamRequests: client.Counter<'kind' | 'code'>
  readonly upstreamSeconds: client.Histogram<'kind'>
  readonly digestMismatches: client.Counter<'what'>
  readonly sourceSynced: client.Gauge<'provider'>
  #stats: CacheStats | undefined

  constructor(options: { collectDefaults?: boolean } = {}) {
    const registers = [this.registry]
    if (options.collectDefaults !== false) client.collectDefaultMetrics({ register: this.registry, prefix: 'registry_packages_proxy_' })
    const stats = (): CacheStats | undefined => this.#stats
    new client.Gauge({
      name: 'registry_packages_proxy_cache_size',
      help: 'Bytes of packages in the cache (name kept from the system this replaces).',
      registers,
      collect() {
        this.set(stats()?.usedBytes() ?? 0)
      },
    })
    new client.Gauge({
      name: 'registry_packages_proxy_cache_limit_bytes',
      help: 'The cache limit, --cache-retention-size.',
      registers,
      collect() {
        this.set(stats()?.limitBytes() ?? 0)
      },
    })
    new client.Gauge({
      name: 'registry_packages_proxy_cache_entries',
      help: 'Packages (layer files) in the cache.',
      registers,
      collect() {
        this.set(stats()?.entries() ?? 0)
      },
    })
    new client.Gauge({
      name: 'registry_packages_proxy_fills_in_flight',
      help: 'Layer downloads into the cache running now.',
      registers,
      collect() {
        this.set(stats()?.activeFills() ?? 0)
      },
    })
    this.requests = new client.Counter({
      name: 'registry_packages_proxy_http_requests_total',
      help: 'HTTP requests answered, by route, method and status code.',
      labelNames: ['route', 'method', 'code'],
      registers,
    })
    this.packageResults = new client.Counter({
      name: 'registry_packages_proxy_package_results_total',
      help: 'Package requests by how they were served: hit, miss, coalesced, bypass, not-modified, head, error.',
      labelNames: ['result'],
      registers,
    })
    this.bytesServed = new client.Counter({
      name: 'registry_packages_proxy_served_bytes_total',
      help: 'Package body bytes sent to clients.',
      registers,
    })
    this.upstreamRequests = new client.Counter({
      name: 'registry_packages_proxy_upstream_requests_total',
      help: 'HTTP exchanges with registries by kind (manifest, blob, token) and status code (or "error").',
      labelNames: ['kind', 'code'],
      registers,
    })
    this.upstreamSeconds = new client.Histogram({
      name: 'registry_packages_proxy_upstream_response_seconds',
      help: 'Time until a registry answered with headers, by kind.',
      labelNames: ['kind'],
      buckets: [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
      registers,
    })
    this.digestMismatches = new client.Counter({
      name: 'registry_packages_proxy_digest_mismatches_total',
      help: 'Manifests or layers whose bytes did not match their digest.',
      labelNames: ['what'],
      registers,
    })
    this.sourceSynced = new client.Gauge({
      name: 'registry_packages_proxy_source_synced',
      help: '1 when a credential provider (file, secret, modulesources) has delivered its sources.',
      labelNames: ['provider'],
      registers,
    })
  }

  /** Connects the cache gauges to the live cache (set once the cache is open). */
  attachCache(stats: CacheStats): void {
    this.#stats = stats
  }
}

import client from 'prom-client'

/** Gauges read at scrape time from the live cache state. */
export interface CacheStats {
  usedBytes(): number
  limitBytes(): number
  entries(): number
  /** Bytes of removed entries still on disk (open by readers) plus space reserved for fills. */
  heldBytes(): number
  activeFills(): number
  /** Layer downloads and manifest lookups holding a slot, and those waiting for one. */
  downloads(): Record<'layer' | 'manifest', { running: number; queued: number }>
  /** Package bytes in memory: live entries, and removed ones responses are still sending. */
  memoryBytes(): { live: number; held: number }
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
  readonly evictions: client.Counter<'reason'>
  readonly evictedBytes: client.Counter<'reason'>
  readonly scrubbedBytes: client.Counter
  readonly fillSeconds: client.Histogram<'outcome'>
  readonly sourceErrors: client.Counter<'provider'>
  readonly sourceRestarts: client.Counter<'provider'>
  readonly sourceLastSync: client.Gauge<'provider'>
  readonly downloadsRefused: client.Counter<'kind'>
  readonly upstreamResumes: client.Counter<'kind'>
  /**
   * Cache hits the fast path answered and not yet added to {@link requests},
   * {@link packageResults} and {@link bytesServed}: plain numbers, added when any of those is
   * read (a scrape, or a test's `get()`). prom-client works out a labelled series' key on every
   * `inc`, which was a twentieth of a 64 KiB hit's CPU; a hit is the one event frequent enough
   * for that to matter.
   */
  readonly hits = { whole: 0, cut: 0, bytes: 0 }
  #stats: CacheStats | undefined
  #ready: (() => boolean) | undefined
  readonly #syncClocks = new Map<string, () => number | undefined>()

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
    const ready = (): (() => boolean) | undefined => this.#ready
    new client.Gauge({
      name: 'registry_packages_proxy_ready',
      // Exported by the process itself so the "not ready" alert needs no kube-state-metrics:
      // the PodMonitor scrapes pods directly, ready or not.
      help: '1 when /readyz answers 200 (cache index open, cache directory writable, every credential source synced), else 0.',
      registers,
      collect() {
        this.set(ready()?.() === true ? 1 : 0)
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
    new client.Gauge({
      name: 'registry_packages_proxy_downloads',
      help: 'Upstream work by kind (layer: fills and pass-throughs; manifest: lookups of cold digests) and state: running (holding a slot) or queued (waiting for one).',
      labelNames: ['kind', 'state'],
      registers,
      collect() {
        const d = stats()?.downloads()
        for (const kind of ['layer', 'manifest'] as const) {
          this.set({ kind, state: 'running' }, d?.[kind].running ?? 0)
          this.set({ kind, state: 'queued' }, d?.[kind].queued ?? 0)
        }
      },
    })
    new client.Gauge({
      name: 'registry_packages_proxy_memory_cache_bytes',
      help: 'Package bytes held in memory for hits: live (small packages, and large ones a herd is fetching) and held (removed from memory while responses still send them); together within the memory budget.',
      labelNames: ['state'],
      registers,
      collect() {
        const m = stats()?.memoryBytes()
        this.set({ state: 'live' }, m?.live ?? 0)
        this.set({ state: 'held' }, m?.held ?? 0)
      },
    })
    this.downloadsRefused = new client.Counter({
      name: 'registry_packages_proxy_downloads_refused_total',
      help: 'Package requests refused with 503 because a queue (layer downloads or manifest lookups) was full or no slot came free in time.',
      labelNames: ['kind'],
      registers,
    })
    // Both series exist from the start, so increase() sees the first refusal.
    for (const kind of ['layer', 'manifest'] as const) this.downloadsRefused.inc({ kind }, 0)
    this.upstreamResumes = new client.Counter({
      name: 'registry_packages_proxy_upstream_resumes_total',
      help: 'Layer downloads that resumed a broken or stalled registry connection with a Range request, by kind (fill or pass-through).',
      labelNames: ['kind'],
      registers,
    })
    for (const kind of ['fill', 'pass-through'] as const) this.upstreamResumes.inc({ kind }, 0)
    const addHits = (): void => this.#addHits()
    this.requests = new client.Counter({
      name: 'registry_packages_proxy_http_requests_total',
      help: 'HTTP requests answered, by route, method and status code; a body that broke off after the headers counts as 500 (a failure) or 499 (the client left).',
      labelNames: ['route', 'method', 'code'],
      registers,
      collect: addHits,
    })
    this.packageResults = new client.Counter({
      name: 'registry_packages_proxy_package_results_total',
      help: 'Package requests by how they were served: hit, miss, coalesced, bypass, not-modified, head, error.',
      labelNames: ['result'],
      registers,
      collect: addHits,
    })
    this.bytesServed = new client.Counter({
      name: 'registry_packages_proxy_served_bytes_total',
      help: 'Package body bytes sent to clients.',
      registers,
      collect: addHits,
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
    this.evictions = new client.Counter({
      name: 'registry_packages_proxy_evictions_total',
      help: 'Cache entries removed, once their file is gone, by reason: evicted to make room (least recently used first), deleted by DELETE /cache/{digest} (cache rm), corrupt (failed a re-hash).',
      labelNames: ['reason'],
      registers,
    })
    this.evictedBytes = new client.Counter({
      name: 'registry_packages_proxy_evicted_bytes_total',
      help: 'Bytes of the entries counted in registry_packages_proxy_evictions_total, by reason.',
      labelNames: ['reason'],
      registers,
    })
    for (const reason of ['evicted', 'deleted', 'corrupt'] as const) {
      this.evictions.inc({ reason }, 0)
      this.evictedBytes.inc({ reason }, 0)
    }
    this.scrubbedBytes = new client.Counter({
      name: 'registry_packages_proxy_scrubbed_bytes_total',
      help: 'Bytes of cached files re-hashed by the background scrubber (a corrupt file found is counted in evictions_total{reason="corrupt"}).',
      registers,
    })
    new client.Gauge({
      name: 'registry_packages_proxy_cache_held_bytes',
      help: 'Bytes in the cache folder beyond live entries: space reserved for running fills, and removed files still open by readers. cache_size plus this never exceeds the limit.',
      registers,
      collect() {
        this.set(stats()?.heldBytes() ?? 0)
      },
    })
    this.fillSeconds = new client.Histogram({
      name: 'registry_packages_proxy_fill_duration_seconds',
      help: 'Duration of layer downloads, by outcome (committed, failed, disk-error, commit-error; uncached: a verified download that could not be cached).',
      labelNames: ['outcome'],
      buckets: [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300],
      registers,
    })
    this.sourceSynced = new client.Gauge({
      name: 'registry_packages_proxy_source_synced',
      help: '1 when a credential provider (file, secret, modulesources) has delivered its sources.',
      labelNames: ['provider'],
      registers,
    })
    this.sourceErrors = new client.Counter({
      name: 'registry_packages_proxy_source_errors_total',
      help: 'Source definitions rejected as malformed (bad base64, JSON, PEM or field): a ModuleSource skipped, a Secret or config file whose last good version is kept.',
      labelNames: ['provider'],
      registers,
    })
    this.sourceRestarts = new client.Counter({
      name: 'registry_packages_proxy_source_watch_restarts_total',
      help: 'Kubernetes list or watch failures (API server unreachable, watch dropped, HTTP errors) after which the informer was restarted with backoff.',
      labelNames: ['provider'],
      registers,
    })
    const clocks = this.#syncClocks
    this.sourceLastSync = new client.Gauge({
      name: 'registry_packages_proxy_source_last_sync_timestamp_seconds',
      help: 'When a credential provider was last known to be in sync with its source (Unix seconds): the scrape time while a watch is open, else its last successful list, event or file check.',
      labelNames: ['provider'],
      registers,
      collect() {
        for (const [provider, clock] of clocks) {
          const ms = clock()
          if (ms !== undefined) this.set({ provider }, ms / 1000)
        }
      },
    })
  }

  /**
   * Counts and times one registry exchange: the registry clients of the packages plugin and of
   * the v1 endpoints report here (their `observe` option).
   */
  observeUpstream(kind: string, code: number | 'error', seconds: number): void {
    this.upstreamRequests.inc({ kind, code: String(code) })
    this.upstreamSeconds.observe({ kind }, seconds)
  }

  /** Reports a provider's last successful sync (ms since epoch, or undefined) at every scrape. */
  sourceSyncClock(provider: string, clock: () => number | undefined): void {
    this.#syncClocks.set(provider, clock)
  }

  /** Reports readiness (the same checks as `/readyz`) at every scrape. */
  readiness(isReady: () => boolean): void {
    this.#ready = isReady
  }

  /** Connects the cache gauges to the live cache (set once the cache is open). */
  attachCache(stats: CacheStats): void {
    this.#stats = stats
  }

  /** Adds the fast path's hits counted in {@link hits} to their counters. */
  #addHits(): void {
    const { whole, cut, bytes } = this.hits
    if (whole + cut === 0) return
    this.hits.whole = 0
    this.hits.cut = 0
    this.hits.bytes = 0
    if (whole > 0) this.requests.inc({ route: '/package', method: 'get', code: '200' }, whole)
    if (cut > 0) this.requests.inc({ route: '/package', method: 'get', code: '499' }, cut)
    this.packageResults.inc({ result: 'hit' }, whole + cut)
    if (bytes > 0) this.bytesServed.inc(bytes)
  }
}

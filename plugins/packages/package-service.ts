import { Readable } from 'node:stream'
import { ManifestError, NotFoundError, UpstreamError } from '../../errors.js'
import type { RegistrySource } from '../credentials/source.js'
import type { BlobCache, RemovalReason } from './cache/blob-cache.js'
import type { HotUse } from './cache/memory-cache.js'
import { CachedReads, type OpenedFile } from './cached-reads.js'
import type { DownloadSlotsOptions } from './download-slots.js'
import { Downloads, type CacheParts, type FillOutcome } from './downloads.js'
import { describe, type PackageLogger } from './log.js'
import { ManifestLookups, retriesWithPeers } from './manifest-lookups.js'
import type { LayerRef } from './manifest.js'
import type { PeerPort, PeerRequest } from './peer-port.js'
import type { RegistryClient } from './registry/registry-client.js'

export type { CacheParts, FillOutcome } from './downloads.js'

/** How a request was served, for logs and metrics. */
export const PACKAGE_RESULTS = ['hit', 'miss', 'coalesced', 'bypass'] as const
export type PackageResult = (typeof PACKAGE_RESULTS)[number]

export interface PackageServiceOptions {
  client: RegistryClient
  log: PackageLogger
  /** The cache, when one is open; {@link PackageService.attachCache} adds one later. */
  cache?: CacheParts | undefined
  /** Told how each download ended (metrics). */
  onFillDone?: (outcome: FillOutcome, seconds: number, error: Error | undefined) => void
  /** A layer download resumed a broken registry connection (a fill or a pass-through). */
  onResume?: (kind: 'fill' | 'pass-through') => void
  /** Bounds on concurrent layer downloads (fills and pass-throughs) and on those waiting for one. */
  downloads?: Partial<DownloadSlotsOptions>
  /** The same for manifest lookups of cold digests. */
  lookups?: Partial<DownloadSlotsOptions>
  /** The other replicas (peer fill); without them every miss goes to the registry. */
  peers?: PeerPort | undefined
}

/** The resolution of a package request: which layer, and whether it is on disk. */
export interface ResolvedPackage {
  digest: string
  layer: LayerRef
  cached: boolean
}

/** An open body for a response. */
export interface PackageBody {
  stream: Readable
  /**
   * Set for hits served from memory: the bytes, ready for one write; a caller that takes them
   * calls `release` when the response is done with them (the stream view does that itself).
   */
  buffer?: Buffer
  release?: () => void
  result: PackageResult
}

/** A body of bytes already in memory; the stream view is made only if someone asks. */
function bufferBody(buffer: Buffer, result: PackageResult, release: () => void): PackageBody {
  return {
    buffer,
    release,
    result,
    get stream(): Readable {
      const stream = Readable.from([buffer], { objectMode: false })
      stream.once('close', release)
      return stream
    },
  }
}

/**
 * The package use case: manifest digest -> last layer -> bytes, from the cache when possible.
 * Manifests are looked up once per concurrent (repository, digest) ({@link ManifestLookups}); layers are downloaded once
 * per digest ({@link Downloads}); hits are read with bounded memory ({@link CachedReads}); the
 * cache's books are kept by its one owner ({@link BlobCache}).
 */
export class PackageService {
  readonly #o: PackageServiceOptions
  #parts: CacheParts | undefined
  /** Manifest digest -> layer for fills not yet committed, so a request in between needs no registry. */
  readonly #inflightLayers = new Map<string, LayerRef>()
  readonly #downloads: Downloads
  readonly #lookups: ManifestLookups
  readonly #reads: CachedReads
  readonly #aborter = new AbortController()

  constructor(options: PackageServiceOptions) {
    this.#o = options
    this.#parts = options.cache
    this.#downloads = new Downloads({
      client: options.client,
      log: options.log,
      ...(options.downloads ? { slots: options.downloads } : {}),
      ...(options.onFillDone ? { onFillDone: options.onFillDone } : {}),
      ...(options.onResume ? { onResume: options.onResume } : {}),
      peers: options.peers,
    })
    this.#lookups = new ManifestLookups({ client: options.client, peers: options.peers, slots: options.lookups, signal: this.#aborter.signal })
    this.#reads = new CachedReads({ log: options.log })
  }

  /** Starts caching with a cache that opened after start; downloads already running stay uncached. */
  attachCache(parts: CacheParts): void {
    if (this.#parts) throw new Error('a cache is attached already')
    this.#parts = parts
  }

  /** The cache's owner, when a cache is open (for its books: /cache, metrics, the scrubber). */
  get cache(): BlobCache | undefined {
    return this.#parts?.cache
  }

  /** Told by the cache of every removal: its bytes may also be in memory. */
  forget(digest: string, _reason?: RemovalReason): void {
    this.#reads.hot.delete(digest)
  }

  /** Layer downloads running or cleaning up, cached or not (tests wait for 0). */
  get activeFills(): number {
    return this.#downloads.active
  }

  /** Downloads into the cache running now (the fills-in-flight gauge, `GET /cache`). */
  get cacheFills(): number {
    return this.#downloads.fills
  }

  /** Package bytes in memory for hits (see HotCache). */
  get memoryBytes(): { live: number; held: number } {
    return { live: this.#reads.hot.bytes, held: this.#reads.hot.held }
  }

  /** Layer downloads holding a slot, and those waiting for one. */
  get downloads(): { running: number; queued: number } {
    return { running: this.#downloads.slots.running, queued: this.#downloads.slots.queued }
  }

  /** Manifest lookups holding a slot, and those waiting for one. */
  get lookups(): { running: number; queued: number } {
    return this.#lookups.counts
  }

  /**
   * Finds the layer for `digest`: from the index when known, else from the registry (or, when
   * that fails, from a peer). A peer's `cached` request is answered from the cache alone.
   */
  async resolve(source: RegistrySource, name: string, digest: string, request?: PeerRequest): Promise<ResolvedPackage> {
    const parts = this.#parts
    const known = parts?.index.manifest(digest)
    if (parts && known && parts.cache.has(known.layerDigest)) {
      const size = parts.index.blob(known.layerDigest)?.size
      if (size !== undefined) return { digest, layer: { digest: known.layerDigest, size, mediaType: known.layerMediaType }, cached: true }
    }
    // Another replica whose registry failed asks only for what is here: no registry, no fill.
    if (request?.from === 'cached') throw new NotFoundError('this replica does not hold that package')
    // A fill that just finished may not have written its rows yet: its manifest is known here.
    const inflight = this.#inflightLayers.get(digest)
    if (inflight) return { digest, layer: inflight, cached: parts?.cache.has(inflight.digest) ?? false }
    const layer = await this.#lookups.find(source, name, digest, request)
    // A digest names its bytes, and so their length: a manifest that gives a layer we hold (or
    // are downloading) another size than it has is lying, and would have us cut the bytes short
    // or promise more than exist (found from outside: a truncated but complete 200 from a hit).
    const held = this.#parts?.index.blob(layer.digest)?.size ?? this.#downloads.sizeOf(layer.digest)
    if (held !== undefined && held !== layer.size) {
      throw new ManifestError(`the manifest says layer ${layer.digest} has ${layer.size} bytes; it has ${held}`)
    }
    const cached = this.#parts?.cache.has(layer.digest) ?? false
    if (cached) await this.#rememberManifest(digest, layer)
    return { digest, layer, cached }
  }

  async #rememberManifest(digest: string, layer: LayerRef): Promise<void> {
    try {
      await this.#parts?.index.putManifest({ digest, layerDigest: layer.digest, layerMediaType: layer.mediaType })
    } catch (err) {
      this.#o.log.warn({ err: describe(err), digest }, 'cache index write failed; serving without recording the manifest')
    }
  }

  /**
   * Opens bytes `start..end` (inclusive) of the package. A hit reads the cache; a miss joins
   * the running download of the layer or starts one (cached when space can be reserved).
   * Resolves once the first byte can be trusted to follow (the registry answered).
   */
  async open(source: RegistrySource, name: string, pkg: ResolvedPackage, start: number, end: number, request?: PeerRequest): Promise<PackageBody> {
    const { layer } = pkg
    const parts = this.#parts
    // Checked again here: the layer may have been committed since resolve().
    if (parts?.cache.has(layer.digest)) {
      const hit = await this.#reads.open(parts.cache, layer.digest, start, end)
      if (hit) {
        parts.index.touch(layer.digest)
        return 'buffer' in hit ? bufferBody(hit.buffer, 'hit', hit.release) : { stream: hit.stream, result: 'hit' }
      }
    }
    if (request?.from === 'cached') throw new NotFoundError('this replica does not hold that package')
    this.#inflightLayers.set(pkg.digest, layer)
    const forgetLayer = (): void => {
      if (this.#inflightLayers.get(pkg.digest) === layer) this.#inflightLayers.delete(pkg.digest)
    }
    let joined
    try {
      joined = await this.#downloads.join(source, name, pkg.digest, layer, start, parts, request)
      try {
        await joined.fill.started
      } catch (err) {
        // As for lookups: a client that joined a download that never asks peers, and that
        // failed from the registry, starts one that does.
        if (!retriesWithPeers(this.#o.peers, request, joined.asksPeers, err)) throw err
        joined = await this.#downloads.join(source, name, pkg.digest, layer, start, parts, request, true)
        await joined.fill.started
      }
    } catch (err) {
      forgetLayer()
      throw err
    }
    const { fill, started, finished } = joined
    void finished.then(forgetLayer)
    const result: PackageResult = !started ? 'coalesced' : fill.temp ? 'miss' : 'bypass'
    return { stream: fill.reader(start, end), result }
  }

  /** Removes one cached package by manifest or layer digest; false if it was not cached. */
  async remove(digest: string): Promise<boolean> {
    const parts = this.#parts
    if (!parts) return false
    const layerDigest = parts.index.manifest(digest)?.layerDigest ?? digest
    this.#reads.hot.delete(layerDigest)
    if (await parts.cache.remove(layerDigest, 'deleted')) return true
    await parts.index.removeManifest(digest)
    return false
  }

  /**
   * The whole package for `digest` when it is cached, for a plain GET served without hapi:
   * its bytes if they are in memory, or a way to open its file (resolving undefined if the
   * file is gone or fails its check: the caller then takes the full path). Undefined when it
   * is not cached, or belongs in memory but is not loaded yet (the full path loads it).
   * Synchronous up to the open: it touches no disk and no registry. Counted as a hit.
   */
  cachedHit(digest: string): HotUse | { size: number; open: () => Promise<OpenedFile | undefined> } | undefined {
    const parts = this.#parts
    const layerDigest = parts?.index.manifest(digest)?.layerDigest
    if (!parts || !layerDigest) return undefined
    const size = parts.index.blob(layerDigest)?.size
    if (size === undefined || !parts.cache.has(layerDigest)) return undefined
    const hot = this.#reads.inMemory(parts.cache, layerDigest)
    if (hot) {
      parts.index.touch(layerDigest)
      return hot
    }
    if (this.#reads.hot.accepts(size)) return undefined
    return {
      size,
      open: async () => {
        const file = await this.#reads.openFile(parts.cache, layerDigest)
        if (file) parts.index.touch(layerDigest)
        return file
      },
    }
  }

  /** Resolves when every running download has committed or cleaned up and the cache's I/O is done. */
  async settled(): Promise<void> {
    await this.#downloads.settled()
    await this.#parts?.cache.settled()
  }

  /** Aborts running downloads (shutdown) and waits for them to settle. */
  async close(): Promise<void> {
    const reason = new UpstreamError('the proxy is shutting down')
    this.#aborter.abort(reason)
    await this.#downloads.close(reason)
    await this.#parts?.cache.settled()
  }
}

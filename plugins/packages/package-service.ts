import { open, type FileHandle } from 'node:fs/promises'
import { Readable } from 'node:stream'
import { ManifestError, ProxyError, UpstreamError } from '../../errors.js'
import type { RegistrySource } from '../credentials/source.js'
import type { BlobStore } from './blob-store.js'
import type { CacheIndex } from './cache-index.js'
import { DownloadSlots, type DownloadSlotsOptions, type DownloadTicket } from './download-slots.js'
import { Fill } from './fill.js'
import { HotCache } from './hot-cache.js'
import { parseManifest, verifyDigest, type LayerRef } from './manifest.js'
import { verifiedPassThrough } from './pass-through.js'
import type { RegistryClient } from './registry-client.js'
import { SpaceManager, type Reservation } from './space-manager.js'

/** How a request was served, for logs and metrics. */
export type PackageResult = 'hit' | 'miss' | 'coalesced' | 'bypass'

export interface PackageLogger {
  info(obj: object, msg: string): void
  warn(obj: object, msg: string): void
  error(obj: object, msg: string): void
}

export interface PackageServiceOptions {
  index: CacheIndex | undefined
  store: BlobStore | undefined
  client: RegistryClient
  limitBytes: number
  disableCache: boolean
  log: PackageLogger
  /** Upper bound for one fill, whoever is waiting for it. */
  fillTimeoutMs?: number
  /** Told how each fill ended (metrics). */
  onFillDone?: (outcome: FillOutcome, seconds: number, error: Error | undefined) => void
  /** Told about every eviction (metrics). */
  onEvict?: (bytes: number) => void
  /** A layer download resumed a broken registry connection (a fill or a pass-through). */
  onResume?: (kind: 'fill' | 'pass-through') => void
  /** Memory for small hot layers (default 64 MiB, entries up to 8 MiB); 0 turns it off. */
  hotCacheBytes?: number
  hotCacheEntryBytes?: number
  /** Bounds on concurrent layer downloads (fills and pass-throughs) and on those waiting for one. */
  downloads?: Partial<DownloadSlotsOptions>
  /** The same for manifest lookups of cold digests. */
  lookups?: Partial<DownloadSlotsOptions>
}

/** How a fill ended: cached, failed upstream or on verification, or served without caching. */
export type FillOutcome = 'committed' | 'failed' | 'disk-error' | 'commit-error'

/** A fill's entry in the single-flight map, known to the fill so it removes only itself. */
interface FillSlot {
  promise?: Promise<Fill | undefined>
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
  /** Set for hits served from memory: the bytes, ready for one write. */
  buffer?: Buffer
  result: PackageResult
}

/** A body of bytes already in memory; the stream view is made only if someone asks. */
function bufferBody(buffer: Buffer, result: PackageResult): PackageBody {
  return {
    buffer,
    result,
    get stream(): Readable {
      return Readable.from([buffer], { objectMode: false })
    },
  }
}

/**
 * The package use case: manifest digest -> last layer -> bytes, from the cache when possible.
 * Manifests are fetched once per concurrent (repository, digest); layers once per digest;
 * space is reserved before a byte is written so the cache never exceeds its limit.
 */
export class PackageService {
  #o: PackageServiceOptions
  readonly #fills = new Map<string, Promise<Fill | undefined>>()
  readonly #resolving = new Map<string, Promise<LayerRef>>()
  /** Set at construction, or by {@link attachCache} once a cache unusable at start opened. */
  space: SpaceManager | undefined
  readonly #aborter = new AbortController()
  readonly #hot: HotCache
  readonly #running = new Set<Promise<void>>()
  /** Manifest digest -> layer for fills not yet committed, so a request in between needs no registry. */
  readonly #inflightLayers = new Map<string, LayerRef>()
  readonly #downloads: DownloadSlots
  readonly #lookups: DownloadSlots

  constructor(options: PackageServiceOptions) {
    this.#o = options
    this.#downloads = new DownloadSlots(options.downloads, this.#aborter.signal)
    this.#lookups = new DownloadSlots(options.lookups, this.#aborter.signal, 'manifest')
    this.#hot = new HotCache(options.hotCacheBytes ?? 64 * 1024 * 1024, options.hotCacheEntryBytes ?? 8 * 1024 * 1024)
    this.space = options.index && options.store && !options.disableCache ? this.#newSpace(options.index, options.store) : undefined
  }

  #newSpace(index: CacheIndex, store: BlobStore): SpaceManager {
    return new SpaceManager(index, store, this.#o.limitBytes, this.#o.log, (digest, bytes) => {
      this.#hot.delete(digest)
      this.#o.onEvict?.(bytes)
    })
  }

  /**
   * Starts caching with a cache that opened after start (it could not be opened then); until
   * now every package streamed through. Downloads already running stay pass-throughs.
   */
  attachCache(index: CacheIndex, store: BlobStore): SpaceManager {
    if (this.space) throw new Error('a cache is attached already')
    this.#o = { ...this.#o, index, store, disableCache: false }
    this.space = this.#newSpace(index, store)
    return this.space
  }

  /** Fills running or cleaning up (a failed fill leaves the join map earlier than this). */
  get activeFills(): number {
    return this.#running.size
  }

  /** Layer downloads (fills and pass-throughs) holding a slot, and those waiting for one. */
  get downloads(): { running: number; queued: number } {
    return { running: this.#downloads.running, queued: this.#downloads.queued }
  }

  /** Manifest lookups holding a slot, and those waiting for one. */
  get lookups(): { running: number; queued: number } {
    return { running: this.#lookups.running, queued: this.#lookups.queued }
  }

  /** Finds the layer for `digest`: from the index when known, else from the registry. */
  async resolve(source: RegistrySource, name: string, digest: string): Promise<ResolvedPackage> {
    const known = this.#o.index?.manifest(digest)
    if (known && !this.#o.disableCache) {
      const blob = this.#o.index?.blob(known.layerDigest)
      if (blob) return { digest, layer: { digest: blob.digest, size: blob.size, mediaType: known.layerMediaType }, cached: true }
    }
    // A fill that just finished may not have written its rows yet: its manifest is known here.
    const inflight = this.#inflightLayers.get(digest)
    if (inflight && !this.#o.disableCache) return { digest, layer: inflight, cached: this.#o.index?.blob(inflight.digest) !== undefined }
    const key = `${source.repository}\n${name}\n${digest}`
    let pending = this.#resolving.get(key)
    if (!pending) {
      // A full queue refuses here (503), before anything is registered or sent upstream.
      const ticket = this.#lookups.enter()
      pending = ticket.ready
        .then(() => this.#fetchLayerRef(source, name, digest))
        .finally(() => {
          ticket.release()
          this.#resolving.delete(key)
        })
      this.#resolving.set(key, pending)
    }
    const layer = await pending
    const cached = !this.#o.disableCache && this.#o.index?.blob(layer.digest) !== undefined
    if (cached) await this.#rememberManifest(digest, layer)
    return { digest, layer, cached }
  }

  async #fetchLayerRef(source: RegistrySource, name: string, digest: string): Promise<LayerRef> {
    const first = await this.#o.client.fetchManifest(source, name, digest)
    verifyDigest('manifest', first.body, digest)
    const parsed = parseManifest(first.body, first.mediaType)
    if (parsed.kind === 'image') return parsed.layer
    const second = await this.#o.client.fetchManifest(source, name, parsed.platformDigest)
    verifyDigest('manifest', second.body, parsed.platformDigest)
    const image = parseManifest(second.body, second.mediaType)
    if (image.kind !== 'image') throw new ManifestError('linux/amd64 entry of the index is itself an index')
    return image.layer
  }

  async #rememberManifest(digest: string, layer: LayerRef): Promise<void> {
    try {
      await this.#o.index?.putManifest({ digest, layerDigest: layer.digest, layerMediaType: layer.mediaType })
    } catch (err) {
      this.#o.log.warn({ err: describe(err), digest }, 'cache index write failed; serving without recording the manifest')
    }
  }

  /**
   * Opens bytes `start..end` (inclusive) of the package. A hit reads the file; a miss joins the
   * running fill for the layer or starts one; an uncacheable layer streams straight through.
   * Resolves once the first byte can be trusted to follow (the registry answered).
   */
  async open(source: RegistrySource, name: string, pkg: ResolvedPackage, start: number, end: number): Promise<PackageBody> {
    const { layer } = pkg
    // Checked again here: the layer may have been committed since resolve().
    if (this.space && this.#o.store && this.#o.index?.blob(layer.digest)) {
      const hot = this.#hot.get(layer.digest)
      if (hot) {
        this.#o.index.touch(layer.digest)
        return bufferBody(hot.subarray(start, end + 1), 'hit')
      }
      const handle = await this.#openCached(layer.digest)
      if (handle) {
        this.#o.index?.touch(layer.digest)
        if (this.#hot.accepts(layer.size)) {
          // Small layer: read it whole once; later hits are served from memory.
          try {
            const data = await handle.readFile()
            if (data.length === layer.size && this.#o.index?.blob(layer.digest)) this.#hot.put(layer.digest, data)
            return bufferBody(data.subarray(start, end + 1), 'hit')
          } finally {
            await handle.close().catch(() => undefined)
            this.space.unpin(layer.digest)
          }
        }
        const stream = handle.createReadStream({ start, end, highWaterMark: 1024 * 1024 })
        stream.once('close', () => this.space?.unpin(layer.digest))
        return { stream, result: 'hit' }
      }
    }
    let fill: Fill | undefined
    let result: PackageResult = 'coalesced'
    const pending = this.#fills.get(layer.digest)
    if (pending) {
      fill = await pending
      // A fill whose disk failed serves only the readers it had; later ones stream through.
      if (fill && !fill.joinable) fill = undefined
    } else if (this.space) {
      // A full queue refuses here (503), before anything is registered or sent upstream.
      const ticket = this.#downloads.enter()
      // Registered synchronously, before any await, so every concurrent request joins this fill
      // (and its place in the download queue).
      const slot: FillSlot = {}
      this.#inflightLayers.set(pkg.digest, layer)
      slot.promise = this.#startFill(source, name, pkg.digest, layer, ticket, slot)
      this.#fills.set(layer.digest, slot.promise)
      fill = await slot.promise
      result = 'miss'
    }
    if (!fill) return { stream: await this.#passThrough(source, name, layer, start, end), result: 'bypass' }
    await fill.started
    return { stream: fill.reader(start, end), result }
  }

  /** A verified stream straight from the registry, holding a download slot until it closes. */
  async #passThrough(source: RegistrySource, name: string, layer: LayerRef, start: number, end: number): Promise<Readable> {
    const ticket = this.#downloads.enter()
    let stream: Readable
    try {
      await ticket.ready
      stream = await verifiedPassThrough(this.#o.client, source, name, layer, start, end, (err, offset) => {
        this.#o.onResume?.('pass-through')
        this.#o.log.warn({ err: describe(err), layer: layer.digest, offset }, 'registry connection broke mid-layer; resuming with a Range request')
      })
    } catch (err) {
      ticket.release()
      throw err
    }
    stream.once('close', () => ticket.release())
    return stream
  }

  /** Opens a cached file, pinning it against eviction; undefined if it vanished meanwhile. */
  async #openCached(digest: string): Promise<FileHandle | undefined> {
    if (!this.space || !this.#o.store) return undefined
    this.space.pin(digest)
    try {
      return await open(this.#o.store.pathFor(digest), 'r')
    } catch {
      this.space.unpin(digest)
      return undefined
    }
  }

  /**
   * Runs the one fill for `layer` once `ticket` grants a download slot, or resolves undefined
   * when it cannot start (no space that can be freed, a disk error): the caller then streams
   * straight through. Rejects with a BusyError when no slot came free in time. `slot` is this
   * fill's entry in the map, so cleanup never removes a newer fill for the same digest.
   */
  async #startFill(source: RegistrySource, name: string, digest: string, layer: LayerRef, ticket: DownloadTicket, slot: FillSlot): Promise<Fill | undefined> {
    const store = this.#o.store
    const forget = (): void => {
      if (this.#fills.get(layer.digest) === slot.promise) this.#fills.delete(layer.digest)
    }
    const forgetLayer = (): void => {
      if (this.#inflightLayers.get(digest) === layer) this.#inflightLayers.delete(digest)
    }
    try {
      await ticket.ready
    } catch (err) {
      forget()
      forgetLayer()
      throw err
    }
    // Space is reserved only once the download may start: a fill waiting in line holds no bytes.
    const reservation = this.space?.reserve(layer.size)
    if (!reservation) {
      ticket.release()
      forget()
      forgetLayer()
      return undefined
    }
    let fill: Fill
    try {
      await reservation.ready
      if (!store) throw new Error('no blob store')
      fill = new Fill(layer, await store.createTemp())
    } catch (err) {
      reservation.release()
      ticket.release()
      forget()
      forgetLayer()
      this.#o.log.warn({ err: describe(err), layer: layer.digest }, 'cannot start a cache fill; streaming through')
      return undefined
    }
    // A failed fill leaves the map the moment it fails (synchronously), so a request arriving
    // during its clean-up starts a new download instead of inheriting the failure.
    fill.on('progress', () => {
      if (fill.state === 'failed') forget()
    })
    fill.on('resume', (err: unknown) => {
      this.#o.onResume?.('fill')
      this.#o.log.warn({ err: describe(err), layer: layer.digest, offset: fill.written }, 'registry connection broke mid-layer; resuming with a Range request')
    })
    fill.once('degraded', (err: unknown) => {
      // No new reader may join a fill that cannot be cached; its current readers still finish.
      // The reservation stays until the fill ends: the temp file's blocks are in use until then.
      forget()
      this.#o.log.error({ err: describe(err), layer: layer.digest }, 'disk error during a cache fill; serving current clients from memory, caching nothing')
    })
    const signal = AbortSignal.any([AbortSignal.timeout(this.#o.fillTimeoutMs ?? 30 * 60_000), this.#aborter.signal])
    const began = process.hrtime.bigint()
    const settled = fill
      .run((offset) => this.#o.client.openBlob(source, name, layer.digest, { offset, signal }))
      .then(() => this.#finishFill(fill, digest, reservation))
      .then((outcome) => this.#o.onFillDone?.(outcome, Number(process.hrtime.bigint() - began) / 1e9, fill.error ?? fill.diskError))
      .finally(() => {
        reservation.release()
        ticket.release()
        forget()
        forgetLayer()
        fill.release()
        this.#running.delete(settled)
      })
    this.#running.add(settled)
    return fill
  }

  /** Commits a verified fill (rename, then index rows) or discards a failed one. */
  async #finishFill(fill: Fill, digest: string, reservation: Reservation): Promise<FillOutcome> {
    const { layer } = fill
    const store = this.#o.store
    const index = this.#o.index
    if (!store || !index) return 'failed'
    if (fill.state !== 'verified' || fill.diskError) {
      await store.removeTemp(fill.tempPath).catch(() => undefined)
      if (fill.diskError) return 'disk-error'
      this.#o.log.warn({ err: describe(fill.error), layer: layer.digest }, 'cache fill failed; nothing cached')
      return 'failed'
    }
    try {
      await store.commit(fill.tempPath, layer.digest)
      const now = Date.now()
      await index.putBlob({ digest: layer.digest, size: layer.size, lastAccess: now, hits: 0, createdAt: now })
      reservation.commit()
      await index.putManifest({ digest, layerDigest: layer.digest, layerMediaType: layer.mediaType })
      return 'committed'
    } catch (err) {
      this.#o.log.error({ err: describe(err), layer: layer.digest }, 'cache commit failed; the layer was served but not cached')
      await store.removeTemp(fill.tempPath).catch(() => undefined)
      // Undo through the space manager so the byte accounting stays exact.
      if (index.blob(layer.digest)) await this.space?.evict(layer.digest).catch(() => undefined)
      else await store.remove(layer.digest).catch(() => undefined)
      return 'commit-error'
    }
  }

  /** Removes one cached package by manifest or layer digest; false if it was not cached. */
  async remove(digest: string): Promise<boolean> {
    if (!this.space || !this.#o.index) return false
    const layerDigest = this.#o.index.manifest(digest)?.layerDigest ?? digest
    if (!this.#o.index.blob(layerDigest)) {
      await this.#o.index.removeManifest(digest)
      return false
    }
    this.#hot.delete(layerDigest)
    return this.space.evict(layerDigest)
  }

  /**
   * The whole package for `digest` if it is cached and in memory, counted as a hit; otherwise
   * undefined (the caller takes the full path). Synchronous: it touches no disk and no registry.
   */
  memoryHit(digest: string): Buffer | undefined {
    if (!this.space || this.#o.disableCache) return undefined
    const layerDigest = this.#o.index?.manifest(digest)?.layerDigest
    if (!layerDigest || !this.#o.index?.blob(layerDigest)) return undefined
    const hot = this.#hot.get(layerDigest)
    if (hot) this.#o.index.touch(layerDigest)
    return hot
  }

  /** Resolves when every running fill has committed or cleaned up (tests, shutdown). */
  async settled(): Promise<void> {
    while (this.#running.size > 0) await Promise.allSettled([...this.#running])
  }

  /** Aborts running fills (shutdown) and waits for them to settle. */
  async close(): Promise<void> {
    this.#aborter.abort(new UpstreamError('the proxy is shutting down'))
    await Promise.allSettled([...this.#fills.values()])
    await Promise.allSettled([...this.#running])
  }
}

/** A log-safe description of an error: class, code and our own message only. */
export function describe(err: unknown): { type: string; code?: string; message: string } {
  if (err instanceof ProxyError) return { type: err.name, code: err.code, message: err.message }
  if (err instanceof Error) {
    const code = (err as NodeJS.ErrnoException).code
    return { type: err.name, ...(code ? { code } : {}), message: code ?? err.name }
  }
  return { type: 'unknown', message: 'unknown error' }
}

import { ManifestError, TimeoutError } from '../../errors.js'
import type { RegistrySource } from '../credentials/source.js'
import type { Lease, Reservation } from './cache/blob-cache.js'
import type { BlobStore } from './cache/blob-store.js'
import type { CacheParts } from './cache/open-cache.js'
import { DownloadSlots, type DownloadSlotsOptions } from './download-slots.js'
import { Fill } from './fill.js'
import { runFromSources } from './fill-sources.js'
import { describe, type PackageLogger } from './log.js'
import type { LayerRef } from './manifest.js'
import type { PeerPort, PeerRequest } from './peer-port.js'
import type { RegistryClient } from './registry/registry-client.js'

export type { CacheParts } from './cache/open-cache.js'

/** How a download ended: cached, failed upstream or on verification, served uncached. */
export type FillOutcome = 'committed' | 'failed' | 'disk-error' | 'commit-error' | 'uncached'

/** Upper bound for one download, whoever is waiting for it. */
const DEADLINE_MS = 30 * 60_000

export interface DownloadsOptions {
  client: RegistryClient
  log: PackageLogger
  slots?: Partial<DownloadSlotsOptions>
  onFillDone?: (outcome: FillOutcome, seconds: number, error: Error | undefined) => void
  onResume?: (kind: 'fill' | 'pass-through') => void
  /** Other replicas, asked before (the layer's owner) and after (any holder) the registry. */
  peers?: PeerPort | undefined
}

/** A download a request may read: whether it started it, and whether it is cached. */
export interface Joined {
  fill: Fill
  started: boolean
  /** Settles once the download has committed (or been discarded). */
  finished: Promise<void>
  /** Whether the download asks peers (a client started it), or the registry alone. */
  asksPeers: boolean
}

/**
 * The layer downloads running now, one per layer digest however many clients want it.
 *
 * A download is a cache fill (temp file, verified, committed through the {@link BlobCache})
 * when space can be reserved, otherwise an uncached memory-window download; both are
 * {@link Fill}s, joined the same way, so N clients of a layer that cannot be cached still make
 * one registry download. Each holds a download slot from before its first byte until its end.
 */
export class Downloads {
  readonly #o: DownloadsOptions
  /** Layer digest -> the download and the size its manifest gave (known before the Fill exists). */
  readonly #flights = new Map<string, { fill: Promise<Fill>; size: number; asksPeers: boolean; leavePeers: AbortController }>()
  readonly #finished = new WeakMap<Fill, Promise<void>>()
  readonly #running = new Set<Promise<void>>()
  #fills = 0
  /** Downloads whose file is still open by readers (their space is still held). */
  readonly #open = new Set<Promise<void>>()
  /** Downloads from the registry (and those about to go there). */
  readonly slots: DownloadSlots
  /** Cache fills of a client's request while they ask a peer, before any registry request. */
  readonly peerSlots: DownloadSlots
  readonly #aborter = new AbortController()

  constructor(options: DownloadsOptions) {
    this.#o = options
    this.slots = new DownloadSlots(options.slots, this.#aborter.signal)
    this.peerSlots = new DownloadSlots(options.slots, this.#aborter.signal)
  }

  /** Downloads running or cleaning up, cached or not. */
  get active(): number {
    return this.#running.size
  }

  /** Of those, the cache fills (a temp file, to be committed): the fills-in-flight gauge. */
  get fills(): number {
    return this.#fills
  }

  /** The size of the layer being downloaded under `digest` now (its manifest's word), if any. */
  sizeOf(digest: string): number | undefined {
    return this.#flights.get(digest)?.size
  }

  /**
   * The download of `layer` a reader of bytes from `start` can follow: the running one, or a
   * new one. Registered synchronously, before any await, so every concurrent request joins the
   * same download (and its place in the queue). Throws a BusyError when the queue is full.
   * `request` says who asked first (a client, or a peer: whose download never asks peers);
   * `fresh` (a client whose joined download failed without asking peers) first waits for a
   * running download that does not ask peers to start, and starts one that does if it failed.
   */
  async join(
    source: RegistrySource,
    name: string,
    manifestDigest: string,
    layer: LayerRef,
    start: number,
    parts: CacheParts | undefined,
    request?: PeerRequest,
    fresh = false,
  ): Promise<Joined> {
    let running = this.#flights.get(layer.digest)
    if (fresh && running && !running.asksPeers) {
      // Never two downloads of one layer at once (both would commit): wait for that one to
      // start. Failed, it has left the map and a new one starts; started, it serves.
      await running.fill.then((f) => f.started).catch(() => undefined)
      running = this.#flights.get(layer.digest)
    }
    if (running) {
      // A peer request that closes a loop (from this very process under another name, or from
      // the peer this download is asking): waiting on each other would end only at a peer
      // bound, so the download leaves its peer for the registry. Any other peer request takes
      // us for the owner rightly (owners only climb) and follows the download as it is.
      if (request?.from === 'peer' && this.#o.peers?.loops?.(request, layer.digest) === true)
        running.leavePeers.abort(new Error('a peer request closed a loop'))
      const fill = await running.fill.catch(() => undefined)
      if (fill && fill.layer.size !== layer.size) {
        throw new ManifestError(`the manifest says layer ${layer.digest} has ${layer.size} bytes; its download has ${fill.layer.size}`)
      }
      if (fill?.canServe(start)) return { fill, started: false, finished: this.#finished.get(fill) ?? Promise.resolve(), asksPeers: running.asksPeers }
    }
    const asksPeers = request?.from === 'client'
    // A download that may ask a peer first waits on it in a slot of the peer pool, and takes a
    // registry slot only when it goes to the registry (see #registrySlot). The peer requests
    // this replica serves use registry slots alone: a replica full of fills waiting on another
    // never holds the slots that other one's requests need here, so two cannot wait on each
    // other until their peer timeouts.
    const viaPeers = asksPeers && this.#o.peers !== undefined && parts !== undefined
    const leavePeers = new AbortController()
    let ticket = (viaPeers ? this.peerSlots : this.slots).enter()
    const forget = (): void => {
      if (this.#flights.get(layer.digest)?.fill === flight) this.#flights.delete(layer.digest)
    }
    const releaseSlot = (): void => ticket.release()
    let registrySlot: Promise<void> | undefined
    const toRegistry = (): Promise<void> => {
      if (!viaPeers) return Promise.resolve()
      return (registrySlot ??= (async () => {
        ticket.release()
        ticket = this.slots.enter()
        await ticket.ready
      })())
    }
    const flight = (async () => {
      try {
        await ticket.ready
      } catch (err) {
        forget()
        throw err
      }
      // Space is reserved only once the download may start: one waiting in line holds no bytes.
      const reservation = parts?.cache.reserve(layer.size)
      let temp
      try {
        if (reservation) {
          await reservation.ready
          temp = await parts?.store.createTemp()
        }
      } catch (err) {
        reservation?.release()
        this.#o.log.warn({ err: describe(err), layer: layer.digest }, 'cannot start a cache fill; serving uncached')
        return this.#run({ source, name, manifestDigest, layer, request }, parts, undefined, undefined, releaseSlot, forget, toRegistry, leavePeers.signal)
      }
      return this.#run({ source, name, manifestDigest, layer, request }, parts, reservation, temp, releaseSlot, forget, toRegistry, leavePeers.signal)
    })()
    this.#flights.set(layer.digest, { fill: flight, size: layer.size, asksPeers, leavePeers })
    const fill = await flight
    return { fill, started: true, finished: this.#finished.get(fill) ?? Promise.resolve(), asksPeers }
  }

  #run(
    what: { source: RegistrySource; name: string; manifestDigest: string; layer: LayerRef; request: PeerRequest | undefined },
    parts: CacheParts | undefined,
    reservation: Reservation | undefined,
    temp: Awaited<ReturnType<BlobStore['createTemp']>> | undefined,
    releaseSlot: () => void,
    forget: () => void,
    toRegistry: () => Promise<void>,
    leavePeers: AbortSignal,
  ): Fill {
    const { source, name, manifestDigest, layer } = what
    const fill = new Fill(layer, temp)
    const kind = temp ? 'fill' : 'pass-through'
    if (temp) this.#fills++
    // A failed download leaves the map the moment it fails, so a request arriving during its
    // clean-up starts a new one instead of inheriting the failure.
    fill.on('progress', () => {
      if (fill.state === 'failed') forget()
    })
    fill.on('resume', (err: unknown) => {
      this.#o.onResume?.(kind)
      this.#o.log.warn({ err: describe(err), layer: layer.digest, offset: fill.written }, 'registry connection broke mid-layer; resuming with a Range request')
    })
    fill.once('degraded', (err: unknown) => {
      // No new reader may join a fill that cannot be cached; its current readers still finish.
      forget()
      this.#o.log.error({ err: describe(err), layer: layer.digest }, 'disk error during a cache fill; serving current clients from memory, caching nothing')
    })
    let lease: Lease | undefined
    // The reservation (or, once committed, the entry's lease) is held until the temp file is
    // closed: readers of this fill read that file, so its bytes are on disk until then.
    const closed = fill.closed.then(() => {
      if (lease) lease.release()
      else reservation?.release()
      this.#open.delete(closed)
    })
    this.#open.add(closed)
    // Past the deadline the download is a 504 (a TimeoutError as the abort reason), not an
    // anonymous abort that would surface as a bare 500.
    const deadline = new AbortController()
    const timer = setTimeout(() => deadline.abort(new TimeoutError('fill', DEADLINE_MS)), DEADLINE_MS)
    timer.unref()
    const signal = AbortSignal.any([deadline.signal, this.#aborter.signal])
    const began = process.hrtime.bigint()
    const registry = async (offset: number): ReturnType<RegistryClient['openBlob']> => {
      await toRegistry()
      return this.#o.client.openBlob(source, name, layer.digest, { offset, signal })
    }
    const settled = runFromSources(fill, { registry, peers: this.#o.peers, request: what.request, signal, peerSignal: AbortSignal.any([signal, leavePeers]) })
      .then(async () => {
        const result = await this.#finish(fill, manifestDigest, parts, reservation)
        lease = result.lease
        return result.outcome
      })
      .then((outcome) => this.#o.onFillDone?.(outcome, Number(process.hrtime.bigint() - began) / 1e9, fill.error ?? fill.diskError))
      .finally(() => {
        if (temp) this.#fills--
        clearTimeout(timer)
        releaseSlot()
        forget()
        fill.release()
        this.#running.delete(settled)
      })
    this.#running.add(settled)
    this.#finished.set(
      fill,
      settled.catch(() => undefined),
    )
    return fill
  }

  /** Commits a verified fill (fsync, rename, rows) or discards a failed one. */
  async #finish(
    fill: Fill,
    manifestDigest: string,
    parts: CacheParts | undefined,
    reservation: Reservation | undefined,
  ): Promise<{ outcome: FillOutcome; lease?: Lease }> {
    const { layer } = fill
    const temp = fill.temp
    if (!parts || !reservation || !temp) return { outcome: fill.state === 'verified' ? 'uncached' : 'failed' }
    if (fill.state !== 'verified' || fill.diskError) {
      await parts.store.removeTemp(temp.path).catch(() => undefined)
      if (fill.diskError) return { outcome: 'disk-error' }
      this.#o.log.warn({ err: describe(fill.error), layer: layer.digest }, 'cache fill failed; nothing cached')
      return { outcome: 'failed' }
    }
    let lease: Lease
    try {
      lease = await parts.cache.commit(reservation, temp, layer.digest)
    } catch (err) {
      this.#o.log.error({ err: describe(err), layer: layer.digest }, 'cache commit failed; the layer was served but not cached')
      await parts.store.removeTemp(temp.path).catch(() => undefined)
      return { outcome: 'commit-error' }
    }
    try {
      await parts.index.putManifest({ digest: manifestDigest, layerDigest: layer.digest, layerMediaType: layer.mediaType })
    } catch (err) {
      // The layer is cached; only the shortcut from this manifest is missing (one registry request).
      this.#o.log.warn({ err: describe(err), layer: layer.digest }, 'cache index write failed; the manifest will be looked up again')
    }
    return { outcome: 'committed', lease }
  }

  /**
   * Resolves when every download has committed or cleaned up and its last reader has closed,
   * so its space is returned (tests, shutdown).
   */
  async settled(): Promise<void> {
    while (this.#running.size > 0 || this.#open.size > 0) await Promise.allSettled([...this.#running, ...this.#open])
  }

  /** Aborts running downloads (shutdown) and waits for them to settle. */
  async close(reason: Error): Promise<void> {
    this.#aborter.abort(reason)
    await Promise.allSettled([...this.#flights.values()].map((f) => f.fill))
    await this.settled()
  }
}

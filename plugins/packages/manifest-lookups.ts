import { BusyError, ManifestError, NotFoundError } from '../../errors.js'
import type { RegistrySource } from '../credentials/source.js'
import { DownloadSlots, type DownloadSlotsOptions } from './download-slots.js'
import { parseManifest, verifyDigest, type LayerRef } from './manifest.js'
import type { ManifestBytes, PeerPort, PeerRequest } from './peer-port.js'
import type { RegistryClient } from './registry/registry-client.js'

/** A manifest lookup shared by every concurrent request for one digest. */
interface Lookup {
  pending: Promise<LayerRef>
  /** Whether it asks peers when the registry fails: only work a client started does. */
  asksPeers: boolean
}

/**
 * Whether a client that joined shared work which does not ask peers (a request marked as from
 * a peer started it) tries again with work that does: when it failed, not with a 404 (the
 * registry's answer) or a refusal for lack of a slot.
 */
export function retriesWithPeers(peers: PeerPort | undefined, request: PeerRequest | undefined, asksPeers: boolean, err: unknown): boolean {
  return peers !== undefined && request?.from === 'client' && !asksPeers && !(err instanceof NotFoundError) && !(err instanceof BusyError)
}

export interface ManifestLookupsOptions {
  client: RegistryClient
  /** Asked for a manifest when the registry fails a client's request. */
  peers?: PeerPort | undefined
  /** Bounds on concurrent lookups and on those waiting for one. */
  slots?: Partial<DownloadSlotsOptions> | undefined
  /** Shutdown: ends waits for a slot and peer manifest requests. */
  signal: AbortSignal
}

/**
 * Manifest digest -> last layer, from the registry (or, when that fails, from a peer): one
 * lookup per concurrent (repository, name, digest), each holding one of a bounded set of
 * slots, so a herd of cold digests cannot open unbounded registry connections.
 */
export class ManifestLookups {
  readonly #resolving = new Map<string, Lookup>()
  readonly #slots: DownloadSlots
  readonly #o: ManifestLookupsOptions

  constructor(options: ManifestLookupsOptions) {
    this.#o = options
    this.#slots = new DownloadSlots(options.slots, options.signal, 'manifest')
  }

  /** Lookups holding a slot, and those waiting for one. */
  get counts(): { running: number; queued: number } {
    return { running: this.#slots.running, queued: this.#slots.queued }
  }

  /** The last layer of the image `digest` names (through its linux/amd64 entry for an index). */
  async find(source: RegistrySource, name: string, digest: string, request: PeerRequest | undefined): Promise<LayerRef> {
    const key = `${source.repository}\n${name}\n${digest}`
    const shared = this.#lookup(key, source, name, digest, request, false)
    try {
      return await shared.pending
    } catch (err) {
      // A client that joined a lookup started by a request marked as from a peer (which anyone
      // may send, and which never asks peers) gets the peer fallback all the same.
      if (!retriesWithPeers(this.#o.peers, request, shared.asksPeers, err)) throw err
      return await this.#lookup(key, source, name, digest, request, true).pending
    }
  }

  /**
   * The shared lookup of `digest`: the running one, or a new one. `fresh` starts a new one in
   * place of a running one that does not ask peers, for a client that needs them.
   */
  #lookup(key: string, source: RegistrySource, name: string, digest: string, request: PeerRequest | undefined, fresh: boolean): Lookup {
    const running = this.#resolving.get(key)
    if (running && !(fresh && !running.asksPeers)) return running
    // A full queue refuses here (503), before anything is registered or sent upstream.
    const ticket = this.#slots.enter()
    const entry: Lookup = {
      asksPeers: request?.from === 'client',
      pending: ticket.ready
        .then(() => this.#fetchLayerRef(source, name, digest, request))
        .finally(() => {
          ticket.release()
          if (this.#resolving.get(key) === entry) this.#resolving.delete(key)
        }),
    }
    this.#resolving.set(key, entry)
    return entry
  }

  async #fetchLayerRef(source: RegistrySource, name: string, digest: string, request: PeerRequest | undefined): Promise<LayerRef> {
    const first = await this.#manifest(source, name, digest, request)
    const parsed = parseManifest(first.body, first.mediaType)
    // Peers are told only of manifests that verified and parsed as they are labelled.
    this.#o.peers?.remember(digest, first)
    if (parsed.kind === 'image') return parsed.layer
    const second = await this.#manifest(source, name, parsed.platformDigest, request)
    const image = parseManifest(second.body, second.mediaType)
    if (image.kind !== 'image') throw new ManifestError('linux/amd64 entry of the index is itself an index')
    this.#o.peers?.remember(parsed.platformDigest, second)
    return image.layer
  }

  /**
   * A manifest verified against `reference`: from the registry, or, when the registry fails
   * (anything but its 404) for a client's request, from a peer, verified here again (and parsed by
   * {@link #fetchLayerRef}, which then tells peers of it, so they can serve it while the
   * registry is down).
   */
  async #manifest(source: RegistrySource, name: string, reference: string, request: PeerRequest | undefined): Promise<ManifestBytes> {
    const peers = this.#o.peers
    try {
      const m = await this.#o.client.fetchManifest(source, name, reference)
      verifyDigest('manifest', m.body, reference)
      return m
    } catch (err) {
      if (!peers || request?.from !== 'client' || err instanceof NotFoundError) throw err
      // Bounded by the peer client (first byte, idle, in all), and ended by shutdown: a peer
      // that trickles must not hold this lookup, its slot and everyone joined to it.
      const m = await peers.manifest(reference, this.#o.signal)
      if (!m) throw err
      verifyDigest('manifest', m.body, reference)
      return m
    }
  }
}

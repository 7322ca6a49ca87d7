import { randomUUID } from 'node:crypto'
import type { TempFile } from '../packages/cache/blob-store.js'
import type { PackageLogger } from '../packages/log.js'
import { parseManifest, type LayerRef } from '../packages/manifest.js'
import type { ManifestBytes, PeerPort, PeerRequest } from '../packages/peer-port.js'
import { ManifestMemo } from './manifest-memo.js'
import type { Membership } from './membership.js'
import type { PeerClient, PeerResult } from './peer-client.js'
import { ownerOf } from './rendezvous.js'

export interface PeersOptions {
  membership: Membership
  client: PeerClient
  log: PackageLogger
  memo?: ManifestMemo
  /** Told of every exchange with a peer, and of the bytes of each layer taken from one. */
  onResult?: (result: PeerResult) => void
  onFillBytes?: (bytes: number) => void
}

/** Results after which a peer is left out of owner choice for a while: it is down, or it lies. */
const DROPPED = new Set<PeerResult>(['unreachable', 'timeout', 'mismatch'])

/**
 * Peer fill across replicas ({@link PeerPort}): each layer digest has one owner among the live
 * members by rendezvous hashing; a replica that misses a layer it does not own asks the owner,
 * which fills once from the registry and streams. When the registry fails, the others are
 * asked for what they hold. Every answer is verified by the {@link PeerClient}; a peer that
 * fails is dropped from the request at once (and from owner choice for a while).
 */
export class Peers implements PeerPort {
  readonly membership: Membership
  readonly memo: ManifestMemo
  /** This process, told apart from another one under any name (sent as `X-RPP-Instance`). */
  readonly instance = randomUUID()
  readonly #o: PeersOptions
  /** Layer digest -> the owner this replica is asking for it now. */
  readonly #asking = new Map<string, string>()

  constructor(o: PeersOptions) {
    this.#o = o
    this.membership = o.membership
    this.memo = o.memo ?? new ManifestMemo()
  }

  /** The owner of `layerDigest` among the live members (this replica included). */
  ownerOf(layerDigest: string): string | undefined {
    return ownerOf(this.membership.live(), layerDigest)
  }

  async fromOwner(request: PeerRequest, layer: LayerRef, temp: TempFile, signal: AbortSignal): Promise<boolean> {
    const owner = this.ownerOf(layer.digest)
    if (owner === undefined || owner === this.membership.self) return false
    this.#asking.set(layer.digest, owner)
    try {
      return await this.#layer(owner, request, 'fill', layer, temp, signal)
    } finally {
      if (this.#asking.get(layer.digest) === owner) this.#asking.delete(layer.digest)
    }
  }

  loops(request: PeerRequest, layerDigest: string): boolean {
    const via = request.via
    if (!via) return false
    if (via.instance === this.instance) return true
    return via.member !== undefined && this.#asking.get(layerDigest) === via.member
  }

  async fromAny(request: PeerRequest, layer: LayerRef, temp: TempFile, signal: AbortSignal): Promise<boolean> {
    for (const member of this.membership.others()) {
      if (signal.aborted) return false
      if (await this.#layer(member, request, 'cached', layer, temp, signal)) return true
    }
    return false
  }

  async manifest(digest: string, signal?: AbortSignal): Promise<ManifestBytes | undefined> {
    for (const member of this.membership.others()) {
      if (signal?.aborted) return undefined
      let { result, manifest } = await this.#o.client.manifest(member, digest, signal).catch(() => ({ result: 'error' as const, manifest: undefined }))
      // The digest proves the body, not the Content-Type it came with: a manifest that does not
      // parse as labelled (an image called an index) would fail the client, and the next peer
      // would never be asked. Such a peer lied; what is held for others is only what parsed.
      if (manifest && !parses(manifest)) {
        result = 'mismatch'
        manifest = undefined
      }
      this.#record(member, result, signal, { manifest: digest })
      if (manifest) {
        this.memo.put(digest, manifest)
        return manifest
      }
    }
    return undefined
  }

  remember(digest: string, manifest: ManifestBytes): void {
    this.memo.put(digest, manifest)
  }

  async #layer(member: string, request: PeerRequest, mode: 'fill' | 'cached', layer: LayerRef, temp: TempFile, signal: AbortSignal): Promise<boolean> {
    // Whatever goes wrong in the client is this peer failing: the core falls back, never throws.
    const via = { 'X-RPP-From': this.membership.self, 'X-RPP-Instance': this.instance }
    const result = await this.#o.client.layer(member, request, mode, layer, temp, signal, via).catch((): PeerResult => 'error')
    this.#record(member, result, signal, { layer: layer.digest, mode })
    if (result !== 'ok') return false
    this.#o.onFillBytes?.(layer.size)
    return true
  }

  #record(member: string, result: PeerResult, signal: AbortSignal | undefined, what: Record<string, string>): void {
    this.#o.onResult?.(result)
    if (result === 'ok' || result === 'not-found') return
    // Our own shutdown or deadline says nothing about the peer.
    if (signal?.aborted) return
    if (DROPPED.has(result)) this.membership.markDown(member)
    this.#o.log.warn({ peer: member, result, ...what }, 'peer failed; using the next source')
  }
}

/** Whether `m` reads as a manifest the package core can use (an image or an index). */
function parses(m: ManifestBytes): boolean {
  try {
    parseManifest(m.body, m.mediaType)
    return true
  } catch {
    return false
  }
}

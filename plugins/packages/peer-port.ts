import type { TempFile } from './cache/blob-store.js'
import type { LayerRef } from './manifest.js'

/**
 * How a package request reached this replica: from a client, or from another replica (the
 * `X-RPP-Peer` header). A peer request is never forwarded again; `cached` asks only for what
 * this replica holds (a replica whose registry failed looks for the layer among its peers).
 */
export interface PeerRequest {
  /** The `/package` query as the client sent it, forwarded as is to the owner. */
  digest: string
  repository?: string
  path?: string
  from: 'client' | 'peer' | 'cached'
  /**
   * Who sent a peer request, as it says (`X-RPP-From`, `X-RPP-Instance`): its member name and
   * its process's random id. Only used to tell a loop (see {@link PeerPort.loops}).
   */
  via?: { member?: string; instance?: string }
}

/**
 * How often a replica answering a peer request tells the requester it is still working on it
 * (`102 Processing`) while its own registry is slow; the requester allows a few of these gaps.
 */
export const PEER_WORKING_INTERVAL_MS = 1_000

/** A verified manifest's bytes, as a peer holds them. */
export interface ManifestBytes {
  body: Buffer
  mediaType: string
}

/**
 * What the package core needs of the other replicas (plugins/peers/ implements it; the core
 * never imports that folder). Every method writes or returns bytes only once they verified
 * against their digest: the core can treat a `true` as a finished, verified download.
 */
export interface PeerPort {
  /**
   * Before the registry: asks the replica that owns `layer.digest`, when that is another one.
   * True once `temp` holds the whole layer (bytes 0..size-1) and it hashed to its digest;
   * false at once when this replica owns the layer, and after any refusal, stall or mismatch.
   */
  fromOwner(request: PeerRequest, layer: LayerRef, temp: TempFile, signal: AbortSignal): Promise<boolean>
  /** After the registry failed: the other live replicas, from their caches only. Same result. */
  fromAny(request: PeerRequest, layer: LayerRef, temp: TempFile, signal: AbortSignal): Promise<boolean>
  /** After the registry failed to give a manifest: a verified copy from a peer, or undefined. */
  manifest(digest: string, signal?: AbortSignal): Promise<ManifestBytes | undefined>
  /** Told of every manifest verified against its digest, so peers can ask for it later. */
  remember(digest: string, manifest: ManifestBytes): void
  /**
   * Whether the peer request `request` closes a loop for `layerDigest`: it comes from this very
   * process (under another name), or from the member this replica is asking for that layer
   * now. Waiting on each other would end only at a peer bound; the download here should leave
   * its peer for the registry instead.
   */
  loops?(request: PeerRequest, layerDigest: string): boolean
}

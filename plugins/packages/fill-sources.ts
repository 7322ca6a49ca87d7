import { NotFoundError } from '../../errors.js'
import type { Fill } from './fill.js'
import type { PeerPort, PeerRequest } from './peer-port.js'
import type { BlobResponse } from './registry/registry-client.js'
import { openLayer } from './resumable-download.js'

export interface FillSources {
  /** The registry: opens the layer from `offset` (a Range request when resuming). */
  registry: (offset: number) => Promise<BlobResponse>
  peers?: PeerPort | undefined
  /** The request that started the download; without one the registry alone is asked. */
  request?: PeerRequest | undefined
  signal: AbortSignal
  /** Ends the wait on the owner (and only that): default `signal`. */
  peerSignal?: AbortSignal
}

/**
 * Runs `fill` from the sources that may have the layer, in the contract's order: the replica
 * that owns the layer first (it fills once from the registry for everyone), then the registry,
 * then, if the registry failed before its first byte, any replica that holds the layer.
 *
 * A peer writes into the fill's temp file without moving the fill's `written` mark, so its
 * readers see nothing of those bytes until the peer's whole layer verified
 * ({@link Fill.adoptVerified}); a lying or stalled peer costs a client time, never a failed
 * download. The registry path streams as before: the registry's first answer is kept and
 * handed to {@link Fill.run}, which overwrites whatever a failed peer left in the file from
 * byte 0 and verifies as always.
 *
 * Only cache fills ask peers: an uncached (memory window) download has no file to hold a
 * peer's bytes until they verify. A request that came from a peer goes to the registry alone,
 * so a peer request is never forwarded again and no request loops between replicas.
 */
export async function runFromSources(fill: Fill, o: FillSources): Promise<void> {
  const temp = fill.temp
  const { peers, request, signal } = o
  if (!peers || !request || request.from !== 'client' || !temp) return fill.run(o.registry, signal)
  // The port promises a plain answer; a throw from it is a peer that failed, not a failed download.
  if (await peers.fromOwner(request, fill.layer, temp.handle, o.peerSignal ?? signal).catch(() => false)) return fill.adoptVerified()
  let first: BlobResponse
  try {
    first = await openLayer(o.registry, fill.layer.size)
  } catch (err) {
    // A 404 is the registry's answer, not its failure; a shutdown or deadline is ours.
    const failed = !(err instanceof NotFoundError) && !signal.aborted
    if (failed && (await peers.fromAny(request, fill.layer, temp.handle, signal).catch(() => false))) return fill.adoptVerified()
    return fill.run(() => Promise.reject(err instanceof Error ? err : new Error(String(err))), signal)
  }
  let taken = false
  return fill.run((offset) => {
    if (offset === 0 && !taken) {
      taken = true
      return Promise.resolve(first)
    }
    return o.registry(offset)
  }, signal)
}

import type { Plugin } from '@hapi/hapi'
import { BadRequestError, NotFoundError, toBoom } from '../../errors.js'
import { DIGEST } from '../packages/manifest.js'
import type { Peers } from './peers.js'
import type { PeerClient } from './peer-client.js'

export interface PeersPluginOptions {
  peers: Peers
  client: PeerClient
  /** The Kubernetes membership watch, started and stopped with the server. */
  watch?: { start(): void; stop(): Promise<void> }
}

/**
 * `GET /peers/manifests/{digest}`: a verified manifest this replica holds in memory, for a
 * peer that cannot reach the registry (it verifies the bytes again). Content-addressed, so
 * it reveals nothing a `/package` request for the digest would not.
 */
export const peersPlugin: Plugin<PeersPluginOptions> = {
  name: 'peers',
  register(server, o) {
    server.route({
      method: 'GET',
      path: '/peers/manifests/{digest}',
      handler: (request, h) => {
        const digest = String(request.params.digest)
        if (!DIGEST.test(digest)) throw toBoom(new BadRequestError('the digest must be sha256:<64 lowercase hex>'))
        const manifest = o.peers.memo.get(digest)
        if (!manifest) throw toBoom(new NotFoundError('this replica holds no such manifest'))
        return h.response(manifest.body).type(manifest.mediaType || 'application/octet-stream').header('Docker-Content-Digest', digest)
      },
    })
    server.ext('onPreStart', () => o.watch?.start())
    server.ext('onPostStop', async () => {
      await o.watch?.stop()
      o.client.close()
    })
  },
}

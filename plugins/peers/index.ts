import type { Plugin } from '@hapi/hapi'
import { BadRequestError, NotFoundError, toBoom } from '../../errors.js'
import { describe, type PackageLogger } from '../packages/log.js'
import { DIGEST } from '../packages/manifest.js'
import { ManifestFiles } from './manifest-files.js'
import type { Peers } from './peers.js'
import type { PeerClient } from './peer-client.js'

export interface PeersPluginOptions {
  peers: Peers
  client: PeerClient
  /** The Kubernetes membership watch, started and stopped with the server. */
  watch?: { start(): void; stop(): Promise<void> }
  /**
   * Where the manifests held for peers are kept across restarts (in the cache directory);
   * without it (`--disable-cache`) they are held in memory only.
   */
  memoDirectory?: string
  log: PackageLogger
}

/**
 * `GET /peers/manifests/{digest}`: a verified manifest this replica holds (in memory, and in
 * `memoDirectory` across restarts), for a peer that cannot reach the registry (it verifies the
 * bytes again). Content-addressed, so it reveals nothing a `/package` request for the digest
 * would not.
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
        return h
          .response(manifest.body)
          .type(manifest.mediaType || 'application/octet-stream')
          .header('Docker-Content-Digest', digest)
      },
    })
    server.ext('onPreStart', async () => {
      if (o.memoDirectory !== undefined) await loadMemo(o.peers, o.memoDirectory, o.log)
      o.watch?.start()
    })
    server.ext('onPostStop', async () => {
      await o.watch?.stop()
      o.client.close()
      // Writes already started finish, so a clean stop loses no manifest.
      await o.peers.memo.settled()
    })
  },
}

/**
 * Reads back the manifests kept before the restart, before the listener opens. A folder that
 * cannot be used (a read-only or full disk) leaves the memo in memory only: peer fill still
 * works, only a restart forgets.
 */
async function loadMemo(peers: Peers, dir: string, log: PackageLogger): Promise<void> {
  try {
    const loaded = await peers.memo.attach(new ManifestFiles(dir), (err) =>
      log.warn({ err: describe(err) }, 'peer manifest file write failed; that manifest is held in memory only'),
    )
    for (const digest of loaded.corrupt) log.warn({ digest }, 'peer manifest file did not match its digest; deleted')
    log.info({ manifests: loaded.manifests.length, corrupt: loaded.corrupt.length, dropped: loaded.dropped }, 'peer manifests read back')
  } catch (err) {
    log.warn({ err: describe(err), dir }, 'peer manifest folder unusable; manifests for peers are held in memory only')
  }
}

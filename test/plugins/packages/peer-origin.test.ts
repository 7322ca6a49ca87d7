/**
 * Shared work started by a request marked as from a peer (`X-RPP-Peer: 1`, which anyone may
 * send) never asks peers itself; a client that joined it must still get the peer fallback when
 * that work fails from the registry, not the registry's error (README, "Peer fill across
 * replicas"). One in-process proxy, a fake registry that fails slowly, and a fake replica that
 * holds the package.
 */
import { createServer, type Server } from 'node:http'
import type { Socket } from 'node:net'
import t, { type Test } from 'tap'
import { ownerOf } from '../../../plugins/peers/rendezvous.js'
import { DEFAULT_PREFIX, bytes, packageUrl, sha256, startHarness } from '../../fixtures/proxy-harness.js'
import type { FakeImage } from '../../fixtures/fake-registry.js'
import { freePort } from '../../fixtures/net.js'

const SELF = '127.0.0.1:1'

/** A replica that holds `image`: its manifests, and its layer for cached-only asks. */
async function holdingPeer(t: Test, image: () => FakeImage): Promise<{ address: string; asked: string[] }> {
  const port = await freePort()
  const asked: string[] = []
  const sockets = new Set<Socket>()
  const server: Server = createServer((req, res) => {
    const img = image()
    asked.push(`${String(req.headers['x-rpp-peer'])} ${req.url?.split('?')[0] ?? ''}`)
    if (req.url === `/peers/manifests/${img.manifestDigest}`) {
      res.writeHead(200, { 'Content-Type': img.mediaType, 'Content-Length': img.manifest.length }).end(img.manifest)
    } else if (req.url?.startsWith('/package?') && req.headers['x-rpp-peer'] === 'cached') {
      res.writeHead(200, { 'Content-Length': img.lastLayer.data.length }).end(img.lastLayer.data)
    } else {
      res.writeHead(404).end()
    }
  })
  server.on('connection', (s: Socket) => {
    sockets.add(s)
    s.once('close', () => sockets.delete(s))
  })
  await new Promise<void>((resolve) => server.listen(port, '127.0.0.1', resolve))
  t.teardown(async () => {
    for (const s of sockets) s.destroy()
    await new Promise<void>((resolve) => server.close(() => resolve()))
  })
  return { address: `127.0.0.1:${port}`, asked }
}

void t.test('a client joining a lookup a peer-marked request started gets the manifest from a peer when the registry fails', async (t) => {
  let image: FakeImage | undefined
  const peer = await holdingPeer(t, () => image as FakeImage)
  const h = await startHarness(t, { peers: { members: [SELF, peer.address], self: SELF, timeouts: { firstByteMs: 1000, idleMs: 1000 } } })
  image = h.registry.addImage(DEFAULT_PREFIX, [bytes(20_000, 3)])
  h.registry.faults = { manifestDelayMs: 300, manifestStatus: 500 }
  const url = packageUrl({ digest: image.manifestDigest })
  const marked = h.proxy.server.inject({ url, headers: { 'x-rpp-peer': '1' } })
  await new Promise((resolve) => setTimeout(resolve, 50))
  const client = await h.proxy.server.inject(url)
  t.equal((await marked).statusCode, 502, 'the marked request gets the registry error: it never asks peers')
  t.equal(client.statusCode, 200, 'the client that joined it got the package from the peer')
  t.equal(sha256(client.rawPayload), image.lastLayer.digest)
})

void t.test('a client joining a download a peer-marked request started gets the layer from a peer when the registry fails', async (t) => {
  let image: FakeImage | undefined
  const peer = await holdingPeer(t, () => image as FakeImage)
  const h = await startHarness(t, { peers: { members: [SELF, peer.address], self: SELF, timeouts: { firstByteMs: 1000, idleMs: 1000 } } })
  // This replica owns the layer: the client's retry goes to the registry, then to any holder.
  for (let seed = 1; ; seed++) {
    const data = bytes(20_000, seed)
    if (ownerOf([SELF, peer.address], sha256(data)) !== SELF) continue
    image = h.registry.addImage(DEFAULT_PREFIX, [data])
    break
  }
  h.registry.faults = { blobDelayMs: 300, blobStatus: 500 }
  const url = packageUrl({ digest: image.manifestDigest })
  const marked = h.proxy.server.inject({ url, headers: { 'x-rpp-peer': '1' } })
  await new Promise((resolve) => setTimeout(resolve, 100))
  const client = await h.proxy.server.inject(url)
  t.equal((await marked).statusCode, 502, 'the marked request gets the registry error')
  t.equal(client.statusCode, 200, 'the client that joined its download got the layer from the peer')
  t.equal(sha256(client.rawPayload), image.lastLayer.digest)
  t.ok(peer.asked.includes('cached /package'), 'asked the peer for what it holds')
})

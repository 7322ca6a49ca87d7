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

void t.test("two replicas whose download slots are all held by fills waiting on each other: no deadlock, one registry download per layer", async (t) => {
  const ports = [await freePort(), await freePort()]
  const members = ports.map((p) => `127.0.0.1:${p}`) as [string, string]
  const peerTimeouts = { firstByteMs: 1500, idleMs: 1500 }
  const downloads = { max: 2, maxQueued: 64, queueTimeoutMs: 10_000 }
  const a = await startHarness(t, { listenPort: ports[0], downloads, peers: { members, self: members[0], timeouts: peerTimeouts } })
  const b = await startHarness(t, { registry: a.registry, listenPort: ports[1], downloads, peers: { members, self: members[1], timeouts: peerTimeouts } })
  // A slow registry, so that every fill overlaps the others.
  a.registry.faults = { blobChunkSize: 8 * 1024, blobChunkDelayMs: 20 }
  const owned = (owner: string, n: number): FakeImage[] => {
    const out: FakeImage[] = []
    for (let seed = 1000 * (owner === members[0] ? 1 : 2); out.length < n; seed++) {
      const data = bytes(64 * 1024, seed)
      if (ownerOf(members, sha256(data)) === owner) out.push(a.registry.addImage(DEFAULT_PREFIX, [data]))
    }
    return out
  }
  // Each replica is asked for layers the other owns: more than its slots.
  const viaA = owned(members[1], 4)
  const viaB = owned(members[0], 4)
  const began = Date.now()
  const replies = await Promise.all([
    ...viaA.map(async (image) => ({ image, res: await a.proxy.server.inject(packageUrl({ digest: image.manifestDigest })) })),
    ...viaB.map(async (image) => ({ image, res: await b.proxy.server.inject(packageUrl({ digest: image.manifestDigest })) })),
  ])
  t.same(
    replies.filter(({ image, res }) => res.statusCode !== 200 || sha256(res.rawPayload) !== image.lastLayer.digest).map(({ res }) => res.statusCode),
    [],
    'every body is 200 and verified',
  )
  t.equal(a.registry.counts.blob, 8, 'one registry download per layer: no peer exchange timed out')
  t.ok(Date.now() - began < 6000, `in ${Date.now() - began} ms`)
})

void t.test('an owner whose registry is slower than --peer-timeout: it says it is working, so the requester waits for it, one download, and keeps it as owner', async (t) => {
  const ports = [await freePort(), await freePort()]
  const members = ports.map((p) => `127.0.0.1:${p}`) as [string, string]
  const peerTimeouts = { firstByteMs: 500, idleMs: 500 }
  const a = await startHarness(t, { listenPort: ports[0], peers: { members, self: members[0], timeouts: peerTimeouts } })
  await startHarness(t, { registry: a.registry, listenPort: ports[1], peers: { members, self: members[1], timeouts: peerTimeouts } })
  const owned = (n: number): FakeImage[] => {
    const out: FakeImage[] = []
    for (let seed = 3000; out.length < n; seed++) {
      const data = bytes(64 * 1024, seed)
      if (ownerOf(members, sha256(data)) === members[1]) out.push(a.registry.addImage(DEFAULT_PREFIX, [data]))
    }
    return out
  }
  const [first, second] = owned(2) as [FakeImage, FakeImage]
  // The registry answers a layer after 1.2 s: more than the requester's first-byte bound.
  a.registry.faults = { blobDelayMs: 1200 }
  const res = await a.proxy.server.inject(packageUrl({ digest: first.manifestDigest }))
  t.equal(res.statusCode, 200)
  t.equal(sha256(res.rawPayload), first.lastLayer.digest)
  t.equal(a.registry.counts.blob, 1, 'one registry download: the requester waited for the owner')
  const metrics = await a.proxy.metrics.registry.getSingleMetricAsString('registry_packages_proxy_peer_requests_total')
  t.match(metrics, /result="ok"} 1/, 'the layer came from the owner')
  t.match(metrics, /result="timeout"} 0/)
  a.registry.faults = {}
  a.registry.resetCounts()
  const next = await a.proxy.server.inject(packageUrl({ digest: second.manifestDigest }))
  t.equal(next.statusCode, 200)
  t.match(await a.proxy.metrics.registry.getSingleMetricAsString('registry_packages_proxy_peer_requests_total'), /result="ok"} 2/, 'the owner was not marked down: asked again')
})

void t.test('a peer request for a layer whose download here waits on a peer: the download goes to the registry at once, no wait on each other', async (t) => {
  // A peer that never answers: before, both requests waited for its first-byte bound.
  const port = await freePort()
  const sockets = new Set<Socket>()
  const silent = createServer(() => undefined)
  silent.on('connection', (s: Socket) => {
    sockets.add(s)
    s.once('close', () => sockets.delete(s))
  })
  await new Promise<void>((resolve) => silent.listen(port, '127.0.0.1', resolve))
  t.teardown(async () => {
    for (const s of sockets) s.destroy()
    await new Promise<void>((resolve) => silent.close(() => resolve()))
  })
  const members = [SELF, `127.0.0.1:${port}`]
  const h = await startHarness(t, { peers: { members, self: SELF, timeouts: { firstByteMs: 3000, idleMs: 3000 } } })
  let image: FakeImage | undefined
  for (let seed = 5000; !image; seed++) {
    const data = bytes(32 * 1024, seed)
    if (ownerOf(members, sha256(data)) === members[1]) image = h.registry.addImage(DEFAULT_PREFIX, [data])
  }
  const url = packageUrl({ digest: image.manifestDigest })
  const began = Date.now()
  const client = h.proxy.server.inject(url)
  await new Promise((resolve) => setTimeout(resolve, 200))
  const fromPeer = await h.proxy.server.inject({ url, headers: { 'x-rpp-peer': '1' } })
  t.equal(fromPeer.statusCode, 200)
  t.equal((await client).statusCode, 200)
  t.ok(Date.now() - began < 2000, `both served in ${Date.now() - began} ms, not after the 3 s bound`)
  t.equal(h.registry.counts.blob, 1, 'one download')
  t.match(await h.proxy.metrics.registry.getSingleMetricAsString('registry_packages_proxy_peer_requests_total'), /result="timeout"} 0/)
})

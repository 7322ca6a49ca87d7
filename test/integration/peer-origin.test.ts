/**
 * Shared work started by a request marked as from a peer (`X-RPP-Peer: 1`, which anyone may
 * send) never asks peers itself; a client that joined it must still get the peer fallback when
 * that work fails from the registry, not the registry's error (README, "Peer fill across
 * replicas"). One in-process proxy, a fake registry that fails slowly, and a fake replica that
 * holds the package.
 */
import { createServer, type Server } from 'node:http'
import { listenUntilTeardown } from '../fixtures/listen.js'
import t, { type Test } from 'tap'
import { ownerOf } from '../../plugins/peers/rendezvous.js'
import { DEFAULT_PREFIX, bytes, fetchRaw, packageUrl, sha256, startHarness } from '../fixtures/proxy-harness.js'
import type { FakeImage } from '../fixtures/fake-registry.js'
import { freePort } from '../fixtures/net.js'

const SELF = '127.0.0.1:1'

/** A replica that holds `image`: its manifests, and its layer for cached-only asks. */
async function holdingPeer(t: Test, image: () => FakeImage): Promise<{ address: string; asked: string[] }> {
  const port = await freePort()
  const asked: string[] = []
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
  await listenUntilTeardown(t, server, port)
  return { address: `127.0.0.1:${port}`, asked }
}

void t.test('a client joining a lookup a peer-marked request started gets the manifest from a peer when the registry fails', async (t) => {
  const held: { image?: FakeImage } = {}
  const peer = await holdingPeer(t, () => held.image as FakeImage)
  const h = await startHarness(t, { peers: { members: [SELF, peer.address], self: SELF, timeouts: { firstByteMs: 1000, idleMs: 1000 } } })
  const image = (held.image = h.registry.addImage(DEFAULT_PREFIX, [bytes(20_000, 3)]))
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

void t.test('two replicas whose download slots are all held by fills waiting on each other: no deadlock, one registry download per layer', async (t) => {
  const ports: [number, number] = [await freePort(), await freePort()]
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

void t.test(
  'an owner whose registry is slower than --peer-timeout: it says it is working, so the requester waits for it, one download, and keeps it as owner',
  async (t) => {
    const ports: [number, number] = [await freePort(), await freePort()]
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
    t.match(
      await a.proxy.metrics.registry.getSingleMetricAsString('registry_packages_proxy_peer_requests_total'),
      /result="ok"} 2/,
      'the owner was not marked down: asked again',
    )
  },
)

void t.test('a peer request from the very peer a download here waits on: the download goes to the registry at once, no wait on each other', async (t) => {
  // A peer that never answers: before, both requests waited for its first-byte bound.
  const port = await freePort()
  const silent = createServer(() => undefined)
  await listenUntilTeardown(t, silent, port)
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
  // A peer request from another replica (it takes us for the owner, rightly: owners climb) is
  // served by the download as it is, which still waits on its peer.
  const other = h.proxy.server.inject({ url, headers: { 'x-rpp-peer': '1', 'x-rpp-from': '127.0.0.1:9' } })
  await new Promise((resolve) => setTimeout(resolve, 300))
  t.equal(h.registry.counts.blob, 0, 'a peer request from a third replica leaves the download waiting on its peer')
  // The peer the download waits on asks us: a loop. The registry it is, for both.
  const fromPeer = await h.proxy.server.inject({ url, headers: { 'x-rpp-peer': '1', 'x-rpp-from': members[1] } })
  t.equal((await other).statusCode, 200)
  t.equal(fromPeer.statusCode, 200)
  t.equal((await client).statusCode, 200)
  t.ok(Date.now() - began < 2000, `both served in ${Date.now() - began} ms, not after the 3 s bound`)
  t.equal(h.registry.counts.blob, 1, 'one download')
  t.match(await h.proxy.metrics.registry.getSingleMetricAsString('registry_packages_proxy_peer_requests_total'), /result="timeout"} 0/)
})

void t.test(
  "a peer that sends a layer steadily but slowly: the client, who sees nothing until it verifies, is served by the registry before the proxy's socket idle timeout cuts it",
  async (t) => {
    const port = await freePort()
    // 2 KiB every 100 ms (20 KiB/s): never idle, 13 s for the layer.
    const slow = createServer((_req, res) => {
      res.writeHead(200, { 'Content-Length': String(256 * 1024) })
      const timer = setInterval(() => res.write(Buffer.alloc(2048)), 100)
      res.once('close', () => clearInterval(timer))
    })
    await listenUntilTeardown(t, slow, port)
    const members = [SELF, `127.0.0.1:${port}`]
    const h = await startHarness(t, { listenPort: 0, socketIdleTimeoutMs: 2500, peers: { members, self: SELF, timeouts: { firstByteMs: 500, idleMs: 500 } } })
    let image: FakeImage | undefined
    for (let seed = 7000; !image; seed++) {
      const data = bytes(256 * 1024, seed)
      if (ownerOf(members, sha256(data)) === members[1]) image = h.registry.addImage(DEFAULT_PREFIX, [data])
    }
    const address = h.proxy.server.info.port
    const res = await fetchRaw(`http://127.0.0.1:${address}${packageUrl({ digest: image.manifestDigest })}`)
    t.equal(res.status, 200)
    t.ok(res.complete, 'the response was not cut')
    t.equal(sha256(res.body), image.lastLayer.digest)
    t.equal(h.registry.counts.blob, 1, 'from the registry, after the peer ran past its deadline')
  },
)

void t.test(
  'a peer that trickles a manifest while the registry fails: the lookup ends within the peer bounds, and the digest works once the registry is back',
  async (t) => {
    const port = await freePort()
    const trickling = createServer((_req, res) => {
      res.writeHead(200, { 'Content-Type': 'application/vnd.oci.image.manifest.v1+json', 'Content-Length': '4096' })
      const timer = setInterval(() => res.write('{'), 50)
      res.once('close', () => clearInterval(timer))
    })
    await listenUntilTeardown(t, trickling, port)
    const h = await startHarness(t, { peers: { members: [SELF, `127.0.0.1:${port}`], self: SELF, timeouts: { firstByteMs: 300, idleMs: 300 } } })
    const image = h.registry.addImage(DEFAULT_PREFIX, [bytes(8 * 1024, 9)])
    const url = packageUrl({ digest: image.manifestDigest })
    h.registry.faults = { manifestStatus: 500 }
    const began = Date.now()
    const failed = await Promise.race([h.proxy.server.inject(url), new Promise<'hung'>((resolve) => setTimeout(() => resolve('hung'), 5000))])
    t.not(failed, 'hung', 'the lookup ended')
    t.equal(failed === 'hung' ? 0 : failed.statusCode, 502, 'the registry error, after the peer failed')
    t.ok(Date.now() - began < 3000, `in ${Date.now() - began} ms`)
    h.registry.faults = {}
    const ok = await Promise.race([h.proxy.server.inject(url), new Promise<'hung'>((resolve) => setTimeout(() => resolve('hung'), 5000))])
    t.equal(ok === 'hung' ? 0 : ok.statusCode, 200, 'the registry recovered: the digest is not stuck')
    t.equal(h.proxy.packages.service.lookups.running, 0, 'no lookup slot held')
  },
)

void t.test('a replica that asks itself under another name (a list it could not find itself in) does not wait on itself', async (t) => {
  const port = await freePort()
  const alias = `127.0.0.1:${port}`
  const members = [SELF, alias]
  const h = await startHarness(t, { listenPort: port, peers: { members, self: SELF, timeouts: { firstByteMs: 1000, idleMs: 1000 } } })
  let image: FakeImage | undefined
  for (let seed = 9000; !image; seed++) {
    const data = bytes(32 * 1024, seed)
    if (ownerOf(members, sha256(data)) === alias) image = h.registry.addImage(DEFAULT_PREFIX, [data])
  }
  const began = Date.now()
  const res = await Promise.race([
    h.proxy.server.inject(packageUrl({ digest: image.manifestDigest })),
    new Promise<'hung'>((resolve) => setTimeout(() => resolve('hung'), 5000)),
  ])
  t.equal(res === 'hung' ? 0 : res.statusCode, 200)
  t.ok(Date.now() - began < 1000, `served in ${Date.now() - began} ms`)
  t.equal(h.registry.counts.blob, 1, 'one download')
})

/**
 * Peer fill across replicas (README, "Peer fill across replicas") on real binaries on
 * loopback: three replicas that name each other with `--peers` share one registry download
 * per layer, serve what their peers hold while the registry is down, and take nothing
 * unverified from a peer that lies or stalls.
 */
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http'
import { listenUntilTeardown } from '../fixtures/listen.js'
import { existsSync } from 'node:fs'
import { join } from 'node:path'
import t, { type Test } from 'tap'
import { ownerOf } from '../../plugins/peers/rendezvous.js'
import { FakeRegistry, type FakeImage } from '../fixtures/fake-registry.js'
import { freePort } from '../fixtures/net.js'
import { bytes, fetchRaw, packageUrl, sha256 } from '../fixtures/proxy-harness.js'
import { startProxyProcess, type ProxyProcess } from '../fixtures/proxy-process.js'

const MiB = 1024 * 1024

/** Starts replicas on ports fixed in advance, each listing every member (itself included). */
async function replicas(t: Test, registry: FakeRegistry, ports: number[], members: string[], extra: string[] = []): Promise<ProxyProcess[]> {
  return Promise.all(
    ports.map((port) =>
      startProxyProcess(t, {
        registry,
        port,
        cacheDirectory: join(t.testdirName, `cache-${port}`),
        args: [`--peers=${members.join(',')}`, ...extra],
      }),
    ),
  )
}

/** The image's package through `proxy`, with its body checked against the layer digest. */
async function get(proxy: ProxyProcess, image: FakeImage, headers: Record<string, string> = {}): Promise<{ status: number; verified: boolean; cache: string }> {
  const res = await fetchRaw(`${proxy.base}${packageUrl({ digest: image.manifestDigest, path: 'pkg' })}`, { headers })
  return { status: res.status, verified: res.complete && sha256(res.body) === image.lastLayer.digest, cache: String(res.headers['x-cache']) }
}

/** Resolves once `proxy` has committed the layer (a fill commits just after its last byte went out). */
async function cached(proxy: ProxyProcess, layerDigest: string): Promise<void> {
  for (let i = 0; (await fetch(`${proxy.base}/cache/${layerDigest}`)).status !== 200; i++) {
    if (i > 500) throw new Error(`${layerDigest} was not cached within 5 s`)
    await new Promise((resolve) => setTimeout(resolve, 10))
  }
}

/** Whether `proxy` logs a line matching `re` within 5 s (log lines are written in batches). */
async function logged(proxy: ProxyProcess, re: RegExp): Promise<boolean> {
  for (let i = 0; i < 100; i++) {
    if (
      proxy
        .log()
        .split('\n')
        .some((l) => re.test(l))
    )
      return true
    await new Promise((resolve) => setTimeout(resolve, 50))
  }
  return false
}

/** Request log lines of `proxy` that came from a peer (`"peer":"peer"` or `"peer":"cached"`). */
function peerRequestsTo(proxy: ProxyProcess): number {
  return proxy
    .log()
    .split('\n')
    .filter((l) => l.includes('"msg":"request"') && /"peer":"(peer|cached)"/.test(l)).length
}

/** One sample of `/metrics`, by its full series text (`name{labels}`). */
async function metric(proxy: ProxyProcess, series: string): Promise<number> {
  const text = await (await fetch(`${proxy.base}/metrics`)).text()
  const line = text.split('\n').find((l) => l.startsWith(`${series} `))
  return Number(line?.split(' ')[1] ?? NaN)
}

/** An HTTP server standing in for a replica; `serve` decides what it does with each request. */
async function fakePeer(t: Test, serve: (req: IncomingMessage, res: ServerResponse) => void): Promise<{ address: string; requests: number }> {
  const port = await freePort()
  const state = { address: `127.0.0.1:${port}`, requests: 0 }
  const server: Server = createServer((req, res) => {
    state.requests++
    serve(req, res)
  })
  await listenUntilTeardown(t, server, port)
  return state
}

/** An image whose layer `owner` owns among `members` (rendezvous), found by trying seeds. */
function imageOwnedBy(registry: FakeRegistry, members: string[], owner: string, size: number): FakeImage {
  for (let seed = 1; seed < 1000; seed++) {
    const data = bytes(size, seed)
    if (ownerOf(members, sha256(data)) === owner) return registry.addImage('deckhouse/ce/pkg', [data])
  }
  throw new Error('no seed gave that owner')
}

void t.test('50 cold clients over three replicas: one registry download of the layer, every body verified, no request forwarded twice', async (t) => {
  const registry = await FakeRegistry.start()
  t.teardown(() => registry.close())
  // After the first teardown: tap removes the directory only once the teardowns (which stop the
  // replicas writing into it) have run.
  t.testdir()
  const image = registry.addImage('deckhouse/ce/pkg', [bytes(4 * MiB, 7)])
  const ports = [await freePort(), await freePort(), await freePort()]
  const members = ports.map((p) => `127.0.0.1:${p}`)
  const procs = await replicas(t, registry, ports, members)
  const results = await Promise.all(Array.from({ length: 50 }, (_, i) => get(procs[i % 3] as ProxyProcess, image)))
  t.same(
    results.filter((r) => r.status !== 200 || !r.verified),
    [],
    'all 50 bodies are 200 and hash to the layer digest',
  )
  t.equal(registry.counts.blob, 1, 'one registry download of the layer for the whole cluster')
  const owner = ownerOf(members, image.lastLayer.digest)
  const ownerIndex = members.indexOf(owner ?? '')
  t.ok(ownerIndex >= 0, 'the owner is one of the three')
  // Each replica that does not own the layer asks the owner once (its one fill); the owner
  // never asks anyone, and a request from a peer is never passed on.
  for (const [i, proc] of procs.entries()) {
    t.equal(
      peerRequestsTo(proc),
      i === ownerIndex ? 2 : 0,
      `replica ${i} received ${i === ownerIndex ? 'one peer request per other replica' : 'no peer request'}`,
    )
    t.equal(await metric(proc, 'registry_packages_proxy_peer_requests_total{result="ok"}'), i === ownerIndex ? 0 : 1, `replica ${i}: peer requests ok`)
    t.equal(await metric(proc, 'registry_packages_proxy_peer_members'), 3, `replica ${i} sees three members`)
  }
  // Every replica cached the layer: the next round is all hits, still one download.
  for (const p of procs) await cached(p, image.lastLayer.digest)
  const again = await Promise.all(procs.map((p) => get(p, image)))
  t.same(
    again.map((r) => [r.status, r.verified, r.cache]),
    procs.map(() => [200, true, 'HIT']),
    'each replica has it cached',
  )
  t.equal(registry.counts.blob, 1)
})

void t.test('a request marked as from a peer is served from the registry, never forwarded', async (t) => {
  const registry = await FakeRegistry.start()
  t.teardown(() => registry.close())
  // After the first teardown: tap removes the directory only once the teardowns (which stop the
  // replicas writing into it) have run.
  t.testdir()
  const ports: [number, number] = [await freePort(), await freePort()]
  const members = ports.map((p) => `127.0.0.1:${p}`)
  const image = imageOwnedBy(registry, members, members[1] as string, 256 * 1024)
  const [asked, owner] = (await replicas(t, registry, ports, members)) as [ProxyProcess, ProxyProcess]
  t.match(await get(asked, image, { 'x-rpp-peer': '1' }), { status: 200, verified: true })
  t.equal(peerRequestsTo(owner), 0, 'the owner was not asked')
  t.equal(registry.counts.blob, 1, 'the replica asked went to the registry itself')
  await cached(asked, image.lastLayer.digest)
  t.match(await get(asked, image, { 'x-rpp-peer': 'cached' }), { status: 200, verified: true, cache: 'HIT' }, 'what it holds it serves to a cached-only ask')
  const other = registry.addImage('deckhouse/ce/pkg', [bytes(1024, 99)])
  const before = registry.counts.total
  t.equal((await get(asked, other, { 'x-rpp-peer': 'cached' })).status, 404, 'a cached-only ask for what it lacks is a 404')
  t.equal(registry.counts.total, before, '... with no registry request')
})

void t.test('the registry down and one replica with an empty cache: it serves what its peers hold', async (t) => {
  const registry = await FakeRegistry.start()
  t.teardown(() => registry.close())
  // After the first teardown: tap removes the directory only once the teardowns (which stop the
  // replicas writing into it) have run.
  t.testdir()
  const images = [1, 2, 3].map((seed) => registry.addImage('deckhouse/ce/pkg', [bytes(512 * 1024, seed)]))
  const ports = [await freePort(), await freePort(), await freePort()]
  const members = ports.map((p) => `127.0.0.1:${p}`)
  // Two replicas fill while the registry is up; the third is not running yet.
  const [a, b] = (await replicas(t, registry, ports.slice(0, 2), members)) as [ProxyProcess, ProxyProcess]
  for (const image of images) t.match(await get(a, image), { status: 200, verified: true })
  t.match(await get(b, images[0] as FakeImage), { status: 200, verified: true })
  // The third replica's config still names the registry, which no longer answers at all.
  const gone = { host: registry.host } as FakeRegistry
  await registry.close()
  const [c] = (await replicas(t, gone, ports.slice(2), members)) as [ProxyProcess]
  for (const [i, image] of images.entries()) {
    t.match(await get(c, image), { status: 200, verified: true }, `package ${i} from a peer, registry down`)
  }
  t.ok((await metric(c, 'registry_packages_proxy_peer_fill_bytes_total')) >= 3 * 512 * 1024, 'the layers came from peers')
  // Now cached on the third replica too.
  for (const image of images) await cached(c, image.lastLayer.digest)
  for (const image of images) t.match(await get(c, image), { status: 200, verified: true, cache: 'HIT' })
})

void t.test('manifests held for peers survive a kill -9: a cold replica gets the package through the restarted one while the registry is down', async (t) => {
  const registry = await FakeRegistry.start()
  t.teardown(() => registry.close())
  // After the first teardown, as above.
  t.testdir()
  const image = registry.addImage('deckhouse/ce/pkg', [bytes(512 * 1024, 11)])
  const ports: [number, number] = [await freePort(), await freePort()]
  const members = ports.map((p) => `127.0.0.1:${p}`)
  // B fetches the package while the registry is up; A is not running yet.
  const [b] = (await replicas(t, registry, ports.slice(1), members)) as [ProxyProcess]
  t.match(await get(b, image), { status: 200, verified: true })
  await cached(b, image.lastLayer.digest)
  const file = join(b.cacheDirectory, 'peer-manifests', image.manifestDigest.slice('sha256:'.length))
  for (let i = 0; !existsSync(file); i++) {
    if (i > 500) throw new Error('the manifest was not written within 5 s')
    await new Promise((resolve) => setTimeout(resolve, 10))
  }
  // No drain, no flush: the process is gone at once.
  await b.kill()
  const [restarted] = (await replicas(t, registry, ports.slice(1), members)) as [ProxyProcess]
  t.ok(await logged(restarted, /"manifests":1,"corrupt":0.*"msg":"peer manifests read back"/), 'B read its manifest back')
  const gone = { host: registry.host } as FakeRegistry
  await registry.close()
  const [a] = (await replicas(t, gone, ports.slice(0, 1), members)) as [ProxyProcess]
  const fromA = await get(a, image)
  t.match(fromA, { status: 200, verified: true }, 'A, cold, serves the package with the registry down')
  // Once seen failing under CI's load and never since: what both replicas said, to find out why.
  if (fromA.status !== 200) t.comment(`A's log:\n${a.log()}\nB's log:\n${restarted.log()}`)
  t.ok(await logged(restarted, new RegExp(`"path":"/peers/manifests/${image.manifestDigest}".*"status":200`)), "A took the manifest from B's files")
  t.equal(await metric(a, 'registry_packages_proxy_peer_fill_bytes_total'), 512 * 1024, 'and the layer from B')
})

void t.test('a lying peer: the client gets the right bytes from the registry and nothing wrong is cached', async (t) => {
  const registry = await FakeRegistry.start()
  t.teardown(() => registry.close())
  // After the first teardown: tap removes the directory only once the teardowns (which stop the
  // replicas writing into it) have run.
  t.testdir()
  const liar = await fakePeer(t, (req, res) => {
    // The right length, the wrong bytes: only the digest check can tell.
    res.writeHead(200, { 'Content-Type': 'application/x-gzip', 'Content-Length': String(256 * 1024) })
    res.end(Buffer.alloc(256 * 1024, 0x42))
  })
  const port = await freePort()
  const members = [`127.0.0.1:${port}`, liar.address]
  const image = imageOwnedBy(registry, members, liar.address, 256 * 1024)
  const [proxy] = (await replicas(t, registry, [port], members)) as [ProxyProcess]
  t.match(await get(proxy, image), { status: 200, verified: true }, 'right bytes')
  t.equal(liar.requests, 1, 'the owner (the liar) was asked first')
  t.equal(registry.counts.blob, 1, 'then the registry')
  t.equal(await metric(proxy, 'registry_packages_proxy_peer_requests_total{result="mismatch"}'), 1)
  await cached(proxy, image.lastLayer.digest)
  t.match(await get(proxy, image), { status: 200, verified: true, cache: 'HIT' }, 'what is cached is the verified layer')
  t.equal(liar.requests, 1, 'a hit asks nobody')
})

void t.test('a stalled peer: the request falls back to the registry within the bound', async (t) => {
  const registry = await FakeRegistry.start()
  t.teardown(() => registry.close())
  // After the first teardown: tap removes the directory only once the teardowns (which stop the
  // replicas writing into it) have run.
  t.testdir()
  // One peer never answers; one sends headers and a few bytes, then nothing; one trickles a
  // byte every 50 ms, never idle for the bound, never done either.
  const silent = await fakePeer(t, () => undefined)
  const dripping = await fakePeer(t, (_req, res) => {
    res.writeHead(200, { 'Content-Length': String(256 * 1024) })
    res.write(Buffer.alloc(1000))
  })
  const trickling = await fakePeer(t, (_req, res) => {
    res.writeHead(200, { 'Content-Length': String(256 * 1024) })
    const timer = setInterval(() => res.write(Buffer.alloc(1)), 50)
    res.once('close', () => clearInterval(timer))
  })
  for (const stalled of [silent, dripping, trickling]) {
    const port = await freePort()
    const members = [`127.0.0.1:${port}`, stalled.address]
    const image = imageOwnedBy(registry, members, stalled.address, 256 * 1024)
    const [proxy] = (await replicas(t, registry, [port], members, ['--peer-timeout=400ms'])) as [ProxyProcess]
    const began = Date.now()
    t.match(await get(proxy, image), { status: 200, verified: true })
    const ms = Date.now() - began
    t.equal(stalled.requests, 1, 'the stalled owner was asked', { log: proxy.log() })
    t.ok(ms >= 400 && ms < 3000, `fell back after the 400 ms bound (${ms} ms)`)
    t.equal(await metric(proxy, 'registry_packages_proxy_peer_requests_total{result="timeout"}'), 1)
    // A peer that stalled is left out of owner choice for a while: the next miss goes straight on.
    const next = imageOwnedBy(registry, members, stalled.address, 128 * 1024)
    const quick = Date.now()
    t.match(await get(proxy, next), { status: 200, verified: true })
    t.ok(Date.now() - quick < 400, 'the next miss did not wait for the stalled peer')
    t.equal(stalled.requests, 1)
  }
})

void t.test('a replica listening on 0.0.0.0 finds itself among --peers by its interfaces: it never asks itself', async (t) => {
  const registry = await FakeRegistry.start()
  t.teardown(() => registry.close())
  t.testdir()
  const ports: [number, number] = [await freePort(), await freePort()]
  const members = ports.map((p) => `127.0.0.1:${p}`) as [string, string]
  // Owned by the 0.0.0.0 replica under its real name, also when its listen address is counted
  // as a member of its own (what it did before: it then asked itself and waited on itself).
  let image: FakeImage | undefined
  for (let seed = 1; !image; seed++) {
    const data = bytes(128 * 1024, seed)
    const digest = sha256(data)
    if (ownerOf(members, digest) === members[0] && ownerOf([`0.0.0.0:${ports[0]}`, ...members], digest) === members[0])
      image = registry.addImage('deckhouse/ce/pkg', [data])
  }
  const any = await startProxyProcess(t, {
    registry,
    port: ports[0],
    cacheDirectory: join(t.testdirName, 'cache-any'),
    args: [`--peers=${members.join(',')}`, `--listen-address=0.0.0.0:${ports[0]}`, '--peer-timeout=1s'],
  })
  await startProxyProcess(t, {
    registry,
    port: ports[1],
    cacheDirectory: join(t.testdirName, 'cache-other'),
    args: [`--peers=${members.join(',')}`, '--peer-timeout=1s'],
  })
  const began = Date.now()
  t.match(await get(any, image), { status: 200, verified: true })
  t.ok(Date.now() - began < 900, `served without waiting on a peer (${Date.now() - began} ms)`)
  t.equal(peerRequestsTo(any), 0, 'it did not ask itself')
  t.equal(await metric(any, 'registry_packages_proxy_peer_members'), 2, 'two members, not three')
  t.equal(await metric(any, 'registry_packages_proxy_peer_requests_total{result="timeout"}'), 0)
  t.equal(registry.counts.blob, 1)
})

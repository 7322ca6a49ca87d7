/**
 * Upstream faults that the per-module tests do not already cover. Covered elsewhere, not
 * repeated here (SECURITY.md indexes them):
 * - a reset or truncation mid-layer resumed with a Range request, digest verified:
 *   test/integration/cache-fill.test.ts ("… mid-layer is resumed with a Range request …");
 * - truncation, reset, stall on every attempt, a flipped bit, extra bytes: never a complete 200,
 *   nothing cached: test/integration/cache-fill.test.ts ("cache fill with …");
 * - 429 with Retry-After, 502/503, bounded retries: test/integration/upstream-retry.test.ts;
 * - 5xx/403/429 for the manifest, 504 for a slow manifest or blob: test/handlers/package.test.ts.
 * Added here: the 504 paths again with the clock and the registry sockets watched (nothing
 * leaks), the documented timeouts against the code, and a token that expires mid-download.
 */
import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import t from 'tap'
import { MAX_RESUMES } from '../../plugins/packages/resumable-download.js'
import { DEFAULT_TIMEOUTS } from '../../plugins/packages/registry/transport.js'
import { DEFAULT_PREFIX, bytes, packageUrl, sha256 } from '../fixtures/proxy-harness.js'
import { FakeRegistry } from '../fixtures/fake-registry.js'
import { ReuseKiller, connectionsTo, fetchRaw, startProxy } from '../fixtures/listening-proxy.js'
import { eventually } from '../fixtures/eventually.js'

const ROOT = join(import.meta.dirname, '../..')
/** Time a loaded 2-core CI machine may add to a timeout before the answer is out. */
const SLACK_MS = 4000

function registryPort(host: string): number {
  return Number(host.split(':')[1])
}

void t.test('the README documents the timeouts the code uses', (t) => {
  const readme = readFileSync(join(ROOT, 'README.md'), 'utf8')
  const m = /did not connect, answer or keep sending in time \((\d+) s \/ (\d+) s \/ (\d+) s idle\)/.exec(readme)
  t.ok(m, 'the 504 row names the three timeouts')
  t.same(
    { connectMs: Number(m?.[1]) * 1000, headersMs: Number(m?.[2]) * 1000, idleMs: Number(m?.[3]) * 1000 },
    DEFAULT_TIMEOUTS,
    'README and DEFAULT_TIMEOUTS agree',
  )
  t.end()
})

void t.test('a registry that accepts and never answers: every request 504 within headersMs, no socket left', async (t) => {
  const headersMs = 600
  const p = await startProxy(t, { timeouts: { headersMs } })
  const port = registryPort(p.registry.host)
  p.registry.faults = { neverAnswer: true }
  const digests = Array.from({ length: 20 }, (_, i) => sha256(Buffer.from(`never-${i}`)))
  const started = Date.now()
  const replies = await Promise.all(
    digests.map(async (digest) => {
      const res = await p.proxy.server.inject(packageUrl({ digest }))
      return { status: res.statusCode, body: res.payload, ms: Date.now() - started }
    }),
  )
  for (const r of replies) {
    t.equal(r.status, 504, 'a gateway timeout')
    t.match(JSON.parse(r.body), { statusCode: 504, error: 'Gateway Time-out', message: `registry did not answer within ${headersMs} ms` })
    t.ok(r.ms >= headersMs - 50 && r.ms < headersMs + SLACK_MS, `answered after ${r.ms} ms (timeout ${headersMs} ms)`)
  }
  t.equal(p.registry.counts.manifest, 20, 'each asked once: a timeout is not retried')
  // Every abandoned request destroyed its socket: nothing stays open towards the registry.
  await eventually(() => connectionsTo(port) === 0, 'no connection to the registry is left', { timeoutMs: 3000 })
  t.equal(connectionsTo(port), 0, 'no socket leaked')
})

void t.test('a blob that never answers: 504 each round, and the registry sockets do not grow round by round', async (t) => {
  const headersMs = 500
  const p = await startProxy(t, { timeouts: { headersMs } })
  const port = registryPort(p.registry.host)
  const concurrency = 10
  const rounds = 3
  const images = Array.from({ length: concurrency * rounds }, (_, i) => p.registry.addImage(DEFAULT_PREFIX, [bytes(2048, 100 + i)]))
  // Manifests answer; blob GETs are accepted and never answered (until the registry closes).
  p.registry.faults = { blobDelayMs: 10 * 60_000 }
  const after: number[] = []
  for (let round = 0; round < rounds; round++) {
    const batch = images.slice(round * concurrency, (round + 1) * concurrency)
    const started = Date.now()
    const statuses = await Promise.all(batch.map(async (img) => (await p.proxy.server.inject(packageUrl({ digest: img.manifestDigest }))).statusCode))
    const ms = Date.now() - started
    t.same(statuses, Array(concurrency).fill(504), `round ${round}: all 504`)
    t.ok(ms < headersMs + SLACK_MS, `round ${round}: answered within ${ms} ms`)
    await eventually(() => p.proxy.packages.service.activeFills === 0, 'the fills are over', { timeoutMs: 5000 })
    after.push(connectionsTo(port))
  }
  t.comment(`connections to the registry after each round: ${after.join(', ')}`)
  // Only idle keep-alive sockets may stay (at most one per concurrent request): a leak of the
  // never-answered ones would add `concurrency` per round.
  for (const [round, n] of after.entries()) t.ok(n <= concurrency, `round ${round}: ${n} <= ${concurrency} sockets`)
  t.ok((after.at(-1) ?? 0) <= (after[0] ?? 0), 'not growing')
  t.equal(p.proxy.packages.service.downloads.running, 0, 'every download slot was returned')
  t.equal(p.proxy.packages.service.cache?.reservedBytes, 0, 'every reservation was returned')
})

for (const disableCache of [false, true]) {
  const mode = disableCache ? 'pass-through (--disable-cache)' : 'cache fill'
  void t.test(`${mode}: a body that stalls on every attempt breaks off within (1 + resumes) x idle, no socket left`, async (t) => {
    const idleMs = 400
    const p = await startProxy(t, { timeouts: { idleMs }, disableCache })
    const port = registryPort(p.registry.host)
    const data = bytes(256 * 1024, 7)
    const image = p.registry.addImage(DEFAULT_PREFIX, [data])
    p.registry.faults = { blobStallAfterBytes: 50_000, blobChunkSize: 8192 }
    await p.proxy.server.start()
    const started = Date.now()
    const reply = await fetchRaw(`${p.proxy.server.info.uri}${packageUrl({ digest: image.manifestDigest })}`)
    const ms = Date.now() - started
    t.equal(reply.status, 200, 'the headers went out before the stall')
    t.notOk(reply.complete, 'the response did not complete')
    t.ok(reply.body.length < data.length, `only ${reply.body.length} bytes arrived`)
    t.ok(data.subarray(0, reply.body.length).equals(reply.body), 'what arrived is right by position')
    // Fills and pass-throughs alike resume a stalled download MAX_RESUMES times; every response
    // stalls after 50 000 bytes, so even then the 256 KiB layer cannot complete.
    const attempts = 1 + MAX_RESUMES
    t.ok(ms >= attempts * idleMs - 50 && ms < attempts * idleMs + SLACK_MS, `broke off after ${ms} ms (${attempts} x ${idleMs} ms)`)
    t.equal(p.registry.counts.blob, attempts, `${attempts} blob request(s)`)
    await eventually(() => connectionsTo(port) === 0, 'the stalled sockets are destroyed', { timeoutMs: 3000 })
    t.equal(connectionsTo(port), 0, 'no socket leaked')
    await eventually(() => p.proxy.packages.service.downloads.running === 0, 'the download slot is returned', { timeoutMs: 3000 })
    t.equal(p.proxy.packages.service.activeFills, 0, 'no fill left running')
  })
}

void t.test('a bearer token that expires mid-download: the resume re-authenticates and the layer still verifies', async (t) => {
  const started = Date.now()
  let now = started
  const p = await startProxy(t, { auth: { kind: 'bearer' }, now: () => now })
  const data = bytes(160 * 1024, 31)
  const a = p.registry.addImage(`${DEFAULT_PREFIX}/a`, [data])
  const b = p.registry.addImage(`${DEFAULT_PREFIX}/a`, [bytes(4096, 32)])
  // Faulted: the anonymous manifest GET (401), the manifest GET with the token, and the first
  // blob GET, which is slow and then reset at 96 KiB. The resume is served normally.
  p.registry.faults = { blobChunkSize: 8192, blobChunkDelayMs: 15, resetBlobAt: 96 * 1024, onlyFirst: 3 }
  await p.proxy.server.start()
  const base = p.proxy.server.info.uri
  // The registry's clock passes the token's expiry (300 s) once the layer is streaming (the
  // client has its first bytes); the proxy's own cache still thinks the token is good.
  const pending = fetchRaw(`${base}${packageUrl({ digest: a.manifestDigest, path: 'a' })}`, {
    onFirstByte: () => {
      now += 301_000
    },
  })
  await eventually(() => now > started + 300_000, 'the download is under way', { intervalMs: 5 })
  const other = await fetchRaw(`${base}${packageUrl({ digest: b.manifestDigest, path: 'a' })}`)
  t.equal(other.status, 200, 'a new request after the expiry is served')
  t.ok(other.body.equals(b.lastLayer.data), 'byte-exact')
  const reply = await pending
  t.equal(reply.status, 200)
  t.ok(reply.complete, 'the download that spanned the expiry completed')
  t.ok(reply.body.equals(data), 'byte-exact after the resume')
  const ranged = p.registry.requests.filter((r) => r.origin === 'registry' && r.headers.range !== undefined)
  t.ok(ranged.length >= 1, `the break was resumed with a Range request (${ranged.length})`)
  const firstToken = p.registry.requests.find((r) => r.origin === 'registry' && r.url.includes('/blobs/'))?.headers.authorization
  t.not(ranged.at(-1)?.headers.authorization, firstToken, 'the successful resume carried a new token')
  t.ok(p.registry.counts.token >= 2, `a new token was fetched (${p.registry.counts.token} token requests)`)
  t.ok(p.registry.counts.unauthorized >= 2, 'the expired token was refused, and recovered from')
  await eventually(() => p.proxy.packages.index?.blob(a.lastLayer.digest) !== undefined, 'the layer is cached', { timeoutMs: 5000 })
  t.equal(p.proxy.packages.index?.blob(a.lastLayer.digest)?.size, data.length, 'cached after verification')
})

for (const auth of [
  { kind: 'basic' as const, username: 'puller', password: 'race-pass' },
  { kind: 'bearer' as const, username: 'puller', password: 'race-pass' },
]) {
  void t.test(`${auth.kind} auth: concurrent first requests all learn the challenge (none is refused for another's 401)`, async (t) => {
    const p = await startProxy(t, { auth, credentials: { username: 'puller', password: 'race-pass' } })
    const images = Array.from({ length: 12 }, (_, i) => p.registry.addImage(DEFAULT_PREFIX, [bytes(1000 + i, 200 + i)]))
    const replies = await Promise.all(images.map((img) => p.proxy.server.inject(packageUrl({ digest: img.manifestDigest }))))
    t.same(
      replies.map((r) => r.statusCode),
      Array(images.length).fill(200),
      'every cold request at start-up is served',
    )
    t.ok(
      replies.every((r, i) => r.rawPayload.equals(images[i]?.lastLayer.data ?? Buffer.alloc(0))),
      'byte-exact',
    )
  })
}

void t.test('a keep-alive connection the registry closes just as it is reused: the request is sent again, not failed', async (t) => {
  const registry = await FakeRegistry.start()
  t.teardown(() => registry.close())
  const killer = await ReuseKiller.start(registryPort(registry.host))
  t.teardown(() => killer.close())
  const p = await startProxy(t, { registry, address: killer.host })
  const images = Array.from({ length: 5 }, (_, i) => p.registry.addImage(DEFAULT_PREFIX, [bytes(4000 + i, 300 + i)]))
  for (const img of images) {
    const res = await p.proxy.server.inject(packageUrl({ digest: img.manifestDigest }))
    t.equal(res.statusCode, 200, `served (${res.statusCode === 200 ? 'ok' : res.payload})`)
    t.ok(res.rawPayload.equals(img.lastLayer.data), 'byte-exact')
  }
  t.ok(killer.killed >= 5, `${killer.killed} reused connections were reset under the proxy`)
  t.equal(registry.counts.blob, 5, 'each blob reached the registry once')
})

void t.test('a new connection reset before any answer is tried once more', async (t) => {
  const p = await startProxy(t)
  const image = p.registry.addImage(DEFAULT_PREFIX, [bytes(6000, 310)])
  // The manifest request's connection is reset (a draining load balancer), then all is normal.
  p.registry.faults = { resetBeforeAnswer: true, onlyFirst: 1 }
  const res = await p.proxy.server.inject(packageUrl({ digest: image.manifestDigest }))
  t.equal(res.statusCode, 200, `served (${res.statusCode === 200 ? 'ok' : res.payload})`)
  t.ok(res.rawPayload.equals(image.lastLayer.data), 'byte-exact')
  t.equal(p.registry.counts.manifest, 2, 'the manifest request went out twice')
})

void t.test('a registry that resets every new connection: one retry, then a prompt 502', async (t) => {
  // A fresh proxy, so no pooled connection (retried as stale) is in play.
  const p = await startProxy(t)
  const image = p.registry.addImage(DEFAULT_PREFIX, [bytes(6000, 311)])
  p.registry.faults = { resetBeforeAnswer: true }
  const started = Date.now()
  const failed = await p.proxy.server.inject(packageUrl({ digest: image.manifestDigest }))
  t.equal(failed.statusCode, 502)
  t.match(JSON.parse(failed.payload), { message: /connection to registry .* failed \(ECONNRESET\)/ })
  t.equal(p.registry.counts.manifest, 2, 'tried twice, not more')
  t.ok(Date.now() - started < 5000, `failed in ${Date.now() - started} ms, not after a timeout`)
  t.equal(p.proxy.packages.index?.manifest(image.manifestDigest), undefined, 'nothing cached')
})

import { readdirSync } from 'node:fs'
import { join } from 'node:path'
import t, { type Test } from 'tap'
import type { FakeFaults } from '../fixtures/fake-registry.js'
import {
  DEFAULT_PREFIX,
  blobFiles,
  bytes,
  fetchRaw,
  injectOutcome,
  midLayerBreaks,
  packageUrl,
  startHarness,
  waitCached,
  type Harness,
  type RawReply,
} from '../fixtures/proxy-harness.js'
import { eventually } from '../fixtures/eventually.js'

const SIZE = 64 * 1024

/** The contract for a body that broke: never a complete 200 of the full length. */
function assertNotComplete(t: Test, reply: RawReply, data: Buffer, what: string): void {
  if (reply.status === 200 || reply.status === 206) {
    t.notOk(reply.complete, `${what}: the response did not end normally`)
    t.ok(reply.body.length < Number(reply.headers['content-length']), `${what}: fewer bytes than Content-Length`)
    t.ok(reply.error !== undefined, `${what}: the client saw the connection break (${reply.error?.message})`)
  } else {
    t.equal(reply.status, 502, `${what}: refused before the headers`)
  }
  t.notOk(reply.complete && reply.body.length === data.length && !reply.body.equals(data), `${what}: no complete wrong body`)
}

async function assertNothingCached(t: Test, h: Harness, layerDigest: string): Promise<void> {
  await h.proxy.packages.service.settled()
  t.equal(h.proxy.packages.index?.blob(layerDigest), undefined, 'no index row')
  t.same(blobFiles(h.cacheDirectory), [], 'no file under blobs/')
  await eventually(() => readdirSync(join(h.cacheDirectory, 'tmp')).length === 0, 'the temp file is removed', { intervalMs: 5 })
  t.equal(h.proxy.packages.service.cache?.usedBytes, 0, 'no bytes accounted')
  t.equal(h.proxy.packages.service.cache?.reservedBytes, 0, 'the reservation was returned')
}

// Broken connections are resumed up to MAX_RESUMES times, and the fake cuts every response
// (resumes included) at the same offset: cuts of SIZE/8 fail even after all resumes.
const FAULTS: Array<[string, FakeFaults]> = [
  ['a flipped bit (corruptBlob)', { corruptBlob: true }],
  ['a truncated body on every attempt (truncateBlobAt)', { truncateBlobAt: SIZE / 8 }],
  ['a reset connection on every attempt (resetBlobAt)', { resetBlobAt: SIZE / 8 }],
  ['extra bytes (extraBlobBytes)', { extraBlobBytes: 10 }],
  ['a stalled body on every attempt (blobStallAfterBytes)', { blobStallAfterBytes: SIZE / 8 }],
]

for (const [name, faults] of FAULTS) {
  void t.test(`cache fill with ${name}: never a complete 200, nothing cached`, async (t) => {
    const h = await startHarness(t, { timeouts: { idleMs: 300 } })
    const data = bytes(SIZE, 21)
    const image = h.registry.addImage(DEFAULT_PREFIX, [data])
    const url = packageUrl({ digest: image.manifestDigest })

    h.registry.faults = { ...faults, blobChunkSize: 8192 }
    const injected = await injectOutcome(h, url)
    if (injected.error === undefined) {
      t.not(injected.status, 200, `inject: not a 200 (${injected.status})`)
      t.ok(injected.status === 502 || injected.status === 504, 'inject: a gateway error')
    } else {
      t.pass(`inject: the response broke off (${injected.error})`)
    }
    await assertNothingCached(t, h, image.lastLayer.digest)

    await h.proxy.server.start()
    const raw = await fetchRaw(`${h.proxy.server.info.uri}${url}`)
    assertNotComplete(t, raw, data, 'socket')
    await assertNothingCached(t, h, image.lastLayer.digest)
    t.ok(h.registry.counts.blob >= 2, 'both requests went upstream')

    const ranged = await fetchRaw(`${h.proxy.server.info.uri}${url}`, { headers: { range: `bytes=0-${SIZE - 1}` } })
    assertNotComplete(t, ranged, data, 'a range up to the last byte')
    await assertNothingCached(t, h, image.lastLayer.digest)

    h.registry.faults = {}
    const before = h.registry.counts.blob
    const good = await fetchRaw(`${h.proxy.server.info.uri}${url}`)
    t.equal(good.status, 200)
    t.ok(good.complete)
    t.ok(good.body.equals(data), 'a healthy registry afterwards serves the right bytes')
    t.equal(h.registry.counts.blob, before + 1, 'fetched again: the failure was not cached')
    await waitCached(h, image.manifestDigest, image.lastLayer.digest)
  })
}

void t.test('a short range of a layer that later breaks: its last byte waits for the digest, so it breaks off too', async (t) => {
  const h = await startHarness(t)
  const data = bytes(SIZE, 22)
  const image = h.registry.addImage(DEFAULT_PREFIX, [data])
  h.registry.faults = { truncateBlobAt: SIZE / 8, blobChunkSize: 8192 }
  await h.proxy.server.start()
  const reply = await fetchRaw(`${h.proxy.server.info.uri}${packageUrl({ digest: image.manifestDigest })}`, { headers: { range: 'bytes=0-99' } })
  t.equal(reply.status, 206)
  t.notOk(reply.complete, 'not completed')
  t.ok(reply.body.length < 100)
  t.ok(reply.body.equals(data.subarray(0, reply.body.length)), 'what did arrive is right by position')
  await assertNothingCached(t, h, image.lastLayer.digest)
})

void t.test('concurrent readers of a failing fill all see the failure', async (t) => {
  const h = await startHarness(t)
  const data = bytes(SIZE, 23)
  const image = h.registry.addImage(DEFAULT_PREFIX, [data])
  h.registry.faults = { corruptBlob: true, blobChunkSize: 4096, blobChunkDelayMs: 5 }
  await h.proxy.server.start()
  const url = `${h.proxy.server.info.uri}${packageUrl({ digest: image.manifestDigest })}`
  const replies = await Promise.all(Array.from({ length: 5 }, () => fetchRaw(url)))
  for (const r of replies) assertNotComplete(t, r, data, 'reader')
  t.equal(h.registry.counts.blob, 1, 'one upstream fetch for all of them')
  await assertNothingCached(t, h, image.lastLayer.digest)
  const metrics = await h.proxy.metrics.registry.getSingleMetricAsString('registry_packages_proxy_digest_mismatches_total')
  t.match(metrics, /what="layer"} 1$/m, 'one mismatch: counted per fill, not per reader')
})

// The registry connection breaks once mid-layer: the fill resumes from the byte reached with a
// Range request, the stitched layer still verifies, the client never notices, and it is cached.
for (const [name, faults] of midLayerBreaks(SIZE)) {
  void t.test(`${name} mid-layer is resumed with a Range request and the digest still verifies`, async (t) => {
    const h = await startHarness(t, { timeouts: { idleMs: 300 } })
    const data = bytes(SIZE, 24)
    const image = h.registry.addImage(DEFAULT_PREFIX, [data])
    // Only the first blob response breaks (the manifest request is the first faulted one).
    h.registry.faults = { ...faults, blobChunkSize: 8192, onlyFirst: 2 }
    await h.proxy.server.start()
    const reply = await fetchRaw(`${h.proxy.server.info.uri}${packageUrl({ digest: image.manifestDigest })}`)
    t.equal(reply.status, 200)
    t.ok(reply.complete, 'the client got a complete response')
    t.ok(reply.body.equals(data), 'byte-exact')
    t.equal(h.registry.counts.blobRange, 1, 'one Range request resumed it')
    const resumed = h.registry.requests.find((r) => r.headers.range !== undefined)
    t.match(String(resumed?.headers.range), /^bytes=\d+-$/, 'from the byte reached')
    const resumes = await h.proxy.metrics.registry.getSingleMetricAsString('registry_packages_proxy_upstream_resumes_total')
    t.match(resumes, /^registry_packages_proxy_upstream_resumes_total\{kind="fill"\} 1$/m, 'counted as a fill resume')
    await waitCached(h, image.manifestDigest, image.lastLayer.digest)
  })
}

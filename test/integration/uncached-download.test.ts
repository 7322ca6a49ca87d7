import { Readable } from 'node:stream'
import t, { type Test } from 'tap'
import { DigestError, UpstreamError } from '../../errors.js'
import { MAX_RESUMES } from '../../plugins/packages/resumable-download.js'
import { Fill } from '../../plugins/packages/fill.js'
import type { FakeFaults } from '../fixtures/fake-registry.js'
import {
  DEFAULT_PREFIX,
  blobFiles,
  bytes,
  fetchRaw,
  injectOutcome,
  midLayerBreaks,
  packageUrl,
  sha256,
  startHarness,
  type RawReply,
} from '../fixtures/proxy-harness.js'
import { eventually } from '../fixtures/eventually.js'

const SIZE = 48 * 1024

/**
 * Serves `data` as an uncached (memory-window) download in chunks, claiming `layer`; returns
 * what a reader of `start..end` received and the error, if any.
 */
async function slice(
  data: Buffer,
  layer: { digest: string; size: number },
  start: number,
  end: number,
  chunk = 1000,
): Promise<{ out: Buffer; error: unknown }> {
  const parts: Buffer[] = []
  for (let i = 0; i < data.length; i += chunk) parts.push(data.subarray(i, i + chunk))
  const fill = new Fill({ ...layer, mediaType: '' }, undefined)
  const running = fill.run(() => Promise.resolve({ body: Readable.from(parts), length: layer.size, offset: 0 }))
  const out: Buffer[] = []
  let error: unknown
  try {
    await fill.started
    for await (const c of fill.reader(start, end)) out.push(c as Buffer)
  } catch (err) {
    error = err
  }
  await running
  fill.release()
  return { out: Buffer.concat(out), error }
}

void t.test('an uncached download passes exactly the range of a verified layer', async (t) => {
  const data = bytes(10_000, 31)
  const layer = { digest: sha256(data), size: data.length }
  for (const [start, end, chunk] of [
    [0, 9999, 1000],
    [0, 9999, 10_000],
    [10, 19, 7],
    [999, 1000, 1000],
    [9999, 9999, 333],
    [0, 0, 1],
    [5000, 9999, 4096],
  ] as const) {
    const { out, error } = await slice(data, layer, start, end, chunk)
    t.equal(error, undefined, `${start}-${end} by ${chunk}`)
    t.ok(out.equals(data.subarray(start, end + 1)), `${start}-${end} by ${chunk}: exact bytes`)
  }
})

void t.test('an uncached download withholds the last byte of a layer that does not verify', async (t) => {
  const data = bytes(10_000, 32)
  const layer = { digest: sha256(data), size: data.length }
  const wrong = Buffer.from(data)
  wrong[5000] = (wrong[5000] ?? 0) ^ 1

  const corrupt = await slice(wrong, layer, 0, 9999)
  t.type(corrupt.error, DigestError)
  t.equal((corrupt.error as DigestError).expected, layer.digest)
  t.equal((corrupt.error as DigestError).found, sha256(wrong))
  t.equal(corrupt.out.length, 9999, 'everything but the last byte')

  const early = await slice(wrong, layer, 100, 199)
  t.type(early.error, DigestError, 'a range before the damage is withheld too')
  t.equal(early.out.length, 99)

  const short = await slice(data.subarray(0, 9000), layer, 0, 9999)
  t.type(short.error, UpstreamError)
  t.match(String((short.error as Error).message), /early/)
  t.ok(short.out.length <= 9000, 'no more than arrived, never the announced size')

  const long = await slice(Buffer.concat([data, Buffer.from('xx')]), layer, 0, 9999)
  t.type(long.error, UpstreamError)
  t.match(String((long.error as Error).message), /more bytes/)
  t.ok(long.out.length < data.length)
})

function assertNotComplete(t: Test, reply: RawReply, what: string): void {
  if (reply.status === 200) {
    t.notOk(reply.complete, `${what}: not complete`)
    t.ok(reply.body.length < Number(reply.headers['content-length']), `${what}: short of Content-Length`)
  } else {
    t.equal(reply.status, 502, `${what}: refused before the headers`)
  }
}

// Broken connections are resumed up to MAX_RESUMES times, and the fake cuts every response
// (resumes included) at the same offset: cuts of SIZE/8 fail even after all resumes.
const FAULTS: Array<[string, FakeFaults]> = [
  ['corruptBlob', { corruptBlob: true }],
  ['truncateBlobAt', { truncateBlobAt: SIZE / 8 }],
  ['resetBlobAt', { resetBlobAt: SIZE / 8 }],
  ['extraBlobBytes', { extraBlobBytes: 3 }],
  ['blobStallAfterBytes', { blobStallAfterBytes: SIZE / 8 }],
]

for (const [name, faults] of FAULTS) {
  void t.test(`disableCache with ${name}: never a complete 200`, async (t) => {
    const h = await startHarness(t, { disableCache: true, timeouts: { idleMs: 300 } })
    const data = bytes(SIZE, 33)
    const image = h.registry.addImage(DEFAULT_PREFIX, [data])
    const url = packageUrl({ digest: image.manifestDigest })
    h.registry.faults = { ...faults, blobChunkSize: 4096 }

    const injected = await injectOutcome(h, url)
    t.ok(injected.error !== undefined || injected.status === 502 || injected.status === 504, `inject: ${injected.error ?? injected.status}`)

    await h.proxy.server.start()
    assertNotComplete(t, await fetchRaw(`${h.proxy.server.info.uri}${url}`), 'socket')
    // A cut connection is resumed each time, a wrong layer never.
    const attempts = faults.corruptBlob || faults.extraBlobBytes ? 1 : 1 + MAX_RESUMES
    t.equal(h.registry.counts.blob, 2 * attempts, `${attempts} blob request(s) per client`)

    h.registry.faults = {}
    const good = await fetchRaw(`${h.proxy.server.info.uri}${url}`)
    t.ok(good.complete && good.body.equals(data), 'right bytes once the registry is healthy')
    if (faults.corruptBlob) {
      const metrics = await h.proxy.metrics.registry.getSingleMetricAsString('registry_packages_proxy_digest_mismatches_total')
      t.match(metrics, /what="layer"} 2$/m, 'each pass-through mismatch is counted')
    }
  })
}

// The registry connection breaks once mid-layer: the pass-through resumes from the byte reached
// with a Range request (or skips what it has when the registry ignores Range), the stitched
// layer still verifies, and the client never notices.
for (const [name, faults] of midLayerBreaks(SIZE)) {
  void t.test(`disableCache: ${name} mid-layer is resumed with a Range request and the digest still verifies`, async (t) => {
    const h = await startHarness(t, { disableCache: true, timeouts: { idleMs: 300 } })
    const data = bytes(SIZE, 34)
    const image = h.registry.addImage(DEFAULT_PREFIX, [data])
    // Only the first blob response breaks (the manifest request is the first faulted one).
    h.registry.faults = { ...faults, blobChunkSize: 4096, onlyFirst: 2 }
    await h.proxy.server.start()
    const reply = await fetchRaw(`${h.proxy.server.info.uri}${packageUrl({ digest: image.manifestDigest })}`, { headers: { range: 'bytes=100-' } })
    t.equal(reply.status, 206)
    t.ok(reply.complete, 'the client got a complete response')
    t.ok(reply.body.equals(data.subarray(100)), 'byte-exact')
    t.equal(h.registry.counts.blobRange, 1, 'one Range request resumed it')
    const resumed = h.registry.requests.find((r) => r.headers.range !== undefined)
    const from = Number(/^bytes=(\d+)-$/.exec(String(resumed?.headers.range))?.[1])
    t.ok(from > 0 && from <= (faults.truncateBlobAt ?? faults.resetBlobAt ?? faults.blobStallAfterBytes ?? 0), `from the byte reached (${from})`)
    t.same(blobFiles(h.cacheDirectory), [], 'nothing written')
    const resumes = await h.proxy.metrics.registry.getSingleMetricAsString('registry_packages_proxy_upstream_resumes_total')
    t.match(resumes, /^registry_packages_proxy_upstream_resumes_total\{kind="pass-through"\} 1$/m, 'counted as a pass-through resume')
    t.match(resumes, /^registry_packages_proxy_upstream_resumes_total\{kind="fill"\} 0$/m, 'and not as a fill')
  })
}

// A registry (or a proxy on the path) that ignores Range answers a resume with the whole blob
// from byte 0: what was already passed on is skipped, not sent twice.
for (const disableCache of [true, false]) {
  void t.test(`${disableCache ? 'disableCache' : 'cache fill'}: a resume answered 200 from byte 0 skips what it has`, async (t) => {
    const h = await startHarness(t, { disableCache, timeouts: { idleMs: 300 } })
    const data = bytes(SIZE, 35)
    const image = h.registry.addImage(DEFAULT_PREFIX, [data])
    // The manifest, the first blob response (cut at 20 000) and the first resume (the whole blob
    // again, cut at 20 000 too) are faulted; the second resume is served normally.
    h.registry.faults = { truncateBlobAt: 20_000, ignoreRange: true, blobChunkSize: 4096, onlyFirst: 3 }
    await h.proxy.server.start()
    const reply = await fetchRaw(`${h.proxy.server.info.uri}${packageUrl({ digest: image.manifestDigest })}`)
    t.equal(reply.status, 200)
    t.ok(reply.complete, 'the client got a complete response')
    t.ok(reply.body.equals(data), 'byte-exact: nothing doubled, nothing missing')
    t.same(
      h.registry.requests.filter((r) => r.url.includes('/blobs/')).map((r) => r.headers.range),
      [undefined, 'bytes=20000-', 'bytes=20000-'],
      'resumed twice from the byte reached: the 200 from byte 0 brought nothing new',
    )
  })
}

void t.test('a layer bigger than the cache limit is served byte-exact and not cached', async (t) => {
  const h = await startHarness(t, { limitBytes: 10_000 })
  const data = bytes(20_000, 34)
  const image = h.registry.addImage(DEFAULT_PREFIX, [data])
  const url = packageUrl({ digest: image.manifestDigest })
  for (let i = 1; i <= 2; i++) {
    const res = await h.proxy.server.inject(url)
    t.equal(res.statusCode, 200)
    t.equal(res.headers['content-length'], String(data.length))
    t.ok(res.rawPayload.equals(data), 'byte-exact')
    t.equal(h.registry.counts.blob, i, 'fetched every time')
  }
  const ranged = await h.proxy.server.inject({ url, headers: { range: 'bytes=19990-' } })
  t.equal(ranged.statusCode, 206)
  t.ok(ranged.rawPayload.equals(data.subarray(19_990)))
  t.equal(h.proxy.packages.index?.blobCount, 0)
  t.same(blobFiles(h.cacheDirectory), [])
  t.equal(h.proxy.packages.service.cache?.reservedBytes, 0)
  const results = await h.proxy.metrics.registry.getSingleMetricAsString('registry_packages_proxy_package_results_total')
  t.match(results, /result="bypass"} 3/)

  h.registry.faults = { corruptBlob: true }
  await h.proxy.server.start()
  assertNotComplete(t, await fetchRaw(`${h.proxy.server.info.uri}${url}`), 'a corrupt oversized layer')
})

void t.test('a range that ends before the layer does never holds up an uncached download (it parks its last byte)', async (t) => {
  const h = await startHarness(t, { disableCache: true })
  const data = bytes(8 * 1024 * 1024, 36)
  const image = h.registry.addImage(DEFAULT_PREFIX, [data])
  h.registry.faults = { blobChunkSize: 256 * 1024, blobChunkDelayMs: 2 }
  await h.proxy.server.start()
  const url = `${h.proxy.server.info.uri}${packageUrl({ digest: image.manifestDigest })}`
  const began = Date.now()
  const [range, whole] = await Promise.all([fetchRaw(url, { headers: { range: 'bytes=0-9' } }), fetchRaw(url)])
  const ms = Date.now() - began
  t.same([range.status, range.complete], [206, true])
  t.ok(range.body.equals(data.subarray(0, 10)), 'the range is exact')
  t.same([whole.status, whole.complete], [200, true])
  t.ok(whole.body.equals(data), 'the whole layer is exact')
  t.equal(h.registry.counts.blob, 1, 'one download served both')
  // Without parking, the range reader pinned the 2 MiB window at byte 9 until the socket's
  // idle timeout (300 s); the laggard cut-off never applied to it, since it was "waiting".
  t.ok(ms < 8000, `both done in ${ms} ms`)
})

void t.test('an uncached download is not a cache fill: fills_in_flight stays 0 while it runs', async (t) => {
  const h = await startHarness(t, { disableCache: true })
  const image = h.registry.addImage(DEFAULT_PREFIX, [bytes(1024 * 1024, 37)])
  h.registry.faults = { blobChunkSize: 64 * 1024, blobChunkDelayMs: 20 }
  const pending = h.proxy.server.inject(packageUrl({ digest: image.manifestDigest }))
  await eventually(() => h.proxy.packages.service.activeFills === 1, 'the download runs', { intervalMs: 5 })
  t.equal(h.proxy.packages.service.cacheFills, 0, 'no fill')
  const metrics = await h.proxy.metrics.registry.getSingleMetricAsString('registry_packages_proxy_fills_in_flight')
  t.match(metrics, /registry_packages_proxy_fills_in_flight 0\b/)
  t.equal((await pending).statusCode, 200)
})

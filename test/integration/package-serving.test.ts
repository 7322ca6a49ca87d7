import { existsSync, readdirSync, readFileSync } from 'node:fs'
import { join } from 'node:path'
import type { Readable } from 'node:stream'
import t from 'tap'
import { DEFAULT_PREFIX, blobFiles, bytes, fetchRaw, packageUrl, startHarness, waitCached } from '../fixtures/proxy-harness.js'
import { eventually } from '../fixtures/eventually.js'

function collect(stream: Readable): Promise<{ data: Buffer; error: Error | undefined }> {
  return new Promise((resolve) => {
    const chunks: Buffer[] = []
    stream.on('data', (c: Buffer) => chunks.push(c))
    stream.on('error', (error) => resolve({ data: Buffer.concat(chunks), error }))
    stream.on('end', () => resolve({ data: Buffer.concat(chunks), error: undefined }))
  })
}

void t.test('a miss, then a hit that needs no registry', async (t) => {
  const h = await startHarness(t)
  const image = h.registry.addImage(DEFAULT_PREFIX, [bytes(100, 1), bytes(30_000, 2)])
  const url = packageUrl({ digest: image.manifestDigest })

  const miss = await h.proxy.server.inject(url)
  t.equal(miss.statusCode, 200)
  t.ok(miss.rawPayload.equals(image.lastLayer.data))
  t.equal(h.registry.counts.manifest, 1)
  t.equal(h.registry.counts.blob, 1)
  await waitCached(h, image.manifestDigest, image.lastLayer.digest)

  const hex = image.lastLayer.digest.slice('sha256:'.length)
  const file = join(h.cacheDirectory, 'blobs', 'sha256', hex.slice(0, 2), hex)
  t.ok(readFileSync(file).equals(image.lastLayer.data), 'the file is named by the layer digest and holds its bytes')
  t.same(blobFiles(h.cacheDirectory), [`sha256/${hex.slice(0, 2)}/${hex}`], 'exactly one blob file')
  t.same(readdirSync(join(h.cacheDirectory, 'tmp')), [], 'no temp file is left')

  h.registry.resetCounts()
  for (let i = 0; i < 3; i++) {
    const hit = await h.proxy.server.inject(url)
    t.equal(hit.statusCode, 200)
    t.equal(hit.headers['content-length'], String(image.lastLayer.data.length))
    t.ok(hit.rawPayload.equals(image.lastLayer.data))
  }
  const head = await h.proxy.server.inject({ method: 'HEAD', url })
  t.equal(head.statusCode, 200)
  t.equal(head.headers['content-length'], String(image.lastLayer.data.length))
  t.equal(h.registry.counts.total, 0, 'no manifest, no blob, no token request for hits')
  t.equal(h.proxy.packages.index?.blob(image.lastLayer.digest)?.hits, 3, 'each GET hit is counted')
  t.equal(h.proxy.packages.index?.usedBytes, image.lastLayer.data.length)

  const results = await h.proxy.metrics.registry.getSingleMetricAsString('registry_packages_proxy_package_results_total')
  t.match(results, /result="miss"} 1/)
  t.match(results, /result="hit"} 3/)
})

void t.test('two manifests with the same last layer share one cache entry', async (t) => {
  const h = await startHarness(t)
  const layer = bytes(5000, 3)
  const a = h.registry.addImage(DEFAULT_PREFIX, [bytes(10, 4), layer])
  const b = h.registry.addImage(DEFAULT_PREFIX, [bytes(11, 5), layer])
  t.equal((await h.proxy.server.inject(packageUrl({ digest: a.manifestDigest }))).statusCode, 200)
  await waitCached(h, a.manifestDigest, a.lastLayer.digest)
  h.registry.resetCounts()
  const second = await h.proxy.server.inject(packageUrl({ digest: b.manifestDigest }))
  t.equal(second.statusCode, 200)
  t.ok(second.rawPayload.equals(layer))
  t.equal(h.registry.counts.manifest, 1, 'the new manifest is fetched')
  t.equal(h.registry.counts.blob, 0, 'the layer is already cached')
  t.equal(h.proxy.packages.index?.blobCount, 1)
})

void t.test('a new server on the same cache directory serves hits with zero upstream requests', async (t) => {
  const first = await startHarness(t)
  const image = first.registry.addImage(DEFAULT_PREFIX, [bytes(20_000, 6)])
  const url = packageUrl({ digest: image.manifestDigest })
  t.equal((await first.proxy.server.inject(url)).statusCode, 200)
  await waitCached(first, image.manifestDigest, image.lastLayer.digest)
  // One hit before the restart, so an access time and hit count are batched for the close.
  t.equal((await first.proxy.server.inject(url)).statusCode, 200)
  await first.stop()

  first.registry.resetCounts()
  const second = await startHarness(t, { registry: first.registry, dir: first.dir })
  const entry = second.proxy.packages.index?.blob(image.lastLayer.digest)
  t.ok(entry, 'the entry survived the restart')
  t.equal(entry?.hits, 1, 'the batched hit count was written on stop')
  const hit = await second.proxy.server.inject(url)
  t.equal(hit.statusCode, 200)
  t.ok(hit.rawPayload.equals(image.lastLayer.data))
  t.equal(first.registry.counts.total, 0, 'zero upstream requests after the restart')
})

void t.test('disableCache: nothing is written and every request goes upstream', async (t) => {
  const h = await startHarness(t, { disableCache: true })
  const image = h.registry.addImage(DEFAULT_PREFIX, [bytes(40_000, 7)])
  const url = packageUrl({ digest: image.manifestDigest })
  for (let i = 0; i < 2; i++) {
    const res = await h.proxy.server.inject(url)
    t.equal(res.statusCode, 200)
    t.equal(res.headers['content-length'], String(image.lastLayer.data.length))
    t.ok(res.rawPayload.equals(image.lastLayer.data))
  }
  const ranged = await h.proxy.server.inject({ url, headers: { range: 'bytes=100-199' } })
  t.equal(ranged.statusCode, 206)
  t.ok(ranged.rawPayload.equals(image.lastLayer.data.subarray(100, 200)))
  t.equal(h.registry.counts.blob, 3, 'every GET fetched the layer')
  t.equal(h.registry.counts.manifest, 3, 'and the manifest')
  t.equal(h.proxy.packages.index, undefined, 'no index is opened')
  t.notOk(existsSync(h.cacheDirectory), 'the cache directory is not even created')
  const results = await h.proxy.metrics.registry.getSingleMetricAsString('registry_packages_proxy_package_results_total')
  t.match(results, /result="bypass"} 3/)
})

void t.test('10 concurrent requests for a cold digest: one manifest GET, one blob GET, all byte-exact', async (t) => {
  const h = await startHarness(t)
  const image = h.registry.addImage(DEFAULT_PREFIX, [bytes(64 * 1024, 8)])
  // 16 chunks, 20 ms apart: every request arrives while the one fill is running.
  h.registry.faults = { blobChunkSize: 4096, blobChunkDelayMs: 20 }
  const url = packageUrl({ digest: image.manifestDigest })
  const replies = await Promise.all(Array.from({ length: 10 }, () => h.proxy.server.inject(url)))
  for (const res of replies) {
    t.equal(res.statusCode, 200)
    t.ok(res.rawPayload.equals(image.lastLayer.data), 'byte-exact')
  }
  t.equal(h.registry.counts.blob, 1, 'exactly one upstream blob GET')
  t.equal(h.registry.counts.manifest, 1, 'exactly one upstream manifest GET')
  const results = await h.proxy.metrics.registry.getSingleMetricAsString('registry_packages_proxy_package_results_total')
  t.match(results, /result="miss"} 1/)
  t.match(results, /result="coalesced"} 9/)
  await waitCached(h, image.manifestDigest, image.lastLayer.digest)
  t.equal(h.proxy.packages.index?.blobCount, 1)
})

void t.test('requests that join a running fill late still get every byte, ranges included', async (t) => {
  const h = await startHarness(t)
  const data = bytes(48 * 1024, 9)
  const image = h.registry.addImage(DEFAULT_PREFIX, [data])
  h.registry.faults = { blobChunkSize: 4096, blobChunkDelayMs: 15 }
  const url = packageUrl({ digest: image.manifestDigest })
  const first = h.proxy.server.inject(url)
  await h.registry.waitForRequests(1, (r) => r.url.includes('/blobs/'))
  await eventually(() => h.proxy.packages.index !== undefined && readdirSync(join(h.cacheDirectory, 'tmp')).length === 1, 'the fill has a temp file', {
    intervalMs: 5,
  })
  const [late, lateRange] = await Promise.all([h.proxy.server.inject(url), h.proxy.server.inject({ url, headers: { range: 'bytes=40000-40009' } })])
  t.ok((await first).rawPayload.equals(data))
  t.ok(late.rawPayload.equals(data))
  t.equal(lateRange.statusCode, 206)
  t.ok(lateRange.rawPayload.equals(data.subarray(40000, 40010)))
  t.equal(h.registry.counts.blob, 1)
})

void t.test('a client that disconnects early does not stop the fill; the layer gets cached', async (t) => {
  const h = await startHarness(t)
  const data = bytes(64 * 1024, 10)
  const image = h.registry.addImage(DEFAULT_PREFIX, [data])
  h.registry.faults = { blobChunkSize: 4096, blobChunkDelayMs: 25 }
  await h.proxy.server.start()
  const url = `${h.proxy.server.info.uri}${packageUrl({ digest: image.manifestDigest })}`

  const aborted = await fetchRaw(url, { abortAfter: 1 })
  t.equal(aborted.status, 200)
  t.ok(aborted.body.length < data.length, `the client left after ${aborted.body.length} bytes`)
  t.equal(h.proxy.packages.service.activeFills, 1, 'the fill is still running')

  await waitCached(h, image.manifestDigest, image.lastLayer.digest)
  const hex = image.lastLayer.digest.slice('sha256:'.length)
  t.ok(readFileSync(join(h.cacheDirectory, 'blobs', 'sha256', hex.slice(0, 2), hex)).equals(data))
  t.equal(h.registry.counts.blob, 1)

  h.registry.resetCounts()
  h.registry.faults = {}
  const hit = await fetchRaw(url)
  t.equal(hit.status, 200)
  t.ok(hit.complete)
  t.ok(hit.body.equals(data))
  t.equal(h.registry.counts.total, 0, 'served from the cache')
})

void t.test('every client disconnecting during a fill: the fill still completes', async (t) => {
  const h = await startHarness(t)
  const data = bytes(40 * 1024, 11)
  const image = h.registry.addImage(DEFAULT_PREFIX, [data])
  h.registry.faults = { blobChunkSize: 4096, blobChunkDelayMs: 10 }
  await h.proxy.server.start()
  const url = `${h.proxy.server.info.uri}${packageUrl({ digest: image.manifestDigest })}`
  const replies = await Promise.all([fetchRaw(url, { abortAfter: 1 }), fetchRaw(url, { abortAfter: 5000 }), fetchRaw(url, { abortAfter: 9000 })])
  for (const r of replies) t.notOk(r.complete, 'each client left early')
  await waitCached(h, image.manifestDigest, image.lastLayer.digest)
  t.equal(h.registry.counts.blob, 1)
  t.same(readdirSync(join(h.cacheDirectory, 'tmp')), [])
})

void t.test('a request arriving right after a fill failed starts a new fill', async (t) => {
  const h = await startHarness(t)
  const data = bytes(30_000, 12)
  const image = h.registry.addImage(DEFAULT_PREFIX, [data])
  const service = h.proxy.packages.service
  const source = h.proxy.sources.match(undefined)
  const pkg = await service.resolve(source, DEFAULT_PREFIX, image.manifestDigest)
  t.equal(pkg.cached, false)

  h.registry.faults = { corruptBlob: true }
  const first = await service.open(source, DEFAULT_PREFIX, pkg, 0, data.length - 1)
  const second = await new Promise<{ data: Buffer; error: Error | undefined }>((resolve) => {
    first.stream.on('error', () => {
      // The registry is healthy again, and a client asks at once, before the failed fill's
      // clean-up (a temp file unlink) has finished.
      h.registry.faults = {}
      service.open(source, DEFAULT_PREFIX, pkg, 0, data.length - 1).then(
        (b) => resolve(collect(b.stream)),
        (err: unknown) => resolve({ data: Buffer.alloc(0), error: err as Error }),
      )
    })
    first.stream.resume()
  })
  t.equal(second.error, undefined, 'the new request does not inherit the failure of a fill that had already failed')
  t.ok(second.data.equals(data), 'and gets the right bytes')
  t.equal(h.registry.counts.blob, 2, 'from a new upstream fetch')
})

void t.test('remove() forgets a cached package; the next request is a miss', async (t) => {
  const h = await startHarness(t)
  const image = h.registry.addImage(DEFAULT_PREFIX, [bytes(5000, 13)])
  const url = packageUrl({ digest: image.manifestDigest })
  t.equal((await h.proxy.server.inject(url)).statusCode, 200)
  await waitCached(h, image.manifestDigest, image.lastLayer.digest)
  const service = h.proxy.packages.service
  t.equal(await service.remove(image.manifestDigest), true, 'removed by manifest digest')
  t.equal(h.proxy.packages.index?.blob(image.lastLayer.digest), undefined)
  // The fill that wrote the file may still hold it for a moment (its lease ends when it closes).
  await service.settled()
  t.same(blobFiles(h.cacheDirectory), [], 'the file is gone')
  t.equal(h.proxy.packages.index?.usedBytes, 0)
  t.equal(service.cache?.usedBytes, 0)
  t.equal(await service.remove(image.manifestDigest), false, 'a second remove finds nothing')

  h.registry.resetCounts()
  const again = await h.proxy.server.inject(url)
  t.ok(again.rawPayload.equals(image.lastLayer.data))
  t.equal(h.registry.counts.blob, 1, 'fetched again')
  await waitCached(h, image.manifestDigest, image.lastLayer.digest)
  t.equal(await service.remove(image.lastLayer.digest), true, 'removed by layer digest')
})

void t.test('stopping the server during a fill aborts it and leaves no temp file', async (t) => {
  const h = await startHarness(t)
  const image = h.registry.addImage(DEFAULT_PREFIX, [bytes(64 * 1024, 14)])
  h.registry.faults = { blobChunkSize: 1024, blobChunkDelayMs: 50 }
  await h.proxy.server.start()
  const reply = fetchRaw(`${h.proxy.server.info.uri}${packageUrl({ digest: image.manifestDigest })}`, { abortAfter: 1 })
  await reply
  t.equal(h.proxy.packages.service.activeFills, 1)
  const started = Date.now()
  await h.stop()
  t.ok(Date.now() - started < 2500, 'stop did not wait for the slow registry')
  t.same(readdirSync(join(h.cacheDirectory, 'tmp')), [], 'the partial file is removed')
  t.same(blobFiles(h.cacheDirectory), [], 'nothing is cached')
})

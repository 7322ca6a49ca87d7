import { existsSync } from 'node:fs'
import { mkdir, writeFile } from 'node:fs/promises'
import { dirname } from 'node:path'
import t, { type Test } from 'tap'
import { BlobStore } from '../../../plugins/packages/blob-store.js'
import { CacheIndex } from '../../../plugins/packages/cache-index.js'
import { SpaceManager } from '../../../plugins/packages/space-manager.js'
import { DEFAULT_PREFIX, blobFiles, bytes, packageUrl, sha256, startHarness, until, waitCached, type Harness } from '../../fixtures/proxy-harness.js'

const silent = { info: () => undefined, warn: () => undefined, error: () => undefined }

async function openCache(t: Test): Promise<{ index: CacheIndex; store: BlobStore; put: (seed: number, size: number, lastAccess: number) => Promise<string> }> {
  const dir = t.testdir()
  const store = new BlobStore(dir)
  await store.init()
  const index = await CacheIndex.open(dir)
  t.teardown(() => index.close())
  const put = async (seed: number, size: number, lastAccess: number): Promise<string> => {
    const data = bytes(size, seed)
    const digest = sha256(data)
    const path = store.pathFor(digest)
    await mkdir(dirname(path), { recursive: true })
    await writeFile(path, data)
    await index.putBlob({ digest, size, lastAccess, hits: 0, createdAt: lastAccess })
    return digest
  }
  return { index, store, put }
}

/** Waits for the wall clock to move, so access times of successive steps differ. */
async function tick(): Promise<void> {
  const start = Date.now()
  await until(() => Date.now() > start + 1, 'the clock ticked')
}

void t.test('eviction through the server: the limit holds after every request, LRU goes first', async (t) => {
  const size = 10_000
  const limit = 3 * size + 500
  const h = await startHarness(t, { limitBytes: limit })
  const images = [0, 1, 2, 3, 4].map((i) => h.registry.addImage(DEFAULT_PREFIX, [bytes(size, 100 + i)]))
  const layer = (i: number): string => images[i]?.lastLayer.digest ?? ''
  const fetch = async (i: number): Promise<void> => {
    const image = images[i]
    if (!image) throw new Error('no image')
    const res = await h.proxy.server.inject(packageUrl({ digest: image.manifestDigest }))
    t.equal(res.statusCode, 200)
    t.ok(res.rawPayload.equals(image.lastLayer.data), `image ${i} byte-exact`)
    await waitCached(h, image.manifestDigest, image.lastLayer.digest)
    assertWithinLimit(t, h, limit)
    await tick()
  }
  await fetch(0)
  await fetch(1)
  await fetch(2)
  t.equal(h.proxy.packages.index?.blobCount, 3, 'three fit')
  h.registry.resetCounts()
  await fetch(0)
  t.equal(h.registry.counts.blob, 0, 'image 0 was a hit, and is now the most recently used')

  await fetch(3)
  t.ok(h.proxy.packages.index?.blob(layer(0)), 'the recently used entry stays')
  t.equal(h.proxy.packages.index?.blob(layer(1)), undefined, 'the least recently used entry went')
  t.ok(h.proxy.packages.index?.blob(layer(2)))
  t.ok(h.proxy.packages.index?.blob(layer(3)))

  await fetch(4)
  t.equal(h.proxy.packages.index?.blob(layer(2)), undefined, 'then the next least recently used')
  t.same(
    new Set(h.proxy.packages.index?.blobs().map((b) => b.digest)),
    new Set([layer(0), layer(3), layer(4)]),
  )
  t.equal(h.proxy.packages.index?.manifest(images[1]?.manifestDigest ?? ''), undefined, 'the evicted layer took its manifest row along')
  t.equal(h.proxy.packages.service.space?.evictions, 2)

  h.registry.resetCounts()
  await fetch(1)
  t.equal(h.registry.counts.blob, 1, 'an evicted package is fetched again')
  t.equal(h.registry.counts.manifest, 1, 'and its manifest too')
  const metrics = await h.proxy.metrics.registry.getSingleMetricAsString('registry_packages_proxy_cache_size')
  t.match(metrics, new RegExp(`registry_packages_proxy_cache_size ${3 * size}\\b`))
})

function assertWithinLimit(t: Test, h: Harness, limit: number): void {
  const index = h.proxy.packages.index
  const space = h.proxy.packages.service.space
  t.ok((index?.usedBytes ?? 0) <= limit, `index bytes ${index?.usedBytes} <= ${limit}`)
  t.equal(space?.usedBytes, index?.usedBytes, 'the space manager and the index agree')
  t.equal(blobFiles(h.cacheDirectory).length, index?.blobCount, 'one file per row')
}

void t.test('concurrent cold fills never push the cache over its limit', async (t) => {
  const size = 8_000
  const limit = 2 * size + 100
  const h = await startHarness(t, { limitBytes: limit })
  const images = [0, 1, 2, 3, 4, 5].map((i) => h.registry.addImage(DEFAULT_PREFIX, [bytes(size, 200 + i)]))
  h.registry.faults = { blobChunkSize: 2000, blobChunkDelayMs: 5 }
  let peak = 0
  const sampler = setInterval(() => {
    const space = h.proxy.packages.service.space
    peak = Math.max(peak, (space?.usedBytes ?? 0) + (space?.reservedBytes ?? 0))
  }, 1)
  t.teardown(() => clearInterval(sampler))
  const replies = await Promise.all(images.map((image) => h.proxy.server.inject(packageUrl({ digest: image.manifestDigest }))))
  replies.forEach((r, i) => t.ok(r.rawPayload.equals(images[i]?.lastLayer.data ?? Buffer.alloc(0)), `reply ${i} byte-exact`))
  await until(() => h.proxy.packages.service.activeFills === 0, 'all fills are over')
  clearInterval(sampler)
  t.ok(peak <= limit, `used + reserved peaked at ${peak} <= ${limit}`)
  assertWithinLimit(t, h, limit)
})

void t.test('SpaceManager: reserve, commit and release keep exact accounts', async (t) => {
  const { index, store, put } = await openCache(t)
  await put(1, 100, 1000)
  const space = new SpaceManager(index, store, 300, silent)
  t.equal(space.usedBytes, 100, 'starts from the index')
  const r = space.reserve(150)
  if (!r) throw new Error('expected a reservation')
  await r.ready
  t.equal(space.reservedBytes, 150)
  r.commit()
  r.release()
  t.equal(space.reservedBytes, 0)
  t.equal(space.usedBytes, 250, 'committed bytes count as used')
  const r2 = space.reserve(50)
  r2?.release()
  r2?.release()
  r2?.commit()
  t.equal(space.reservedBytes, 0, 'release is idempotent, and commit after release is ignored')
  t.equal(space.usedBytes, 250)
  t.equal(space.reserve(301), undefined, 'larger than the limit: not cacheable')
  t.equal(space.evictions, 0)
})

void t.test('SpaceManager: evicts least recently used entries first', async (t) => {
  const { index, store, put } = await openCache(t)
  const a = await put(1, 100, 1000)
  const b = await put(2, 100, 3000)
  const c = await put(3, 100, 2000)
  const space = new SpaceManager(index, store, 300, silent)
  const r = space.reserve(150)
  if (!r) throw new Error('expected a reservation')
  await r.ready
  t.equal(index.blob(a), undefined, 'oldest gone')
  t.equal(index.blob(c), undefined, 'second oldest gone')
  t.ok(index.blob(b), 'newest kept')
  t.notOk(existsSync(store.pathFor(a)))
  t.notOk(existsSync(store.pathFor(c)))
  t.ok(existsSync(store.pathFor(b)))
  t.equal(space.usedBytes, 100)
  t.equal(space.evictions, 2)
  t.equal(space.evictedBytes, 200)
  r.release()
})

void t.test('SpaceManager: pinned entries are never evicted', async (t) => {
  const { index, store, put } = await openCache(t)
  const a = await put(1, 100, 1000)
  const b = await put(2, 100, 2000)
  const c = await put(3, 100, 3000)
  const space = new SpaceManager(index, store, 300, silent)
  space.pin(a)
  space.pin(a)
  const r = space.reserve(100)
  if (!r) throw new Error('expected a reservation')
  await r.ready
  t.ok(index.blob(a), 'the pinned LRU entry stays')
  t.ok(existsSync(store.pathFor(a)))
  t.equal(index.blob(b), undefined, 'the next one goes instead')
  r.release()
  t.equal(space.usedBytes, 200)

  space.pin(c)
  t.equal(space.reserve(200), undefined, 'no space that is not being read: stream through')
  t.equal(space.reservedBytes, 0)
  space.unpin(a)
  t.equal(space.reserve(200), undefined, 'still pinned once')
  space.unpin(a)
  const r2 = space.reserve(200)
  t.ok(r2, 'unpinned: evictable again')
  await r2?.ready
  t.equal(index.blob(a), undefined)
  t.ok(index.blob(c), 'c is still pinned')
  r2?.release()
})

void t.test('SpaceManager: removing an entry being read deletes the file only after the reader', async (t) => {
  const { index, store, put } = await openCache(t)
  const a = await put(1, 100, 1000)
  const space = new SpaceManager(index, store, 1000, silent)
  space.pin(a)
  t.equal(await space.evict(a), true)
  t.equal(index.blob(a), undefined, 'the row goes at once: no new reader finds it')
  t.ok(existsSync(store.pathFor(a)), 'the file stays for its reader')
  t.equal(await space.evict(a), false, 'already gone')
  space.unpin(a)
  await until(() => !existsSync(store.pathFor(a)), 'the file is deleted after the reader')
  await until(() => space.usedBytes === 0, 'and its bytes are free')

  const b = await put(2, 100, 2000)
  t.equal(await space.evict(b), true, 'not pinned: removed at once')
  t.notOk(existsSync(store.pathFor(b)))
  t.equal(await space.evict(`sha256:${'e'.repeat(64)}`), false, 'unknown digest')
})

void t.test('SpaceManager: trim() fits a cache to a smaller limit, LRU first', async (t) => {
  const { index, store, put } = await openCache(t)
  const a = await put(1, 100, 1000)
  const b = await put(2, 100, 2000)
  const c = await put(3, 100, 3000)
  const space = new SpaceManager(index, store, 150, silent)
  t.equal(await space.trim(), 2)
  t.same(index.blobs().map((e) => e.digest), [c])
  t.notOk(existsSync(store.pathFor(a)))
  t.notOk(existsSync(store.pathFor(b)))
  t.equal(space.usedBytes, 100)
  t.equal(await space.trim(), 0, 'nothing more to do')
})

void t.test('a smaller limit at start-up trims the cache before serving', async (t) => {
  const first = await startHarness(t, { limitBytes: 100_000 })
  const images = [0, 1, 2].map((i) => first.registry.addImage(DEFAULT_PREFIX, [bytes(10_000, 300 + i)]))
  for (const image of images) {
    t.equal((await first.proxy.server.inject(packageUrl({ digest: image.manifestDigest }))).statusCode, 200)
    await waitCached(first, image.manifestDigest, image.lastLayer.digest)
    await tick()
  }
  await first.stop()
  const second = await startHarness(t, { registry: first.registry, dir: first.dir, limitBytes: 15_000 })
  t.equal(second.proxy.packages.index?.blobCount, 1, 'only what fits is left')
  t.ok(second.proxy.packages.index?.blob(images[2]?.lastLayer.digest ?? ''), 'the most recently used one')
  assertWithinLimit(t, second, 15_000)
})

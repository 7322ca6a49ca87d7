import { existsSync } from 'node:fs'
import { mkdir, writeFile } from 'node:fs/promises'
import { dirname } from 'node:path'
import t, { type Test } from 'tap'
import { BlobStore, type TempFile } from '../../../../plugins/packages/cache/blob-store.js'
import { CacheIndex } from '../../../../plugins/packages/cache/cache-index.js'
import { BlobCache } from '../../../../plugins/packages/cache/blob-cache.js'
import { DEFAULT_PREFIX, blobFiles, bytes, packageUrl, sha256, startHarness, waitCached, type Harness } from '../../../fixtures/proxy-harness.js'
import { eventually } from '../../../fixtures/eventually.js'

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
  await eventually(() => Date.now() > start + 1, 'the clock ticked', { intervalMs: 5 })
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
  t.same(new Set(h.proxy.packages.index?.blobs().map((b) => b.digest)), new Set([layer(0), layer(3), layer(4)]))
  t.equal(h.proxy.packages.index?.manifest(images[1]?.manifestDigest ?? ''), undefined, 'the evicted layer took its manifest row along')
  t.equal(h.proxy.packages.service.cache?.removals.evicted.count, 2)

  h.registry.resetCounts()
  await fetch(1)
  t.equal(h.registry.counts.blob, 1, 'an evicted package is fetched again')
  t.equal(h.registry.counts.manifest, 1, 'and its manifest too')
  const metrics = await h.proxy.metrics.registry.getSingleMetricAsString('registry_packages_proxy_cache_size')
  t.match(metrics, new RegExp(`registry_packages_proxy_cache_size ${3 * size}\\b`))
})

function assertWithinLimit(t: Test, h: Harness, limit: number): void {
  const index = h.proxy.packages.index
  const space = h.proxy.packages.service.cache
  t.ok((index?.usedBytes ?? 0) <= limit, `index bytes ${index?.usedBytes} <= ${limit}`)
  t.equal(space?.usedBytes, index?.usedBytes, 'the cache owner and the index agree')
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
    const space = h.proxy.packages.service.cache
    peak = Math.max(peak, space?.occupiedBytes ?? 0)
  }, 1)
  t.teardown(() => clearInterval(sampler))
  const replies = await Promise.all(images.map((image) => h.proxy.server.inject(packageUrl({ digest: image.manifestDigest }))))
  replies.forEach((r, i) => t.ok(r.rawPayload.equals(images[i]?.lastLayer.data ?? Buffer.alloc(0)), `reply ${i} byte-exact`))
  await eventually(() => h.proxy.packages.service.activeFills === 0, 'all fills are over', { intervalMs: 5 })
  clearInterval(sampler)
  t.ok(peak <= limit, `used + reserved peaked at ${peak} <= ${limit}`)
  assertWithinLimit(t, h, limit)
})

/** A temp file written with `data`, as a fill leaves it before the commit. */
async function tempWith(store: BlobStore, data: Buffer): Promise<{ path: string; handle: TempFile }> {
  const temp = await store.createTemp()
  await temp.handle.write(data, 0, data.length, 0)
  return temp
}

void t.test('BlobCache: reserve, commit and release keep exact accounts', async (t) => {
  const { index, store, put } = await openCache(t)
  await put(1, 100, 1000)
  const cache = new BlobCache({ index, store, limit: 300, log: silent })
  t.equal(cache.usedBytes, 100, 'starts from the index')
  const data = bytes(150, 9)
  const r = cache.reserve(150)
  if (!r) throw new Error('expected a reservation')
  await r.ready
  t.equal(cache.reservedBytes, 150)
  const temp = await tempWith(store, data)
  const lease = await cache.commit(r, temp, sha256(data))
  await temp.handle.close()
  r.release()
  t.equal(cache.reservedBytes, 0, 'the reservation became the entry')
  t.equal(cache.usedBytes, 250, 'committed bytes count as used, once')
  t.ok(existsSync(store.pathFor(sha256(data))), 'the file is under its digest')
  lease.release()
  lease.release()
  const r2 = cache.reserve(50)
  r2?.release()
  r2?.release()
  t.equal(cache.reservedBytes, 0, 'release is idempotent')
  t.equal(cache.usedBytes, 250)
  t.equal(cache.reserve(301), undefined, 'larger than the limit: not cacheable')
  t.equal(cache.removals.evicted.count, 0)
})

void t.test('BlobCache: evicts least recently used entries first', async (t) => {
  const { index, store, put } = await openCache(t)
  const a = await put(1, 100, 1000)
  const b = await put(2, 100, 3000)
  const c = await put(3, 100, 2000)
  const cache = new BlobCache({ index, store, limit: 300, log: silent })
  const r = cache.reserve(150)
  if (!r) throw new Error('expected a reservation')
  t.notOk(cache.has(a), 'a victim leaves service at once, before any I/O')
  await r.ready
  await cache.settled()
  t.equal(index.blob(a), undefined, 'oldest gone')
  t.equal(index.blob(c), undefined, 'second oldest gone')
  t.ok(index.blob(b), 'newest kept')
  t.notOk(existsSync(store.pathFor(a)))
  t.notOk(existsSync(store.pathFor(c)))
  t.ok(existsSync(store.pathFor(b)))
  t.equal(cache.usedBytes, 100)
  t.same(cache.removals.evicted, { count: 2, bytes: 200 })
  r.release()
})

void t.test('BlobCache: leased entries are never evicted', async (t) => {
  const { index, store, put } = await openCache(t)
  const a = await put(1, 100, 1000)
  const b = await put(2, 100, 2000)
  const c = await put(3, 100, 3000)
  const cache = new BlobCache({ index, store, limit: 300, log: silent })
  const la1 = cache.acquire(a)
  const la2 = cache.acquire(a)
  const r = cache.reserve(100)
  if (!r) throw new Error('expected a reservation')
  await r.ready
  await cache.settled()
  t.ok(index.blob(a), 'the leased LRU entry stays')
  t.ok(existsSync(store.pathFor(a)))
  t.equal(index.blob(b), undefined, 'the next one goes instead')
  r.release()
  t.equal(cache.usedBytes, 200)

  const lc = cache.acquire(c)
  t.equal(cache.reserve(200), undefined, 'no space that is not being read: serve uncached')
  t.equal(cache.reservedBytes, 0)
  la1?.release()
  t.equal(cache.reserve(200), undefined, 'still leased once')
  la2?.release()
  const r2 = cache.reserve(200)
  t.ok(r2, 'released: evictable again')
  await r2?.ready
  await cache.settled()
  t.equal(index.blob(a), undefined)
  t.ok(index.blob(c), 'c is still leased')
  r2?.release()
  lc?.release()
})

void t.test('BlobCache: removing an entry being read keeps its bytes counted until the reader lets go', async (t) => {
  const { index, store, put } = await openCache(t)
  const a = await put(1, 100, 1000)
  const cache = new BlobCache({ index, store, limit: 1000, log: silent })
  const lease = cache.acquire(a)
  const removing = cache.remove(a, 'deleted')
  t.notOk(cache.has(a), 'out of service at once: no new reader finds it')
  t.equal(cache.acquire(a), undefined)
  t.equal(await removing, true)
  t.equal(index.blob(a), undefined, 'the row is gone')
  t.ok(existsSync(store.pathFor(a)), 'the file stays for its reader')
  t.equal(cache.usedBytes, 0, 'no longer a live entry')
  t.equal(cache.heldBytes, 100, 'but its bytes are still on disk, and counted')
  t.equal(await cache.remove(a, 'deleted'), false, 'already gone')
  lease?.release()
  await cache.settled()
  t.notOk(existsSync(store.pathFor(a)), 'the file is deleted after the reader')
  t.equal(cache.heldBytes, 0, 'and its bytes are free')
  t.same(cache.removals.deleted, { count: 1, bytes: 100 }, 'counted as a removal, with its bytes')

  const b = await put(2, 100, 2000)
  const cache2 = new BlobCache({ index, store, limit: 1000, log: silent })
  t.equal(await cache2.remove(b, 'deleted'), true, 'not leased: removed at once')
  await cache2.settled()
  t.notOk(existsSync(store.pathFor(b)))
  t.equal(await cache2.remove(`sha256:${'e'.repeat(64)}`, 'deleted'), false, 'unknown digest')
})

void t.test('BlobCache: a refill while the removed file is still read counts both until each is let go', async (t) => {
  const { index, store, put } = await openCache(t)
  const data = bytes(100, 1)
  const a = await put(1, 100, 1000)
  const cache = new BlobCache({ index, store, limit: 1000, log: silent })
  const old = cache.acquire(a)
  await cache.remove(a, 'deleted')
  const r = cache.reserve(100)
  if (!r) throw new Error('expected a reservation')
  await r.ready
  const temp = await tempWith(store, data)
  const lease = await cache.commit(r, temp, a)
  await temp.handle.close()
  t.equal(cache.usedBytes, 100, 'the new entry')
  t.equal(cache.heldBytes, 100, 'the old file, still open')
  old?.release()
  await cache.settled()
  t.equal(cache.heldBytes, 0, 'the old bytes are free once its reader is done')
  t.ok(existsSync(store.pathFor(a)), 'and the new file was not deleted in its place')
  t.ok(index.blob(a), 'nor its row')
  lease.release()
  t.equal(cache.usedBytes, 100)
})

void t.test('BlobCache: a refill committed while the removed file is still being unlinked keeps the new file', async (t) => {
  const { index, store, put } = await openCache(t)
  const data = bytes(100, 1)
  const a = await put(1, 100, 1000)
  // Unlinks wait for the test's word: the old file's removal is still queued when the refill commits.
  let open!: () => void
  const gate = new Promise<void>((resolve) => (open = resolve))
  let renamed!: () => void
  const didRename = new Promise<void>((resolve) => (renamed = resolve))
  const slowStore = {
    pathFor: (d: string) => store.pathFor(d),
    commit: async (temp: { path: string; handle: TempFile }, d: string) => {
      const path = await store.commit(temp, d)
      renamed()
      return path
    },
    remove: async (d: string) => {
      await gate
      await store.remove(d)
    },
  }
  const cache = new BlobCache({ index, store: slowStore, limit: 1000, log: silent })
  const removing = cache.remove(a, 'deleted')
  const r = cache.reserve(100)
  if (!r) throw new Error('expected a reservation')
  await r.ready
  const temp = await tempWith(store, data)
  const committing = cache.commit(r, temp, a)
  // The unlink must not overtake the rename: give the rename every chance to go first (it
  // must wait for the unlink, so it does not come, and the bound ends the wait).
  await Promise.race([didRename, new Promise((resolve) => setTimeout(resolve, 300))])
  open()
  await removing
  const lease = await committing
  await temp.handle.close()
  await cache.settled()
  t.ok(existsSync(store.pathFor(a)), 'the refilled file is on disk')
  t.ok(cache.has(a) && index.blob(a), 'and in service, with its row')
  t.equal(cache.usedBytes, 100)
  t.equal(cache.heldBytes, 0)
  lease.release()
})

void t.test('BlobCache: trim() fits a cache to a smaller limit, LRU first', async (t) => {
  const { index, store, put } = await openCache(t)
  const a = await put(1, 100, 1000)
  const b = await put(2, 100, 2000)
  const c = await put(3, 100, 3000)
  const cache = new BlobCache({ index, store, limit: 150, log: silent })
  t.equal(await cache.trim(), 2)
  t.same(
    index.blobs().map((e) => e.digest),
    [c],
  )
  t.notOk(existsSync(store.pathFor(a)))
  t.notOk(existsSync(store.pathFor(b)))
  t.equal(cache.usedBytes, 100)
  t.equal(await cache.trim(), 0, 'nothing more to do')
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

import { existsSync, readdirSync } from 'node:fs'
import { mkdir, utimes, writeFile } from 'node:fs/promises'
import { dirname, join } from 'node:path'
import t, { type Test } from 'tap'
import { BlobStore } from '../../../../plugins/packages/cache/blob-store.js'
import { CacheIndex } from '../../../../plugins/packages/cache/cache-index.js'
import { reconcile } from '../../../../plugins/packages/cache/reconcile.js'
import { DEFAULT_PREFIX, blobFiles, bytes, packageUrl, sha256, startHarness } from '../../../fixtures/proxy-harness.js'

async function openCache(t: Test, dir = t.testdir()): Promise<{ dir: string; index: CacheIndex; store: BlobStore }> {
  const store = new BlobStore(dir)
  await store.init()
  const index = await CacheIndex.open(dir)
  t.teardown(() => index.close())
  return { dir, index, store }
}

async function writeBlob(store: BlobStore, data: Buffer, digest = sha256(data)): Promise<string> {
  const path = store.pathFor(digest)
  await mkdir(dirname(path), { recursive: true })
  await writeFile(path, data)
  return digest
}

void t.test('a clean cache is left alone', async (t) => {
  const { index, store } = await openCache(t)
  const data = bytes(100, 1)
  const digest = await writeBlob(store, data)
  await index.putBlob({ digest, size: 100, lastAccess: 5, hits: 2, createdAt: 1 })
  await index.putManifest({ digest: `sha256:${'a'.repeat(64)}`, layerDigest: digest, layerMediaType: 'x' })
  const report = await reconcile(index, store)
  t.same(report, { tempRemoved: 0, rowsDropped: 0, orphansAdopted: 0, orphansDeleted: 0, sizeFixed: 0 })
  t.same(index.blob(digest), { digest, size: 100, lastAccess: 5, hits: 2, createdAt: 1 })
  t.ok(index.manifest(`sha256:${'a'.repeat(64)}`))
})

void t.test('temp files of a dead process are deleted', async (t) => {
  const { index, store } = await openCache(t)
  await writeFile(join(store.tmpDir, '123-abc.partial'), bytes(50))
  await writeFile(join(store.tmpDir, 'other'), 'x')
  await mkdir(join(store.tmpDir, 'a-dir'))
  const report = await reconcile(index, store)
  t.equal(report.tempRemoved, 3)
  t.same(readdirSync(store.tmpDir), [])
})

void t.test('a row whose file is missing is dropped, with its manifests', async (t) => {
  const { index, store } = await openCache(t)
  const missing = sha256(bytes(10, 2))
  await index.putBlob({ digest: missing, size: 10, lastAccess: 1, hits: 0, createdAt: 1 })
  await index.putManifest({ digest: `sha256:${'b'.repeat(64)}`, layerDigest: missing, layerMediaType: 'x' })
  const report = await reconcile(index, store)
  t.equal(report.rowsDropped, 1)
  t.equal(report.sizeFixed, 0)
  t.equal(index.blob(missing), undefined)
  t.equal(index.manifest(`sha256:${'b'.repeat(64)}`), undefined)
  t.equal(index.usedBytes, 0)
})

void t.test('a row whose file has another size: both go', async (t) => {
  const { index, store } = await openCache(t)
  const data = bytes(100, 3)
  const digest = await writeBlob(store, data.subarray(0, 60), sha256(data))
  await index.putBlob({ digest, size: 100, lastAccess: 1, hits: 0, createdAt: 1 })
  const report = await reconcile(index, store)
  t.equal(report.rowsDropped, 1)
  t.equal(report.sizeFixed, 1)
  t.equal(index.blob(digest), undefined)
  t.notOk(existsSync(store.pathFor(digest)))
})

void t.test('an orphan file that hashes to its name is adopted', async (t) => {
  const { index, store } = await openCache(t)
  const data = bytes(1234, 4)
  const digest = await writeBlob(store, data)
  const report = await reconcile(index, store, 42_000)
  t.equal(report.orphansAdopted, 1)
  t.same(index.blob(digest), { digest, size: 1234, lastAccess: 42_000, hits: 0, createdAt: 42_000 })
  t.equal(index.usedBytes, 1234)
  t.ok(existsSync(store.pathFor(digest)))
})

void t.test("adopted orphans keep their files' age as last access, so the LRU order survives a rebuilt index", async (t) => {
  const { index, store } = await openCache(t)
  const now = Date.now()
  const older = await writeBlob(store, bytes(100, 41))
  const newer = await writeBlob(store, bytes(100, 42))
  const future = await writeBlob(store, bytes(100, 43))
  await utimes(store.pathFor(older), new Date(now - 3_600_000), new Date(now - 3_600_000))
  await utimes(store.pathFor(newer), new Date(now - 60_000), new Date(now - 60_000))
  // A clock that was ahead when the file was written: capped at now, never in the future.
  await utimes(store.pathFor(future), new Date(now + 3_600_000), new Date(now + 3_600_000))
  const report = await reconcile(index, store, now)
  t.equal(report.orphansAdopted, 3)
  t.equal(index.blob(older)?.lastAccess, now - 3_600_000)
  t.equal(index.blob(newer)?.lastAccess, now - 60_000)
  t.equal(index.blob(future)?.lastAccess, now)
  t.same(
    index
      .blobs()
      .sort((a, b) => a.lastAccess - b.lastAccess)
      .map((b) => b.digest),
    [older, newer, future],
    'least recently used first',
  )
})

void t.test('an orphan file with wrong content is deleted', async (t) => {
  const { index, store } = await openCache(t)
  const data = bytes(500, 5)
  const digest = await writeBlob(store, Buffer.from('not these bytes'), sha256(data))
  const report = await reconcile(index, store)
  t.equal(report.orphansDeleted, 1)
  t.equal(report.orphansAdopted, 0)
  t.equal(index.blob(digest), undefined)
  t.notOk(existsSync(store.pathFor(digest)))
})

void t.test('junk under blobs/ is deleted', async (t) => {
  const { index, store } = await openCache(t)
  const good = await writeBlob(store, bytes(10, 6))
  const hex = sha256(bytes(11, 7)).slice('sha256:'.length)
  await mkdir(join(store.blobsDir, 'zz'), { recursive: true })
  await writeFile(join(store.blobsDir, 'zz', 'junk-name'), 'x')
  await writeFile(join(store.blobsDir, 'not-a-shard'), 'x')
  // A real digest name in the wrong shard directory.
  const wrongShard = hex.startsWith('00') ? '01' : '00'
  await mkdir(join(store.blobsDir, wrongShard), { recursive: true })
  await writeFile(join(store.blobsDir, wrongShard, hex), bytes(11, 7))
  await mkdir(join(store.blobsDir, 'ff'), { recursive: true })
  await writeFile(join(store.blobsDir, 'ff', 'F'.repeat(64)), 'x')
  const report = await reconcile(index, store)
  t.equal(report.orphansDeleted, 4)
  t.equal(report.orphansAdopted, 1, 'the good file is kept')
  t.same(blobFiles(join(store.blobsDir, '..', '..')), [`sha256/${good.slice(7, 9)}/${good.slice(7)}`])
})

void t.test('dangling manifest rows are dropped', async (t) => {
  const { index, store } = await openCache(t)
  await index.putManifest({ digest: `sha256:${'c'.repeat(64)}`, layerDigest: `sha256:${'d'.repeat(64)}`, layerMediaType: 'x' })
  await reconcile(index, store)
  t.equal(index.manifest(`sha256:${'c'.repeat(64)}`), undefined)
})

void t.test('reconciled state survives a reopen of the index', async (t) => {
  const dir = t.testdir()
  const first = await openCache(t, dir)
  const kept = await writeBlob(first.store, bytes(300, 8))
  const lost = sha256(bytes(10, 9))
  await first.index.putBlob({ digest: lost, size: 10, lastAccess: 1, hits: 0, createdAt: 1 })
  await reconcile(first.index, first.store, 7)
  await first.index.close()
  const second = await openCache(t, dir)
  t.same(
    second.index.blobs().map((b) => b.digest),
    [kept],
  )
  t.same(await reconcile(second.index, second.store), { tempRemoved: 0, rowsDropped: 0, orphansAdopted: 0, orphansDeleted: 0, sizeFixed: 0 })
})

void t.test('the server reconciles at start: an adopted orphan is served without a blob request', async (t) => {
  const dir = t.testdir()
  const registry = (await startHarness(t)).registry
  const image = registry.addImage(DEFAULT_PREFIX, [bytes(2000, 10)])
  const store = new BlobStore(join(dir, 'cache'))
  await store.init()
  await writeBlob(store, image.lastLayer.data)
  await writeFile(join(store.tmpDir, 'crashed.partial'), bytes(100))
  const h = await startHarness(t, { registry, dir })
  t.ok(h.proxy.packages.index?.blob(image.lastLayer.digest), 'adopted at start')
  t.same(readdirSync(store.tmpDir), [])
  registry.resetCounts()
  const res = await h.proxy.server.inject(packageUrl({ digest: image.manifestDigest }))
  t.equal(res.statusCode, 200)
  t.ok(res.rawPayload.equals(image.lastLayer.data))
  t.equal(registry.counts.manifest, 1, 'the manifest is unknown to the index')
  t.equal(registry.counts.blob, 0, 'the layer is already here')
})

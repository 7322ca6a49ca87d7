import { existsSync, readFileSync, writeFileSync } from 'node:fs'
import t, { type Test } from 'tap'
import { BlobCache } from '../../../../plugins/packages/cache/blob-cache.js'
import { BlobStore } from '../../../../plugins/packages/cache/blob-store.js'
import { CacheIndex } from '../../../../plugins/packages/cache/cache-index.js'
import { Scrubber } from '../../../../plugins/packages/cache/scrubber.js'
import { verifyEntry } from '../../../../plugins/packages/cache/verify.js'
import { captureLogger } from '../../../fixtures/log-capture.js'
import { bytes, sha256 } from '../../../fixtures/proxy-harness.js'

/** The scrubber's timers do not keep a process alive (a server does that); a test must. */
function keepAlive(test: Test): void {
  const timer = setInterval(() => undefined, 1000)
  test.teardown(() => clearInterval(timer))
}

async function cacheWith(t: Test, files: Buffer[]): Promise<{ cache: BlobCache; store: BlobStore; index: CacheIndex; digests: string[] }> {
  const dir = t.testdir()
  const store = new BlobStore(dir)
  await store.init()
  const index = await CacheIndex.open(dir)
  t.teardown(() => index.close())
  const digests: string[] = []
  for (const data of files) {
    const digest = sha256(data)
    const temp = await store.createTemp()
    await temp.handle.write(data, 0, data.length, 0)
    await store.commit(temp, digest)
    await temp.handle.close()
    await index.putBlob({ digest, size: data.length, lastAccess: 1, hits: 0, createdAt: 1 })
    digests.push(digest)
  }
  return { cache: new BlobCache({ index, store, limit: 1 << 30, log: captureLogger('info').logger }), store, index, digests }
}

void t.test('verifyEntry: an intact file is marked verified; a damaged one is removed and counted as corrupt', async (t) => {
  const { cache, store, index, digests } = await cacheWith(t, [bytes(300_000, 1), bytes(300_000, 2)])
  const [good = '', bad = ''] = digests
  const log = captureLogger('info')
  t.equal(cache.acquire(good)?.verified, false, 'files from before the start are not verified yet')
  t.same(await verifyEntry(cache, good, { log: log.logger }), { verdict: 'intact', bytes: 300_000 })
  const lease = cache.acquire(good)
  t.equal(lease?.verified, true, 'now it is')
  lease?.release()
  const path = store.pathFor(bad)
  const data = readFileSync(path)
  data[150_000] = (data[150_000] ?? 0) ^ 0xff
  writeFileSync(path, data)
  t.same(await verifyEntry(cache, bad, { log: log.logger }), { verdict: 'corrupt', bytes: 300_000 })
  await cache.settled()
  t.notOk(cache.has(bad), 'out of service')
  t.notOk(existsSync(path), 'the file is gone')
  t.equal(index.blob(bad), undefined, 'and its row')
  t.same(cache.removals.corrupt, { count: 1, bytes: 300_000 })
  t.ok(
    log.lines().some((l) => String(l.msg).includes('does not match its digest')),
    'logged',
  )
  t.same(await verifyEntry(cache, bad, { log: log.logger }), { verdict: 'absent', bytes: 0 }, 'a digest not cached has nothing to check')
})

void t.test('Scrubber: rounds re-hash every entry at the given rate and remove what no longer matches', async (t) => {
  keepAlive(t)
  const { cache, store, digests } = await cacheWith(t, [bytes(200_000, 3), bytes(200_000, 4), bytes(200_000, 5)])
  const victim = digests[1] ?? ''
  writeFileSync(store.pathFor(victim), bytes(200_000, 99))
  const checked: Array<[number, boolean]> = []
  let corrupt!: () => void
  const found = new Promise<void>((resolve) => (corrupt = resolve))
  const scrubber = new Scrubber(cache, {
    bytesPerSecond: 100 * 1024 * 1024,
    idleMs: 0,
    log: captureLogger('info').logger,
    onChecked: (bytes, intact) => {
      checked.push([bytes, intact])
      if (!intact) corrupt()
    },
  })
  scrubber.start()
  await found
  await scrubber.stop()
  await cache.settled()
  t.notOk(cache.has(victim), 'the damaged entry is removed')
  t.ok(
    digests.filter((d) => d !== victim).every((d) => cache.has(d)),
    'the intact ones stay',
  )
  t.ok(
    checked.some(([, intact]) => intact),
    'intact entries were checked too',
  )
  t.same(cache.removals.corrupt.count, 1)
})

void t.test('Scrubber: --scrub-rate 0 never starts; a paced check keeps to its rate', async (t) => {
  keepAlive(t)
  const { cache, digests } = await cacheWith(t, [bytes(3 * 1024 * 1024, 6)])
  const off = new Scrubber(cache, { bytesPerSecond: 0, idleMs: 0, log: captureLogger('info').logger, onChecked: () => t.fail('scrubbed while off') })
  off.start()
  await off.stop()
  const began = Date.now()
  const r = await verifyEntry(cache, digests[0] ?? '', { log: captureLogger('info').logger, bytesPerSecond: 6 * 1024 * 1024 })
  const ms = Date.now() - began
  t.equal(r.verdict, 'intact')
  t.ok(ms >= 400, `3 MiB at 6 MiB/s took ${ms} ms (at least ~500 ms less rounding)`)
})

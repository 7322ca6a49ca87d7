import t from 'tap'
import { HotCache } from '../../../../plugins/packages/cache/memory-cache.js'
import { bytes, DEFAULT_PREFIX, packageUrl, startHarness } from '../../../fixtures/proxy-harness.js'

void t.test('keeps small entries within its byte budget, least recently used out first', (t) => {
  const hot = new HotCache(100, 60)
  t.notOk(hot.accepts(61), 'bigger than an entry may be')
  hot.put('a', Buffer.alloc(40))
  hot.put('b', Buffer.alloc(40))
  t.ok(hot.get('a'), 'a is now the most recently used')
  hot.put('c', Buffer.alloc(40))
  t.equal(hot.get('b'), undefined, 'b, the least recently used, made room')
  t.ok(hot.get('a'))
  t.ok(hot.get('c'))
  t.equal(hot.bytes, 80)
  hot.put('big', Buffer.alloc(61))
  t.equal(hot.get('big'), undefined, 'an oversized entry is never kept')
  hot.delete('a')
  t.equal(hot.bytes, 40)
  t.end()
})

void t.test('hits from memory: exact bytes, ranges, and nothing stale after eviction or DELETE', async (t) => {
  const h = await startHarness(t, { limitBytes: 25_000 })
  const a = h.registry.addImage(`${DEFAULT_PREFIX}/a`, [bytes(10_000, 41)])
  const b = h.registry.addImage(`${DEFAULT_PREFIX}/b`, [bytes(10_000, 42)])
  const c = h.registry.addImage(`${DEFAULT_PREFIX}/c`, [bytes(10_000, 43)])
  const get = (digest: string, path: string, headers: Record<string, string> = {}) => h.proxy.server.inject({ url: packageUrl({ digest, path }), headers })
  await get(a.manifestDigest, 'a')
  await h.proxy.packages.service.settled()
  for (let i = 0; i < 2; i++) {
    const res = await get(a.manifestDigest, 'a')
    t.equal(res.headers['x-cache'], 'HIT')
    t.ok(res.rawPayload.equals(a.lastLayer.data), `hit ${i + 1} exact (disk, then memory)`)
  }
  const ranged = await get(a.manifestDigest, 'a', { range: 'bytes=100-199' })
  t.equal(ranged.statusCode, 206)
  t.ok(ranged.rawPayload.equals(a.lastLayer.data.subarray(100, 200)), 'a range of a memory hit')
  // b and c push a out of the 25 kB disk cache; a must then come from the registry again.
  await get(b.manifestDigest, 'b')
  await h.proxy.packages.service.settled()
  await get(c.manifestDigest, 'c')
  await h.proxy.packages.service.settled()
  t.equal(h.proxy.packages.index?.blob(a.lastLayer.digest), undefined, 'a was evicted')
  const before = h.registry.counts.blob
  const again = await get(a.manifestDigest, 'a')
  t.ok(again.rawPayload.equals(a.lastLayer.data))
  t.equal(again.headers['x-cache'], 'MISS', 'not served from a stale memory copy')
  t.equal(h.registry.counts.blob, before + 1)
})

// Found from outside: with the budget held by bytes still being sent, every hit loaded a new
// uncounted Buffer; and loads of several large layers at once were not counted at all.
void t.test('loads count against the budget while they read, and none starts without room', async (t) => {
  const hot = new HotCache(100, 60)
  let reads = 0
  const deferred = (): { promise: Promise<Buffer | undefined>; resolve: (b: Buffer) => void } => {
    let resolve: (b: Buffer) => void = () => undefined
    const promise = new Promise<Buffer | undefined>((r) => (resolve = r))
    return { promise, resolve }
  }
  const a = deferred()
  const loadingA = hot.load(
    'a',
    50,
    () => (reads++, a.promise),
    () => true,
  )
  t.equal(hot.reserved, 50, 'a load reserves its size while it reads')
  const b = deferred()
  const loadingB = hot.load(
    'b',
    50,
    () => (reads++, b.promise),
    () => true,
  )
  t.equal(hot.reserved, 100)
  t.equal(
    await hot.load(
      'c',
      10,
      () => (reads++, Promise.resolve(Buffer.alloc(10))),
      () => true,
    ),
    undefined,
    'no room for a third: not read at all',
  )
  t.equal(reads, 2)
  a.resolve(Buffer.alloc(50))
  b.resolve(Buffer.alloc(50))
  await Promise.all([loadingA, loadingB])
  t.equal(hot.reserved, 0)
  t.equal(hot.bytes, 100, 'both kept')
  // Both held by responses, then removed: the budget is all held bytes until they are done.
  const ua = hot.use('a')
  const ub = hot.use('b')
  hot.delete('a')
  hot.delete('b')
  t.equal(hot.held, 100)
  t.equal(
    await hot.load(
      'd',
      10,
      () => (reads++, Promise.resolve(Buffer.alloc(10))),
      () => true,
    ),
    undefined,
    'held bytes leave no room: nothing is read',
  )
  t.equal(reads, 2)
  t.notOk(hot.put('e', Buffer.alloc(10)), 'nor put')
  ua?.release()
  ub?.release()
  t.equal(hot.held, 0)
  t.ok(
    await hot.load(
      'd',
      10,
      () => (reads++, Promise.resolve(Buffer.alloc(10))),
      () => true,
    ),
    'room again once they are done',
  )
  t.equal(hot.bytes, 10)
})

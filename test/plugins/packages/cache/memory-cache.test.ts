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
  const get = (digest: string, path: string, headers: Record<string, string> = {}) =>
    h.proxy.server.inject({ url: packageUrl({ digest, path }), headers })
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

import t from 'tap'
import { statSync } from 'node:fs'
import { join } from 'node:path'
import { bytes, cacheTokenHeader, packageUrl, startHarness } from '../fixtures/proxy-harness.js'
import { eventually } from '../fixtures/eventually.js'

void t.test('GET /cache reports limit, usage, counts and entries; show and delete by either digest', async (t) => {
  const h = await startHarness(t, { limitBytes: 10_000_000 })
  const a = h.registry.addImage('deckhouse/ce/a', [bytes(1000, 1)])
  const b = h.registry.addImage('deckhouse/ce/b', [bytes(3000, 2)])
  const inject = (url: string, method = 'GET') => h.proxy.server.inject({ method, url, headers: cacheTokenHeader(h.cacheDirectory) })

  const empty = (await inject('/cache')).result as Record<string, unknown>
  t.match(empty, { enabled: true, limitBytes: 10_000_000, usedBytes: 0, entries: 0, hit: 0, miss: 0, hitRatio: 0, items: [] })

  for (const [img, path] of [
    [a, 'a'],
    [b, 'b'],
  ] as const) {
    t.equal((await inject(packageUrl({ digest: img.manifestDigest, path }))).statusCode, 200)
  }
  await h.proxy.packages.service.settled()
  t.equal((await inject(packageUrl({ digest: a.manifestDigest, path: 'a' }))).statusCode, 200, 'a hit')

  const state = (await inject('/cache')).result as {
    usedBytes: number
    entries: number
    hit: number
    miss: number
    hitRatio: number
    items: Array<{ digest: string; manifests: string[]; size: number; hits: number }>
  }
  t.equal(state.usedBytes, 4000)
  t.equal(state.entries, 2)
  t.equal(state.hit, 1)
  t.equal(state.miss, 2)
  t.equal(state.hitRatio, 0.3333)
  t.equal(state.items[0]?.digest, a.lastLayer.digest, 'most recently used first')
  t.same(state.items[0]?.manifests, [a.manifestDigest])
  t.equal(state.items[0]?.hits, 1)

  const bySize = (await inject('/cache?sort=size&order=desc&limit=1')).result as { items: Array<{ digest: string }> }
  t.same(
    bySize.items.map((i) => i.digest),
    [b.lastLayer.digest],
    'sort and limit apply',
  )
  t.equal((await inject('/cache?sort=bogus')).statusCode, 400)
  t.equal((await inject('/cache?limit=-1')).statusCode, 400)

  const byManifest = await inject(`/cache/${a.manifestDigest}`)
  const byLayer = await inject(`/cache/${a.lastLayer.digest}`)
  t.equal(byManifest.statusCode, 200)
  t.same(byManifest.result, byLayer.result, 'manifest and layer digest name the same entry')
  t.equal((await inject('/cache/sha256:nope')).statusCode, 400)
  const absent = await inject(`/cache/sha256:${'0'.repeat(64)}`)
  t.match(JSON.parse(absent.payload), { statusCode: 404, code: 'ENOTCACHED' }, 'the stable code is in the body')
  t.match(JSON.parse((await inject('/cache?sort=bogus')).payload), { statusCode: 400, code: 'EBADREQUEST' })

  const del = await inject(`/cache/${b.manifestDigest}`, 'DELETE')
  t.equal(del.statusCode, 200)
  t.equal((await inject(`/cache/${b.manifestDigest}`)).statusCode, 404, 'gone from the API')
  t.equal(h.proxy.packages.service.cache?.usedBytes, 1000, 'its bytes are released')
  t.equal((await inject(`/cache/${b.manifestDigest}`, 'DELETE')).statusCode, 404, 'a second delete is a 404')
  const before = h.registry.counts.blob
  t.equal((await inject(packageUrl({ digest: b.manifestDigest, path: 'b' }))).statusCode, 200)
  t.equal(h.registry.counts.blob, before + 1, 'a deleted package is fetched again')
})

void t.test('DELETE while a client is reading: the reader finishes, the file goes afterwards', async (t) => {
  const h = await startHarness(t, { limitBytes: 50_000_000 })
  const layer = bytes(8 * 1024 * 1024, 3)
  const img = h.registry.addImage('deckhouse/ce/big', [layer])
  await h.proxy.server.inject(packageUrl({ digest: img.manifestDigest, path: 'big' }))
  await h.proxy.packages.service.settled()
  const pkg = await h.proxy.packages.service.resolve(h.proxy.sources.match(undefined), 'deckhouse/ce/big', img.manifestDigest)
  t.equal(pkg.cached, true)
  const body = await h.proxy.packages.service.open(h.proxy.sources.match(undefined), 'deckhouse/ce/big', pkg, 0, layer.length - 1)
  const del = await h.proxy.server.inject({ method: 'DELETE', url: `/cache/${img.manifestDigest}`, headers: cacheTokenHeader(h.cacheDirectory) })
  t.equal(del.statusCode, 200)
  const chunks: Buffer[] = []
  for await (const c of body.stream) chunks.push(c as Buffer)
  t.ok(Buffer.concat(chunks).equals(layer), 'the reader got every byte')
  await eventually(() => h.proxy.packages.service.cache?.usedBytes === 0, 'bytes released after the reader closed', { intervalMs: 5 })
  t.pass('released')
})

void t.test('DELETE needs the admin token from the cache directory: anything on the master reaches the listener', async (t) => {
  const h = await startHarness(t)
  const img = h.registry.addImage('deckhouse/ce/a', [bytes(1000, 4)])
  t.equal((await h.proxy.server.inject(packageUrl({ digest: img.manifestDigest, path: 'a' }))).statusCode, 200)
  await h.proxy.packages.service.settled()
  const tokenFile = join(h.cacheDirectory, 'admin-token')
  t.equal(statSync(tokenFile).mode & 0o777, 0o600, 'the token file is readable by the proxy user only')
  const token = cacheTokenHeader(h.cacheDirectory)['x-cache-token'] ?? ''
  t.match(token, /^[0-9a-f]{64}$/)

  for (const [what, headers] of [
    ['no token', {}],
    ['a wrong token', { 'x-cache-token': 'f'.repeat(64) }],
    ['a token of another length', { 'x-cache-token': token.slice(1) }],
    ['the token in Authorization', { authorization: `Bearer ${token}` }],
  ] as Array<[string, Record<string, string>]>) {
    const res = await h.proxy.server.inject({ method: 'DELETE', url: `/cache/${img.manifestDigest}`, headers })
    t.equal(res.statusCode, 403, `${what}: 403`)
    t.match(JSON.parse(res.payload), { statusCode: 403, code: 'EFORBIDDEN', message: /X-Cache-Token .*admin-token/ })
    t.notOk(res.payload.includes(token), `${what}: the token is not in the answer`)
  }
  t.equal((await h.proxy.server.inject({ method: 'DELETE', url: '/cache/sha256:nope' })).statusCode, 403, 'checked before anything else')
  t.ok(h.proxy.packages.index?.blob(img.lastLayer.digest), 'nothing was removed')
  t.equal((await h.proxy.server.inject(`/cache/${img.manifestDigest}`)).statusCode, 200, 'reading needs no token')
  const ok = await h.proxy.server.inject({ method: 'DELETE', url: `/cache/${img.manifestDigest}`, headers: { 'x-cache-token': token } })
  t.equal(ok.statusCode, 200, 'with the token: removed')

  // A restart writes a fresh token: an old one stops working.
  await h.stop()
  const again = await startHarness(t, { registry: h.registry, dir: h.dir })
  const fresh = cacheTokenHeader(again.cacheDirectory)['x-cache-token']
  t.not(fresh, token, 'a new token per start')
  t.equal(
    (await again.proxy.server.inject({ method: 'DELETE', url: `/cache/${img.manifestDigest}`, headers: { 'x-cache-token': token } })).statusCode,
    403,
    'the old token is refused',
  )
})

void t.test('with --disable-cache the API says so', async (t) => {
  const h = await startHarness(t, { disableCache: true })
  const res = await h.proxy.server.inject('/cache')
  t.match(res.result, { enabled: false, entries: 0, items: [] })
  t.equal((await h.proxy.server.inject(`/cache/sha256:${'1'.repeat(64)}`)).statusCode, 404)
})

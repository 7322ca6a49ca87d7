import { readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import t from 'tap'
import { BlobStore, LAYOUT_VERSION, LayoutError } from '../../../../plugins/packages/cache/blob-store.js'
import { bytes, packageUrl, startHarness } from '../../../fixtures/proxy-harness.js'

void t.test('a new cache directory records its layout version; the same version opens again', async (t) => {
  const dir = t.testdir()
  await new BlobStore(dir).init()
  t.same(JSON.parse(readFileSync(join(dir, 'layout.json'), 'utf8')), { version: LAYOUT_VERSION })
  await new BlobStore(dir).init()
  t.pass('reopened')
})

void t.test('a directory written by a newer layout is refused with ELAYOUT, and left as it is', async (t) => {
  const dir = t.testdir()
  await new BlobStore(dir).init()
  writeFileSync(join(dir, 'layout.json'), '{"version":2}\n')
  await t.rejects(new BlobStore(dir).init(), LayoutError)
  await t.rejects(new BlobStore(dir).init(), { code: 'ELAYOUT' })
  writeFileSync(join(dir, 'layout.json'), 'garbage')
  await t.rejects(new BlobStore(dir).init(), { code: 'ELAYOUT' }, 'an unreadable version too')
  t.equal(readFileSync(join(dir, 'layout.json'), 'utf8'), 'garbage', 'not rewritten')
})

void t.test('the server with a newer layout on its cache directory serves uncached and says why', async (t) => {
  const dir = t.testdir({ cache: { 'layout.json': '{"version":99}' } })
  const h = await startHarness(t, { dir })
  const image = h.registry.addImage('deckhouse/ce', [bytes(10_000, 7)])
  const res = await h.proxy.server.inject(packageUrl({ digest: image.manifestDigest }))
  t.equal(res.statusCode, 200)
  t.equal(res.headers['x-cache'], 'BYPASS', 'served, not cached')
  const ready = await h.proxy.server.inject('/readyz')
  t.match(ready.payload, /ELAYOUT/, 'readiness names the reason')
  t.equal(readFileSync(join(dir, 'cache', 'layout.json'), 'utf8'), '{"version":99}', 'the directory is left alone')
})

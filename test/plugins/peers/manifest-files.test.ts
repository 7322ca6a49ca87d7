/**
 * The manifests held for peers survive a restart: a memo attached to a folder keeps each entry
 * as a file, a new memo on the same folder reads them back (hashed against their names; a
 * corrupt one is deleted, never served), within the same byte bound, in the same recency order.
 */
import { createHash } from 'node:crypto'
import { existsSync, readdirSync, utimesSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import t from 'tap'
import { ManifestFiles } from '../../../plugins/peers/manifest-files.js'
import { ManifestMemo } from '../../../plugins/peers/manifest-memo.js'

const TYPE = 'application/vnd.oci.image.manifest.v1+json'

function manifest(n: number, size = 100): { digest: string; m: { body: Buffer; mediaType: string } } {
  const body = Buffer.alloc(size, `{"n":${n}}`)
  return { digest: `sha256:${createHash('sha256').update(body).digest('hex')}`, m: { body, mediaType: TYPE } }
}

const hex = (digest: string): string => digest.slice('sha256:'.length)

void t.test('kept on disk, read back after a restart, oldest out first within the bound', async (t) => {
  const dir = join(t.testdir(), 'peer-manifests')
  const errors: unknown[] = []
  const first = new ManifestMemo(300)
  t.match(await first.attach(new ManifestFiles(dir), (e) => errors.push(e)), { manifests: [], corrupt: [], dropped: 0 }, 'a new folder is created empty')
  const [a, b, c, d] = [1, 2, 3, 4].map((n) => manifest(n))
  if (!a || !b || !c || !d) throw new Error('unreachable')
  first.put(a.digest, a.m)
  first.put(b.digest, b.m)
  first.put(c.digest, c.m)
  first.put(a.digest, a.m)
  first.put(d.digest, d.m)
  await first.settled()
  t.same(readdirSync(dir).sort(), [a, c, d].map((x) => hex(x.digest)).sort(), 'files follow the memo: b, least recently put, was evicted and deleted')
  t.same(errors, [])

  // A restart: a new memo on the same folder.
  const second = new ManifestMemo(300)
  const loaded = await second.attach(new ManifestFiles(dir), (e) => errors.push(e))
  t.equal(loaded.manifests.length, 3)
  t.same(second.get(a.digest), a.m, 'bytes and media type as they were verified')
  t.ok(second.get(c.digest) && second.get(d.digest))
  t.notOk(second.get(b.digest))
})

void t.test('a corrupt or torn file is deleted, never served; debris and overflow are dropped', async (t) => {
  const dir = t.testdir()
  const good = manifest(1)
  const bad = manifest(2)
  const torn = manifest(3)
  const files = new ManifestFiles(dir)
  await files.write(good.digest, good.m)
  // Same length, other bytes: only the hash can tell.
  writeFileSync(join(dir, hex(bad.digest)), Buffer.concat([Buffer.from(`${TYPE}\n`), Buffer.alloc(100, 'x')]))
  writeFileSync(join(dir, hex(torn.digest)), 'application/vnd.oci')
  writeFileSync(join(dir, '.tmp-0123'), 'a write a kill -9 cut short')
  const memo = new ManifestMemo()
  const loaded = await memo.attach(files, () => undefined)
  t.same(loaded.corrupt.sort(), [bad.digest, torn.digest].sort())
  t.equal(loaded.dropped, 1, 'the temp file')
  t.same(readdirSync(dir), [hex(good.digest)])
  t.ok(memo.get(good.digest))
  t.notOk(memo.get(bad.digest))

  // More on disk than the bound (a smaller bound than the last run's): the newest are kept.
  const big = [4, 5, 6].map((n) => manifest(n, 200))
  // Distinct, ordered modification times, whatever the file system's resolution.
  utimesSync(join(dir, hex(good.digest)), 500, 500)
  for (const [i, x] of big.entries()) {
    await files.write(x.digest, x.m)
    utimesSync(join(dir, hex(x.digest)), 1_000 + i, 1_000 + i)
  }
  const small = new ManifestMemo(300)
  const bounded = await small.attach(new ManifestFiles(dir), () => undefined)
  t.same(
    bounded.manifests.map((x) => x.digest),
    [big[2]?.digest],
    'the newest that fit the bound',
  )
  t.equal(bounded.dropped, 3)
  t.same(readdirSync(dir), [hex(big[2]?.digest ?? '')], 'the rest deleted')
  t.notOk(existsSync(join(dir, hex(good.digest))))
})

void t.test('a folder that cannot be used: attach fails (the plugin logs it) and the memo works in memory', async (t) => {
  const dir = t.testdir({ 'peer-manifests': 'a file, not a folder' })
  const memo = new ManifestMemo()
  await t.rejects(memo.attach(new ManifestFiles(join(dir, 'peer-manifests')), () => undefined))
  const x = manifest(1)
  memo.put(x.digest, x.m)
  await memo.settled()
  t.same(memo.get(x.digest), x.m)
})

/**
 * A corrupt SQLite index (a torn disk, a stray write) must not stop the proxy from starting:
 * the cache volume outlives the container, so a fatal error here would crash-loop the pod for
 * good. The file is moved aside, a fresh index is built from the blob files that still verify,
 * and every package is served from them again, byte-exact, without downloading a layer.
 */
import { existsSync, readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import t from 'tap'
import { captureLogger } from '../fixtures/log-capture.js'
import { DEFAULT_PREFIX, bytes, packageUrl, startHarness, waitCached } from '../fixtures/proxy-harness.js'

const CORRUPTIONS: Array<[string, (db: Buffer) => Buffer]> = [
  // Not a database at all: SQLite refuses the header (SQLITE_NOTADB).
  ['a file that is not a database', (db) => Buffer.alloc(db.length, 0x5a)],
  // A valid header over a damaged first page (the schema's b-tree): SQLITE_CORRUPT.
  ['a database whose schema page is damaged', (db) => Buffer.concat([db.subarray(0, 100), Buffer.alloc(Math.max(0, db.length - 100), 0xff)])],
]

for (const [what, corrupt] of CORRUPTIONS) {
  void t.test(`${what}: moved aside, rebuilt from the blob files, every package served again`, async (t) => {
    const first = await startHarness(t)
    const images = [bytes(30_000, 71), bytes(50_000, 72)].map((d) => first.registry.addImage(DEFAULT_PREFIX, [d]))
    for (const img of images) {
      t.equal((await first.proxy.server.inject(packageUrl({ digest: img.manifestDigest }))).statusCode, 200)
      await waitCached(first, img.manifestDigest, img.lastLayer.digest)
    }
    await first.stop()
    const indexPath = join(first.cacheDirectory, 'index.sqlite')
    const damaged = corrupt(readFileSync(indexPath))
    writeFileSync(indexPath, damaged)

    const log = captureLogger('info')
    const second = await startHarness(t, { registry: first.registry, dir: first.dir, logger: log.logger })
    t.equal((await second.proxy.server.inject('/readyz')).statusCode, 200, 'ready')
    const rebuilt = log.lines().find((l) => /index is corrupt/.test(String(l.msg)))
    t.ok(rebuilt, 'a log line says the index was rebuilt')
    const code = (rebuilt?.err as { code?: string } | undefined)?.code
    t.match(code, /^SQLITE_(NOTADB|CORRUPT)$/, `with SQLite's verdict (${String(code)})`)
    t.ok(readFileSync(`${indexPath}.corrupt`).equals(damaged), 'the damaged file is kept aside for inspection')
    t.equal(second.proxy.packages.index?.blobCount, 2, 'both layers adopted from their files')
    t.equal(second.proxy.packages.index?.usedBytes, 80_000, 'and their bytes counted')

    first.registry.resetCounts()
    for (const img of images) {
      const res = await second.proxy.server.inject(packageUrl({ digest: img.manifestDigest }))
      t.equal(res.statusCode, 200)
      t.ok(res.rawPayload.equals(img.lastLayer.data), 'byte-exact')
      t.equal(res.headers['x-cache'], 'HIT', 'a hit: the layer was already here')
    }
    t.equal(first.registry.counts.blob, 0, 'no layer downloaded again')
    t.equal(first.registry.counts.manifest, 2, 'only the manifest rows had to be relearned')
    await second.stop()

    // The rebuilt index is a normal one: the next start finds everything, rebuilds nothing.
    const log3 = captureLogger('info')
    const third = await startHarness(t, { registry: first.registry, dir: first.dir, logger: log3.logger })
    t.notOk(
      log3.lines().some((l) => /index is corrupt/.test(String(l.msg))),
      'no rebuild on the next start',
    )
    t.ok(
      images.every((img) => third.proxy.packages.index?.manifest(img.manifestDigest)),
      'manifests remembered',
    )
    t.ok(existsSync(`${indexPath}.corrupt`), 'the aside copy stays until the next corruption replaces it')
  })
}

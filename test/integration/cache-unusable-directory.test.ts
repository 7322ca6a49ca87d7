/**
 * A cache directory that cannot be used at start (a file in the way, an index path the database
 * cannot open, a read-only volume) must not stop the proxy: it serves every package uncached,
 * verified as always, says why on /readyz, /cache and in the log, and starts caching by itself
 * once the directory can be used.
 */
import { execFileSync } from 'node:child_process'
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import t, { type Test } from 'tap'
import { runCacheCommand } from '../../cli/cache-command.js'
import { captureLogger } from '../fixtures/log-capture.js'
import { DEFAULT_PREFIX, bytes, packageUrl, startHarness, waitCached } from '../fixtures/proxy-harness.js'
import { eventually } from '../fixtures/eventually.js'

async function assertServesUncached(t: Test, spoil: (cacheDirectory: string) => void, code: RegExp): Promise<void> {
  const dir = t.testdir()
  spoil(join(dir, 'cache'))
  const log = captureLogger('info')
  const h = await startHarness(t, { dir, logger: log.logger })
  const image = h.registry.addImage(DEFAULT_PREFIX, [bytes(20_000, 81)])

  const ready = await h.proxy.server.inject('/readyz')
  t.equal(ready.statusCode, 503, 'not ready: on-call must hear of it')
  t.match(JSON.parse(ready.payload), { reasons: [/^cache directory unusable \(\w+\): serving packages uncached, trying again every 30 s$/] })
  const line = log.lines().find((l) => l.msg === 'cannot open the cache; serving packages uncached')
  t.match((line?.err as { code?: string } | undefined)?.code, code, 'the log line names the error')

  for (let i = 0; i < 2; i++) {
    const res = await h.proxy.server.inject(packageUrl({ digest: image.manifestDigest }))
    t.equal(res.statusCode, 200, `request ${i + 1} served`)
    t.ok(res.rawPayload.equals(image.lastLayer.data), 'byte-exact')
    t.equal(res.headers['x-cache'], 'BYPASS', 'streamed through')
  }
  t.equal(h.registry.counts.blob, 2, 'nothing was cached')
  const cache = JSON.parse((await h.proxy.server.inject('/cache')).payload) as Record<string, unknown>
  t.match(cache, { enabled: false, unavailable: /^cache directory unusable/, limitBytes: 0, entries: 0 })
  const limit = await h.proxy.metrics.registry.getSingleMetricAsString('registry_packages_proxy_cache_limit_bytes')
  t.match(limit, /^registry_packages_proxy_cache_limit_bytes 0$/m, 'the limit gauge says 0')
  // On-call's CLI says it too.
  await h.proxy.server.start()
  const out: string[] = []
  t.equal(await runCacheCommand(['ls', '--url', h.proxy.server.info.uri], { out: (l) => out.push(l), err: (l) => out.push(l) }), 0)
  t.match(out.join('\n'), /^cache DISABLED: .*\ncache directory unusable \(\w+\): serving packages uncached/m, 'cache ls explains why')
}

void t.test('a file where the cache directory should be (ENOTDIR, EEXIST)', (t) =>
  assertServesUncached(t, (cache) => writeFileSync(cache, 'not a directory'), /^E(NOTDIR|EXIST)$/),
)

void t.test('an index path the database cannot open (SQLITE_CANTOPEN)', (t) =>
  assertServesUncached(t, (cache) => mkdirSync(join(cache, 'index.sqlite'), { recursive: true }), /^SQLITE_CANTOPEN$/),
)

void t.test('a read-only cache volume (EROFS)', async (t) => {
  // Root ignores permission bits, so a read-only bind mount stands in for a read-only volume;
  // where mounting is not allowed the case cannot be built and is skipped.
  let mounted: string | undefined
  t.teardown(() => {
    if (mounted) execFileSync('umount', [mounted], { stdio: 'pipe' })
  })
  const probe = mkdtempSync(join(tmpdir(), 'rpp-mount-probe-'))
  try {
    execFileSync('mount', ['--bind', probe, probe], { stdio: 'pipe' })
    execFileSync('umount', [probe], { stdio: 'pipe' })
  } catch {
    t.comment('skipped: this user cannot bind-mount a read-only volume here')
    return
  } finally {
    rmSync(probe, { recursive: true, force: true })
  }
  await assertServesUncached(
    t,
    (cache) => {
      mkdirSync(cache, { recursive: true })
      execFileSync('mount', ['--bind', cache, cache], { stdio: 'pipe' })
      mounted = cache
      execFileSync('mount', ['-o', 'remount,ro,bind', cache], { stdio: 'pipe' })
    },
    // Node's recursive mkdir reports a read-only file system as ENOENT.
    /^(EROFS|ENOENT)$/,
  )
})

void t.test('once the directory can be used, caching resumes by itself, without a restart', async (t) => {
  const dir = t.testdir()
  const cache = join(dir, 'cache')
  writeFileSync(cache, 'in the way')
  const log = captureLogger('info')
  const h = await startHarness(t, { dir, logger: log.logger, cacheRetryMs: 100 })
  const image = h.registry.addImage(DEFAULT_PREFIX, [bytes(20_000, 82)])
  const before = await h.proxy.server.inject(packageUrl({ digest: image.manifestDigest }))
  t.equal(before.headers['x-cache'], 'BYPASS', 'uncached while the file is in the way')
  // Still unusable on the next tries: nothing changes, and the failure is not logged again.
  await new Promise((resolve) => setTimeout(resolve, 350))
  t.equal((await h.proxy.server.inject('/readyz')).statusCode, 503)
  t.equal(
    log.lines().filter((l) => /cache directory still unusable|cannot open the cache/.test(String(l.msg))).length,
    1,
    'one log line for one kind of failure',
  )

  rmSync(cache)
  await eventually(() => log.lines().some((l) => l.msg === 'cache directory usable again: caching resumed'), 'the log says caching resumed', {
    timeoutMs: 5000,
    intervalMs: 5,
  })
  t.equal((await h.proxy.server.inject('/readyz')).statusCode, 200, 'ready once the directory can be used')
  const miss = await h.proxy.server.inject(packageUrl({ digest: image.manifestDigest }))
  t.equal(miss.statusCode, 200)
  t.equal(miss.headers['x-cache'], 'MISS', 'now a fill into the cache')
  t.ok(miss.rawPayload.equals(image.lastLayer.data), 'byte-exact')
  await waitCached(h, image.manifestDigest, image.lastLayer.digest)
  const hit = await h.proxy.server.inject(packageUrl({ digest: image.manifestDigest }))
  t.equal(hit.headers['x-cache'], 'HIT', 'and the next request is a hit')
  t.equal(h.registry.counts.blob, 2, 'two downloads: the bypass and the fill')
  const state = JSON.parse((await h.proxy.server.inject('/cache')).payload) as Record<string, unknown>
  t.match(state, { enabled: true, entries: 1, limitBytes: 64 * 1024 * 1024 })
  t.notOk('unavailable' in state, 'no reason left')
  const limit = await h.proxy.metrics.registry.getSingleMetricAsString('registry_packages_proxy_cache_limit_bytes')
  t.match(limit, /^registry_packages_proxy_cache_limit_bytes 67108864$/m, 'the limit gauge shows the limit again')
})

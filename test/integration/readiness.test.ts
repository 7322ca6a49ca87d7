/**
 * Readiness flipping with each of its causes, seen the way the kubelet and Prometheus see it:
 * `/readyz` (status and JSON reasons) and `registry_packages_proxy_ready`. Causes: credential
 * providers that have not synced (the API server is down at start), a cache directory that stops
 * being writable, and a closed cache index.
 */
import { execFileSync } from 'node:child_process'
import { chmodSync, renameSync } from 'node:fs'
import { join } from 'node:path'
import { pino } from 'pino'
import t, { type Test } from 'tap'
import { createServer, type ProxyServer } from '../../server.js'
import { FakeKubeApi, registrySecret } from '../fixtures/fake-kube-api.js'
import { eventually } from '../fixtures/eventually.js'
import { FakeRegistry } from '../fixtures/fake-registry.js'
import { freePort } from '../fixtures/net.js'
import { parseExposition, PREFIX, valueOf } from '../fixtures/monitoring.js'

interface Readiness {
  status: number
  body: { ready: boolean; reasons?: string[] }
  gauge: number | undefined
  synced: { secret: number | undefined; modulesources: number | undefined }
}

async function readiness(proxy: ProxyServer): Promise<Readiness> {
  const res = await proxy.server.inject('/readyz')
  const scrape = await proxy.server.inject('/metrics')
  const e = parseExposition(scrape.payload)
  return {
    status: res.statusCode,
    body: JSON.parse(res.payload) as Readiness['body'],
    gauge: valueOf(e, `${PREFIX}ready`),
    synced: {
      secret: valueOf(e, `${PREFIX}source_synced`, { provider: 'secret' }),
      modulesources: valueOf(e, `${PREFIX}source_synced`, { provider: 'modulesources' }),
    },
  }
}

/** Waits until `/readyz` answers `status` (the directory check runs on the flush interval). */
async function becomes(proxy: ProxyServer, status: number, what: string): Promise<Readiness> {
  await eventually(async () => (await proxy.server.inject('/readyz')).statusCode === status, what, { timeoutMs: 30_000 })
  return readiness(proxy)
}

async function start(t: Test): Promise<{ proxy: ProxyServer; api: FakeKubeApi; tmpDir: string }> {
  const registry = await FakeRegistry.start()
  t.teardown(() => registry.close())
  // The API server is not listening yet when the proxy starts.
  const api = FakeKubeApi.create(await freePort())
  t.teardown(() => api.close())
  api.putSecret(registrySecret({ address: registry.host, path: '/deckhouse/ce', scheme: 'http' }))
  const dir = t.testdir()
  const proxy = await createServer({
    cacheDirectory: join(dir, 'cache'),
    limitBytes: 1024 * 1024,
    kubeconfig: api.writeKubeconfig(dir, 'sa-token-readiness'),
    logger: pino({ level: 'silent' }),
    env: {},
    collectDefaultMetrics: false,
    // The directory check runs on this interval.
    flushIntervalMs: 100,
  })
  t.teardown(() => proxy.server.stop({ timeout: 2000 }))
  return { proxy, api, tmpDir: join(dir, 'cache', 'tmp') }
}

/**
 * Makes `dir` refuse writes for real, the way a broken volume does, and returns the undo, or
 * undefined where this user cannot: as non-root by taking the write bit away (EACCES); as root,
 * which ignores permission bits, by a read-only bind mount over it (EROFS).
 */
function refuseWrites(dir: string): { undo: () => void; code: string } | undefined {
  if (process.getuid?.() !== 0) {
    chmodSync(dir, 0o555)
    return { undo: () => chmodSync(dir, 0o755), code: 'EACCES' }
  }
  try {
    execFileSync('mount', ['--bind', dir, dir], { stdio: 'pipe' })
  } catch {
    return undefined
  }
  const undo = (): void => {
    execFileSync('umount', [dir], { stdio: 'pipe' })
  }
  try {
    execFileSync('mount', ['-o', 'remount,ro,bind', dir], { stdio: 'pipe' })
  } catch {
    undo()
    return undefined
  }
  return { undo, code: 'EROFS' }
}

void t.test('not ready until every credential provider synced, then ready', async (t) => {
  const { proxy, api } = await start(t)
  const before = await readiness(proxy)
  t.equal(before.status, 503)
  t.same(
    before.body,
    { ready: false, reasons: ['credential sources not synced yet: secret, modulesources', 'no registry source is configured'] },
    'the JSON reasons',
  )
  t.equal(before.gauge, 0, 'registry_packages_proxy_ready 0')
  t.same(before.synced, { secret: 0, modulesources: 0 }, 'neither provider synced')

  await api.listen()
  const after = await becomes(proxy, 200, 'ready once the API server answers')
  t.same(after.body, { ready: true })
  t.equal(after.gauge, 1, 'registry_packages_proxy_ready 1')
  t.same(after.synced, { secret: 1, modulesources: 1 })
})

void t.test('not ready while the cache directory is not writable, ready again after', async (t) => {
  const { proxy, api, tmpDir } = await start(t)
  await api.listen()
  t.equal((await becomes(proxy, 200, 'ready')).gauge, 1)

  // The directory gone (a volume unmounted or wiped under the process): works for any user.
  renameSync(tmpDir, `${tmpDir}.away`)
  const gone = await becomes(proxy, 503, 'not ready without the directory')
  t.same(gone.body, { ready: false, reasons: ['cache directory is not writable (ENOENT)'] })
  t.equal(gone.gauge, 0)
  renameSync(`${tmpDir}.away`, tmpDir)
  t.equal((await becomes(proxy, 200, 'ready with the directory back')).gauge, 1)

  // The directory there but refusing writes.
  const refused = refuseWrites(tmpDir)
  if (!refused) {
    const banner = '#'.repeat(78)
    t.comment(banner)
    t.comment('### running as root without CAP_SYS_ADMIN: a read-only cache directory cannot be')
    t.comment('### made (root ignores permission bits, and mount is refused): that cause is SKIPPED')
    t.comment(banner)
    return
  }
  try {
    const readOnly = await becomes(proxy, 503, `not ready on ${refused.code}`)
    t.same(readOnly.body, { ready: false, reasons: [`cache directory is not writable (${refused.code})`] })
    t.equal(readOnly.gauge, 0)
  } finally {
    refused.undo()
  }
  t.equal((await becomes(proxy, 200, 'ready once writable again')).gauge, 1)
})

void t.test('not ready once the cache index is closed', async (t) => {
  const { proxy, api } = await start(t)
  await api.listen()
  await becomes(proxy, 200, 'ready')
  await proxy.packages.index?.close()
  const closed = await readiness(proxy)
  t.equal(closed.status, 503)
  t.same(closed.body, { ready: false, reasons: ['cache index is closed'] })
  t.equal(closed.gauge, 0)
})

import t from 'tap'
import { startHarness } from '../../fixtures/proxy-harness.js'
import { pino } from 'pino'
import { createServer } from '../../../server.js'
import { join } from 'node:path'

void t.test('healthz and readyz with a configured source', async (t) => {
  const h = await startHarness(t)
  const healthz = await h.proxy.server.inject('/healthz')
  t.equal(healthz.statusCode, 200)
  t.equal(healthz.payload, 'ok')
  const readyz = await h.proxy.server.inject('/readyz')
  t.equal(readyz.statusCode, 200)
  t.same(JSON.parse(readyz.payload), { ready: true })
  t.equal(h.registry.counts.total, 0, 'probes never touch the registry')
})

void t.test('readyz is 503 with a reason when no source is configured', async (t) => {
  const dir = t.testdir()
  const proxy = await createServer({
    cacheDirectory: join(dir, 'cache'),
    limitBytes: 1000,
    logger: pino({ level: 'silent' }),
    env: {},
    collectDefaultMetrics: false,
  })
  t.teardown(() => proxy.server.stop())
  const readyz = await proxy.server.inject('/readyz')
  t.equal(readyz.statusCode, 503)
  t.match(JSON.parse(readyz.payload), { ready: false, reasons: [/no registry source/] })
  const pkg = await proxy.server.inject(`/package?digest=sha256:${'a'.repeat(64)}`)
  t.equal(pkg.statusCode, 404, 'no default source: 404')
})

/**
 * The bootstrap listener when the registry's last layer is not what it should be: not gzip, or
 * truncated. A 502 whose body and log line say the cause, not a bare 500.
 */
import { writeFileSync } from 'node:fs'
import { join } from 'node:path'
import t from 'tap'
import { createServer } from '../../server.js'
import { FakeRegistry } from '../fixtures/fake-registry.js'
import { layerTarGz } from '../fixtures/layers.js'
import { captureLogger } from '../fixtures/log-capture.js'
import { fetchRaw } from '../fixtures/proxy-harness.js'

const UUID = '7f3c2a1e-0b9d-4c5e-8f6a-123456789abc'

void t.test('a last layer that is not gzip, or truncated gzip: 502 with the cause', async (t) => {
  const registry = await FakeRegistry.start()
  t.teardown(() => registry.close())
  const dir = t.testdir()
  writeFileSync(join(dir, 'r.json'), JSON.stringify({ default: { address: registry.host, path: '/deckhouse/ce', scheme: 'http' } }))
  const logs = captureLogger('info')
  const proxy = await createServer({
    port: 0,
    cacheDirectory: join(dir, 'cache'),
    limitBytes: 2 ** 26,
    registryConfig: join(dir, 'r.json'),
    logger: logs.logger,
    collectDefaultMetrics: false,
    env: {},
    bootstrap: { host: '127.0.0.1', port: 0, clusterUuid: UUID },
  })
  await proxy.server.start()
  t.teardown(() => proxy.server.stop())
  const address = (proxy.server.plugins as unknown as { bootstrap: { api: { address(): { port: number } | undefined } } }).bootstrap.api.address()
  const base = `http://127.0.0.1:${address?.port ?? 0}`
  const whole = await layerTarGz([{ name: 'rpp-get', data: 'x'.repeat(20000) }])
  for (const [what, layer] of [
    ['not gzip', Buffer.from('plain text, not gzip')],
    ['truncated gzip', whole.subarray(0, whole.length - 30)],
  ] as const) {
    const digest = registry.addImage('deckhouse/ce', [layer]).manifestDigest
    const res = await fetchRaw(`${base}/${UUID}/rpp-get?digest=${digest}`)
    t.equal(res.status, 502, what)
    t.match(JSON.parse(res.body.toString()), { statusCode: 502 }, what)
  }
  t.match(logs.text(), /"status":502.*not valid gzip.*ELAYERCONTENT/, 'the log line says the cause')
})

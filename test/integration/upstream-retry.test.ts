import t from 'tap'
import { MAX_RETRY_AFTER_MS, retryDelayMs } from '../../plugins/packages/registry/http.js'
import { DEFAULT_PREFIX, bytes, packageUrl, startHarness } from '../fixtures/proxy-harness.js'

void t.test('retryDelayMs reads seconds and HTTP dates, and refuses long waits', (t) => {
  t.equal(retryDelayMs(undefined, 0), 250)
  t.equal(retryDelayMs(undefined, 2), 1000)
  t.equal(retryDelayMs('3', 0), 3000)
  const now = Date.parse('2026-01-01T00:00:00Z')
  t.equal(retryDelayMs('Thu, 01 Jan 2026 00:00:02 GMT', 0, now), 2000)
  t.equal(retryDelayMs(String(MAX_RETRY_AFTER_MS / 1000 + 1), 0), undefined, 'too long: give up at once')
  t.equal(retryDelayMs('soon', 1), 500, 'garbage falls back to backoff')
  t.end()
})

void t.test('429 with Retry-After is waited out and retried; the client gets its 200', async (t) => {
  const h = await startHarness(t)
  const data = bytes(10_000, 31)
  const image = h.registry.addImage(DEFAULT_PREFIX, [data])
  h.registry.faults = { manifestStatus: 429, retryAfter: '1', onlyFirst: 1 }
  const started = Date.now()
  const res = await h.proxy.server.inject(packageUrl({ digest: image.manifestDigest }))
  t.equal(res.statusCode, 200)
  t.ok(res.rawPayload.equals(data))
  t.ok(Date.now() - started >= 900, 'waited for Retry-After')
  t.equal(h.registry.counts.manifest, 2, 'one retry')
})

void t.test('a blob 503 is retried too', async (t) => {
  const h = await startHarness(t)
  const data = bytes(10_000, 32)
  const image = h.registry.addImage(DEFAULT_PREFIX, [data])
  h.registry.faults = { blobStatus: 503, onlyFirst: 2 }
  const res = await h.proxy.server.inject(packageUrl({ digest: image.manifestDigest }))
  t.equal(res.statusCode, 200)
  t.ok(res.rawPayload.equals(data))
  t.equal(h.registry.counts.blob, 2, 'one retry (onlyFirst counted the manifest request too)')
})

void t.test('a registry that keeps failing: 502 after a bounded number of attempts', async (t) => {
  const h = await startHarness(t)
  const image = h.registry.addImage(DEFAULT_PREFIX, [bytes(1000, 33)])
  h.registry.faults = { manifestStatus: 503 }
  const res = await h.proxy.server.inject(packageUrl({ digest: image.manifestDigest }))
  t.equal(res.statusCode, 502)
  t.equal(h.registry.counts.manifest, 3, 'first try and two retries')
})

void t.test('Retry-After beyond the cap: the error is passed on at once', async (t) => {
  const h = await startHarness(t)
  const image = h.registry.addImage(DEFAULT_PREFIX, [bytes(1000, 34)])
  h.registry.faults = { manifestStatus: 429, retryAfter: '3600' }
  const res = await h.proxy.server.inject(packageUrl({ digest: image.manifestDigest }))
  t.equal(res.statusCode, 502)
  t.equal(h.registry.counts.manifest, 1, 'no retry')
  t.match(JSON.parse(res.payload), { statusCode: 502, message: /429/ })
})

void t.test('404 and 401 are not retried', async (t) => {
  const h = await startHarness(t)
  const res = await h.proxy.server.inject(packageUrl({ digest: `sha256:${'e'.repeat(64)}` }))
  t.equal(res.statusCode, 404)
  t.equal(h.registry.counts.manifest, 1)
})

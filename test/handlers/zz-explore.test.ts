import t from 'tap'
import { startHarness, packageUrl, DEFAULT_PREFIX, bytes, fetchRaw } from '../fixtures/proxy-harness.js'
void t.test('explore', async (t) => {
  const h = await startHarness(t)
  const img = h.registry.addImage(DEFAULT_PREFIX, [bytes(100000, 3)])
  h.registry.faults = { corruptBlob: true }
  const r = await h.proxy.server.inject(packageUrl({ digest: img.manifestDigest })).catch((e: unknown) => { console.log('inject rejected', (e as Error).message); return undefined })
  h.registry.faults = { truncateBlobAt: 50000 }
  const r2 = await h.proxy.server.inject(packageUrl({ digest: img.manifestDigest })).catch((e: unknown) => { console.log('inject rejected', (e as Error).message); return undefined })
  console.log('trunc', r2?.statusCode, h.registry.counts.total, h.proxy.packages.service.activeFills)
  const p = await h.proxy.server.inject({ method: 'POST', url: packageUrl({ digest: img.manifestDigest }), payload: '{bad', headers: { 'content-type': 'application/json' } })
  const p2 = await h.proxy.server.inject({ method: 'DELETE', url: packageUrl({ digest: img.manifestDigest }), payload: { a: 1 } })
  await h.proxy.server.start()
  h.registry.faults = { corruptBlob: true }
  console.log(h.registry.counts.total, h.proxy.packages.service.activeFills)
  const raw = await fetchRaw(`${h.proxy.server.info.uri}${packageUrl({ digest: img.manifestDigest })}`)
  console.log('raw', raw.status, raw.body.length, raw.complete, raw.error?.message, raw.headers['content-length'])
  console.log(h.registry.counts.total, h.registry.requests.map(r => r.method + ' ' + r.url))
})

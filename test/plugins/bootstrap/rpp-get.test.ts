/**
 * RppGetFiles' bounds: extractions of distinct digests run a bounded number at once (more wait,
 * the rest get a 503 with Retry-After), so twenty nodes asking for twenty digests with a 32 MiB
 * rpp-get each no longer hold twenty files (and their concatenated copies) at once.
 */
import { Readable } from 'node:stream'
import t from 'tap'
import { RppGetFiles } from '../../../plugins/bootstrap/rpp-get.js'
import type { RegistrySource } from '../../../plugins/credentials/source.js'
import type { PackageService } from '../../../plugins/packages/package-service.js'
import { digestOf, layerTarGz } from '../../fixtures/layers.js'

void t.test('distinct digests: two extractions at once, two waiting, the rest refused', async (t) => {
  const layer = await layerTarGz([{ name: 'rpp-get', data: 'binary' }])
  const ref = { digest: digestOf(layer), size: layer.length, mediaType: 'application/vnd.oci.image.layer.v1.tar+gzip' }
  let open = 0
  let peak = 0
  const packages = {
    resolve: (_s: RegistrySource, _n: string, digest: string) => Promise.resolve({ digest, layer: ref, cached: true }),
    open: () => {
      peak = Math.max(peak, ++open)
      const stream = Readable.from([layer])
      stream.once('close', () => open--)
      return Promise.resolve({ stream, result: 'hit' })
    },
  } as unknown as PackageService
  const files = new RppGetFiles(packages, { slots: { max: 2, maxQueued: 2 } })
  const source = { repository: 'r', namePrefix: 'deckhouse/ce' } as unknown as RegistrySource
  const results = await Promise.allSettled(Array.from({ length: 6 }, (_, i) => files.get(source, `sha256:${String(i).repeat(64)}`)))
  const refused = results.filter((r) => r.status === 'rejected')
  t.equal(refused.length, 2, 'two ran, two waited, two were refused')
  t.match((refused[0] as PromiseRejectedResult).reason, { code: 'EBUSY', status: 503 })
  t.ok(peak <= 2, `at most two layers read at once (${peak})`)
  const ok = results.find((r) => r.status === 'fulfilled')
  t.equal(ok?.status === 'fulfilled' ? ok.value.data.toString() : undefined, 'binary')
})

/**
 * IconService's bounds on an unauthenticated route: versions that share their layers share one
 * extraction, and extractions of distinct images run a bounded number at once (more wait, the
 * rest get a 503), so memory does not grow with the number of concurrent requests.
 */
import t, { type Test } from 'tap'
import type { RegistrySource } from '../../../plugins/credentials/source.js'
import { IconService } from '../../../plugins/icons/icon-service.js'
import { ManifestResolver } from '../../../plugins/images/manifest-resolver.js'
import { RegistryClient } from '../../../plugins/packages/registry/registry-client.js'
import { FakeRegistry } from '../../fixtures/fake-registry.js'
import { layerTarGz } from '../../fixtures/layers.js'

const REPO = 'packages/fox/version'
const OCI = 'application/vnd.oci.image.manifest.v1+json'

async function setup(t: Test): Promise<{ registry: FakeRegistry; client: RegistryClient; source: RegistrySource }> {
  const registry = await FakeRegistry.start()
  t.teardown(() => registry.close())
  const client = new RegistryClient({ env: {} })
  t.teardown(() => client.close())
  const source = {
    name: 'main',
    registry: registry.host,
    scheme: 'http',
    namePrefix: 'packages',
    repository: `${registry.host}/packages`,
  } as unknown as RegistrySource
  return { registry, client, source }
}

/** A manifest over `layers` made distinct by an annotation, tagged `tag`. */
function manifestOver(registry: FakeRegistry, layers: Buffer[], tag: string): string {
  const config = Buffer.from('{}')
  const body = Buffer.from(
    JSON.stringify({
      schemaVersion: 2,
      mediaType: OCI,
      config: { mediaType: 'application/vnd.oci.image.config.v1+json', digest: registry.addBlob(REPO, config), size: config.length },
      layers: layers.map((l) => ({ mediaType: 'application/vnd.oci.image.layer.v1.tar+gzip', digest: registry.addBlob(REPO, l), size: l.length })),
      annotations: { version: tag },
    }),
  )
  const digest = registry.addRawManifest(REPO, body, OCI)
  registry.tag(REPO, tag, digest)
  return digest
}

void t.test('twenty versions over one shared layer: one extraction, one layer read', async (t) => {
  const { registry, client, source } = await setup(t)
  const layer = await layerTarGz([{ name: 'docs/icon.png', data: Buffer.alloc(256 * 1024, 1) }])
  const digests = Array.from({ length: 20 }, (_, i) => manifestOver(registry, [layer], `1.0.${i}`))
  t.equal(new Set(digests).size, 20, 'each version its own manifest digest')
  const icons = new IconService({ client, manifests: new ManifestResolver(client) })
  registry.resetCounts()
  const all = await Promise.all(digests.map((_, i) => icons.icon(source, REPO, `1.0.${i}`)))
  t.ok(
    all.every((r) => r.icon?.data.length === 256 * 1024),
    'every version has the icon',
  )
  t.same(
    all.map((r) => r.digest),
    digests,
    'each answered with its own digest (its ETag)',
  )
  t.equal(registry.counts.blob, 1, 'the shared layer was read once')
})

void t.test('distinct images: at most `max` extractions at once, `maxQueued` wait, the rest are refused with a 503', async (t) => {
  const { registry, client, source } = await setup(t)
  for (let i = 0; i < 8; i++) manifestOver(registry, [await layerTarGz([{ name: 'docs/icon.svg', data: `<svg>${i}</svg>` }])], `2.0.${i}`)
  let open = 0
  let peak = 0
  // Counts layer bodies open at once: one per running extraction.
  const counting = Object.create(client) as RegistryClient
  counting.openBlob = async (...args: Parameters<RegistryClient['openBlob']>) => {
    const blob = await client.openBlob(...args)
    peak = Math.max(peak, ++open)
    blob.body.once('close', () => open--)
    return blob
  }
  const manifests = new ManifestResolver(client)
  const icons = new IconService({ client: counting, manifests, slots: { max: 2, maxQueued: 3 } })
  // Manifests first, so all eight reach the extraction step together.
  await Promise.all(Array.from({ length: 8 }, (_, i) => manifests.fetch(source, REPO, `2.0.${i}`)))
  const results = await Promise.allSettled(Array.from({ length: 8 }, (_, i) => icons.icon(source, REPO, `2.0.${i}`)))
  const refused = results.filter((r) => r.status === 'rejected')
  t.equal(results.length - refused.length, 5, 'two ran and three waited')
  t.equal(refused.length, 3, 'three were refused')
  t.match((refused[0] as PromiseRejectedResult).reason, { code: 'EBUSY', status: 503, retryAfterSeconds: 5 })
  t.ok(peak <= 2, `at most two layers open at once (${peak})`)
  t.same(icons.extractions, { running: 0, queued: 0 }, 'every slot was given back')
})

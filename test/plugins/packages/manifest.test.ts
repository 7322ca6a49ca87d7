import t from 'tap'
import { DigestError, ManifestError } from '../../../errors.js'
import { DIGEST, parseManifest, sha256Digest, verifyDigest } from '../../../plugins/packages/manifest.js'
import { MEDIA_TYPES } from '../../fixtures/fake-registry.js'

const d = (c: string): string => `sha256:${c.repeat(64)}`
const doc = (o: unknown): Buffer => Buffer.from(JSON.stringify(o))

void t.test('DIGEST accepts only sha256 with 64 lowercase hex', (t) => {
  t.ok(DIGEST.test(d('a')))
  for (const bad of [d('A'), `sha512:${'a'.repeat(128)}`, `sha256:${'a'.repeat(63)}`, `sha256:${'a'.repeat(65)}`, `${d('a')}\n`, ` ${d('a')}`, 'sha256:']) {
    t.notOk(DIGEST.test(bad), JSON.stringify(bad))
  }
  t.end()
})

void t.test('verifyDigest and sha256Digest', (t) => {
  const body = Buffer.from('hello')
  t.equal(sha256Digest(body), 'sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824')
  t.doesNotThrow(() => verifyDigest('manifest', body, sha256Digest(body)))
  const err = (() => {
    try {
      verifyDigest('layer', body, d('0'))
    } catch (e) {
      return e
    }
    return undefined
  })()
  t.type(err, DigestError)
  t.match(err, { code: 'EDIGEST', what: 'layer', expected: d('0'), found: sha256Digest(body), status: 502 })
  t.end()
})

void t.test('image manifests yield their last layer', (t) => {
  for (const [name, mediaType, layerType] of [
    ['oci', MEDIA_TYPES.oci.manifest, MEDIA_TYPES.oci.layer],
    ['docker', MEDIA_TYPES.docker.manifest, MEDIA_TYPES.docker.layer],
  ] as const) {
    const parsed = parseManifest(
      doc({
        schemaVersion: 2,
        mediaType,
        config: { mediaType: 'x', digest: d('c'), size: 1 },
        layers: [
          { mediaType: layerType, digest: d('1'), size: 10 },
          { mediaType: layerType, digest: d('2'), size: 20 },
        ],
      }),
      'application/octet-stream',
    )
    t.same(parsed, { kind: 'image', layer: { digest: d('2'), size: 20, mediaType: layerType } }, name)
  }
  t.end()
})

void t.test('the media type may come from Content-Type or the document shape', (t) => {
  const noType = { schemaVersion: 2, layers: [{ digest: d('3'), size: 0 }] }
  t.same(parseManifest(doc(noType), MEDIA_TYPES.oci.manifest), { kind: 'image', layer: { digest: d('3'), size: 0, mediaType: '' } })
  t.same(parseManifest(doc(noType), ''), { kind: 'image', layer: { digest: d('3'), size: 0, mediaType: '' } }, 'by shape')
  const index = { schemaVersion: 2, manifests: [{ digest: d('4'), size: 5, platform: { os: 'linux', architecture: 'amd64' } }] }
  t.same(parseManifest(doc(index), ''), { kind: 'index', platformDigest: d('4') }, 'an index by shape')
  t.same(parseManifest(doc(index), MEDIA_TYPES.docker.index), { kind: 'index', platformDigest: d('4') }, 'by Content-Type')
  t.end()
})

void t.test('an index yields its linux/amd64 entry', (t) => {
  const index = {
    schemaVersion: 2,
    mediaType: MEDIA_TYPES.oci.index,
    manifests: [
      { digest: d('5'), size: 1, platform: { os: 'linux', architecture: 'arm64' } },
      { digest: d('6'), size: 1, platform: { os: 'windows', architecture: 'amd64' } },
      { digest: 'sha256:bad', size: 1, platform: { os: 'linux', architecture: 'amd64' } },
      { digest: d('7'), size: 1, platform: { os: 'linux', architecture: 'amd64' } },
      { digest: d('8'), size: 1, platform: { os: 'linux', architecture: 'amd64' } },
    ],
  }
  t.same(parseManifest(doc(index), ''), { kind: 'index', platformDigest: d('7') }, 'the first valid linux/amd64 entry')
  t.end()
})

void t.test('malformed documents are ManifestErrors', (t) => {
  const cases: Array<[string, Buffer, string]> = [
    ['not JSON', Buffer.from('{'), ''],
    ['null', Buffer.from('null'), ''],
    ['a string', Buffer.from('"x"'), ''],
    ['schema 1', doc({ schemaVersion: 1, fsLayers: [] }), ''],
    ['no schema version', doc({ layers: [{ digest: d('1'), size: 1 }] }), ''],
    ['schema version as a string', doc({ schemaVersion: '2', layers: [{ digest: d('1'), size: 1 }] }), ''],
    ['no layers', doc({ schemaVersion: 2, mediaType: MEDIA_TYPES.oci.manifest }), ''],
    ['empty layers', doc({ schemaVersion: 2, mediaType: MEDIA_TYPES.oci.manifest, layers: [] }), ''],
    ['layer without digest', doc({ schemaVersion: 2, layers: [{ size: 1 }] }), MEDIA_TYPES.oci.manifest],
    ['layer with uppercase digest', doc({ schemaVersion: 2, layers: [{ digest: d('A'), size: 1 }] }), MEDIA_TYPES.oci.manifest],
    ['layer with a negative size', doc({ schemaVersion: 2, layers: [{ digest: d('1'), size: -1 }] }), MEDIA_TYPES.oci.manifest],
    ['layer with a fractional size', doc({ schemaVersion: 2, layers: [{ digest: d('1'), size: 1.5 }] }), MEDIA_TYPES.oci.manifest],
    ['layer with a string size', doc({ schemaVersion: 2, layers: [{ digest: d('1'), size: '1' }] }), MEDIA_TYPES.oci.manifest],
    ['index without manifests', doc({ schemaVersion: 2, mediaType: MEDIA_TYPES.oci.index }), ''],
    [
      'index without amd64',
      doc({ schemaVersion: 2, mediaType: MEDIA_TYPES.oci.index, manifests: [{ digest: d('1'), size: 1, platform: { os: 'linux', architecture: 'arm64' } }] }),
      '',
    ],
    ['index entry without platform', doc({ schemaVersion: 2, mediaType: MEDIA_TYPES.docker.index, manifests: [{ digest: d('1'), size: 1 }] }), ''],
  ]
  for (const [name, body, type] of cases) {
    t.throws(() => parseManifest(body, type), ManifestError, name)
  }
  t.throws(() => parseManifest(Buffer.from('{'), ''), { code: 'EMANIFEST', status: 502 })
  t.end()
})

import t, { type Test } from 'tap'
import type { ServerInjectResponse } from '@hapi/hapi'
import { DEFAULT_PREFIX, MODULE_PREFIX, bytes, packageUrl, sha256, startHarness, waitCached } from '../fixtures/proxy-harness.js'
import { eventually } from '../fixtures/eventually.js'
import { MEDIA_TYPES } from '../fixtures/fake-registry.js'
import { makePackageTarGz } from '../fixtures/tarball.js'

const HEX = 'ab'.repeat(32)
const VALID = `sha256:${HEX}`

/** Asserts the JSON error shape (README, "HTTP API") and that no secret leaked into it. */
function assertError(t: Test, res: ServerInjectResponse, status: number, secrets: string[] = []): void {
  t.equal(res.statusCode, status, `status ${status}: ${res.payload}`)
  t.match(String(res.headers['content-type']), /^application\/json/)
  const body = JSON.parse(res.payload) as Record<string, unknown>
  t.same(Object.keys(body).sort(), ['code', 'error', 'message', 'statusCode'])
  t.equal(body.statusCode, status)
  t.match(body.code, /^E[A-Z]+$/, 'the stable code')
  t.type(body.error, 'string')
  t.type(body.message, 'string')
  for (const secret of secrets) t.notOk(res.payload.includes(secret), `the body does not contain ${secret.slice(0, 4)}…`)
}

/** Asserts every header README's "HTTP API" lists for a 200 of `data` named by `digest`. */
function assertPackageHeaders(t: Test, res: ServerInjectResponse, digest: string, length: number): void {
  t.equal(res.headers['content-type'], 'application/x-gzip')
  t.equal(res.headers['content-disposition'], `attachment; filename="${digest.slice('sha256:'.length)}.tar.gz"`)
  t.equal(res.headers['content-length'], String(length))
  t.equal(res.headers.etag, `"${digest}"`)
  t.equal(res.headers['cache-control'], 'public, max-age=31536000, immutable')
  t.equal(res.headers['accept-ranges'], 'bytes')
}

void t.test('400: malformed queries, and no upstream request at all', async (t) => {
  const h = await startHarness(t)
  const image = h.registry.addImage(DEFAULT_PREFIX, [bytes(100)])
  const repo = h.defaultRepository
  const cases: Array<[string, string]> = [
    ['missing digest', '/package'],
    ['empty digest', '/package?digest='],
    ['uppercase hex', packageUrl({ digest: `sha256:${HEX.toUpperCase()}` })],
    ['sha512', packageUrl({ digest: `sha512:${'ab'.repeat(64)}` })],
    ['no algorithm', packageUrl({ digest: HEX })],
    ['63 hex', packageUrl({ digest: `sha256:${HEX.slice(1)}` })],
    ['65 hex', packageUrl({ digest: `sha256:${HEX}0` })],
    ['non-hex', packageUrl({ digest: `sha256:${'zz'.repeat(32)}` })],
    ['repeated digest', `/package?digest=${image.manifestDigest}&digest=${image.manifestDigest}`],
    ['repeated path', `/package?digest=${image.manifestDigest}&path=a&path=b`],
    ['repository with ..', packageUrl({ digest: image.manifestDigest, repository: `${repo}/../other` })],
    ['repository with an empty segment', packageUrl({ digest: image.manifestDigest, repository: `${h.registry.host}/deckhouse//ce` })],
    ['repository with a trailing slash segment', packageUrl({ digest: image.manifestDigest, repository: `${repo}//` })],
    ['repository with bad characters', packageUrl({ digest: image.manifestDigest, repository: `${h.registry.host}/deck$house` })],
    ['repository with uppercase path', packageUrl({ digest: image.manifestDigest, repository: `${h.registry.host}/Deckhouse/ce` })],
    ['repository with a space', packageUrl({ digest: image.manifestDigest, repository: `${h.registry.host}/deck house` })],
    ['repository that is a URL', packageUrl({ digest: image.manifestDigest, repository: `http://${repo}` })],
    ['repository with a leading slash', packageUrl({ digest: image.manifestDigest, repository: `/${repo}` })],
    ['path with ..', packageUrl({ digest: image.manifestDigest, path: '../x' })],
    ['path with inner ..', packageUrl({ digest: image.manifestDigest, path: 'a/../../b' })],
    ['path with an empty segment', packageUrl({ digest: image.manifestDigest, path: 'a//b' })],
    ['path with two leading slashes', packageUrl({ digest: image.manifestDigest, path: '//a' })],
    ['path with a trailing slash', packageUrl({ digest: image.manifestDigest, path: 'a/' })],
    ['path with uppercase', packageUrl({ digest: image.manifestDigest, path: 'Pkg' })],
    ['path with a query-ish character', packageUrl({ digest: image.manifestDigest, path: 'a?b' })],
    ['path with a colon', packageUrl({ digest: image.manifestDigest, path: 'a:b' })],
  ]
  for (const [name, url] of cases) {
    const res = await h.proxy.server.inject(url)
    void t.test(name, (t) => {
      assertError(t, res, 400)
      t.end()
    })
  }
  const head = await h.proxy.server.inject({ method: 'HEAD', url: '/package?digest=nope' })
  t.equal(head.statusCode, 400, 'HEAD is validated too')
  t.equal(h.registry.counts.total, 0, 'no 400 made an upstream request')
})

void t.test('404: the registry has no such manifest', async (t) => {
  const h = await startHarness(t)
  const res = await h.proxy.server.inject(packageUrl({ digest: VALID }))
  assertError(t, res, 404)
  t.equal(h.registry.counts.manifest, 1, 'the registry was asked for the manifest')
  t.equal(h.registry.counts.blob, 0, 'no blob request')

  const image = h.registry.addImage(`${DEFAULT_PREFIX}/other`, [bytes(10)])
  const elsewhere = await h.proxy.server.inject(packageUrl({ digest: image.manifestDigest }))
  assertError(t, elsewhere, 404, [])
  t.equal(h.registry.counts.blob, 0, 'an image under another name is not found either')
})

void t.test('404: an unknown repository causes no upstream request of any kind', async (t) => {
  const h = await startHarness(t)
  const image = h.registry.addImage('other/repo', [bytes(10)])
  for (const repository of [
    `${h.registry.host}/other/repo`,
    `${h.registry.host}/deckhouse`,
    `${h.registry.host}/deckhouse/ce/sub`,
    // The registry's host without its port is another host (the bare host:port is the default).
    '127.0.0.1',
    '127.0.0.1:1/deckhouse/ce',
    'registry.example.com/deckhouse/ce',
  ]) {
    const res = await h.proxy.server.inject(packageUrl({ digest: image.manifestDigest, repository }))
    assertError(t, res, 404)
  }
  t.equal(h.registry.counts.total, 0, 'zero upstream requests')
})

void t.test('405: other methods, with Allow and a JSON body', async (t) => {
  const h = await startHarness(t)
  const image = h.registry.addImage(DEFAULT_PREFIX, [bytes(10)])
  for (const method of ['POST', 'PUT', 'DELETE', 'PATCH']) {
    const res = await h.proxy.server.inject({
      method,
      url: packageUrl({ digest: image.manifestDigest }),
      payload: { digest: image.manifestDigest },
    })
    assertError(t, res, 405)
    t.match(String(res.headers.allow), /\bGET\b/, `${method}: Allow names GET`)
    t.match(String(res.headers.allow), /\bHEAD\b/, `${method}: Allow names HEAD`)
  }
  t.equal(h.registry.counts.total, 0, 'no upstream request')
})

void t.test('405 even when the refused request carries a body that is not JSON', async (t) => {
  const h = await startHarness(t)
  const res = await h.proxy.server.inject({
    method: 'POST',
    url: packageUrl({ digest: VALID }),
    payload: '{not json',
    headers: { 'content-type': 'application/json' },
  })
  // README, "HTTP API": "405: any method but GET and HEAD". hapi parses the body of the catch-all route before
  // its handler runs, so a malformed body turns the 405 into a 400.
  assertError(t, res, 405)
  t.equal(h.registry.counts.total, 0)
})

void t.test('502: the registry refuses wrong Basic credentials; no secret in the body', async (t) => {
  const h = await startHarness(t, {
    auth: { kind: 'basic', username: 'puller', password: 'right-secret-1234' },
    credentials: { username: 'puller', password: 'wrong-secret-5678' },
  })
  const image = h.registry.addImage(DEFAULT_PREFIX, [bytes(10)])
  const res = await h.proxy.server.inject(packageUrl({ digest: image.manifestDigest }))
  assertError(t, res, 502, ['wrong-secret-5678', 'right-secret-1234', Buffer.from('puller:wrong-secret-5678').toString('base64')])
  t.equal(h.registry.counts.manifest, 2, 'anonymous, then once with the credentials: no retry loop')
  t.equal(h.registry.counts.blob, 0)
})

void t.test('502: registry statuses 403, 429, 500, 503 for the manifest', async (t) => {
  const h = await startHarness(t)
  const image = h.registry.addImage(DEFAULT_PREFIX, [bytes(10)])
  for (const status of [403, 429, 500, 503]) {
    h.registry.resetCounts()
    h.registry.faults = { manifestStatus: status, retryAfter: '0' }
    const res = await h.proxy.server.inject(packageUrl({ digest: image.manifestDigest }))
    assertError(t, res, 502)
    // 429 and 503 ask for a retry: two more attempts, then the error.
    const expected = status === 429 || status === 503 ? 3 : 1
    t.equal(h.registry.counts.manifest, expected, `${status}: ${expected} manifest request(s)`)
    t.equal(h.registry.counts.blob, 0, `${status}: no blob request`)
  }
  h.registry.faults = {}
  const ok = await h.proxy.server.inject(packageUrl({ digest: image.manifestDigest }))
  t.equal(ok.statusCode, 200, 'a failure is not remembered')
})

void t.test('502: the registry fails the blob before sending it', async (t) => {
  const h = await startHarness(t)
  const image = h.registry.addImage(DEFAULT_PREFIX, [bytes(10)])
  for (const status of [403, 500, 503]) {
    h.registry.faults = { blobStatus: status }
    const res = await h.proxy.server.inject(packageUrl({ digest: image.manifestDigest }))
    assertError(t, res, 502)
    await eventually(() => h.proxy.packages.service.activeFills === 0, 'the failed fill is gone', { intervalMs: 5 })
  }
  h.registry.faults = { blobStatus: 404 }
  const gone = await h.proxy.server.inject(packageUrl({ digest: image.manifestDigest }))
  t.ok(gone.statusCode === 404 || gone.statusCode === 502, `a blob the manifest names but the registry lacks: ${gone.statusCode}`)
})

void t.test('502: a manifest whose bytes do not match the digest', async (t) => {
  const h = await startHarness(t)
  const image = h.registry.addImage(DEFAULT_PREFIX, [bytes(10)])
  h.registry.faults = { corruptManifest: true }
  const res = await h.proxy.server.inject(packageUrl({ digest: image.manifestDigest }))
  assertError(t, res, 502)
  t.match(res.payload, /digest/)
  t.equal(h.registry.counts.blob, 0, 'no layer is fetched for an unverified manifest')
  const metrics = await h.proxy.metrics.registry.getSingleMetricAsString('registry_packages_proxy_digest_mismatches_total')
  t.match(metrics, /what="manifest"} 1/)
})

void t.test('502: malformed manifests', async (t) => {
  const h = await startHarness(t)
  const layer = h.registry.addBlob(DEFAULT_PREFIX, bytes(10))
  const arm = h.registry.addImage(`${DEFAULT_PREFIX}/arm`, [bytes(20)])
  const docs: Array<[string, Buffer, string]> = [
    ['garbage', Buffer.from('this is not json'), MEDIA_TYPES.oci.manifest],
    ['a JSON array', Buffer.from('[1,2]'), MEDIA_TYPES.oci.manifest],
    [
      'schema version 1',
      Buffer.from(JSON.stringify({ schemaVersion: 1, name: 'x', tag: 'y', fsLayers: [{ blobSum: layer }] })),
      // Labelled as schema 2, so the registry serves it for our Accept header.
      MEDIA_TYPES.docker.manifest,
    ],
    ['no layers', Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: MEDIA_TYPES.oci.manifest, config: {}, layers: [] })), MEDIA_TYPES.oci.manifest],
    [
      'a layer without a valid digest',
      Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: MEDIA_TYPES.oci.manifest, layers: [{ digest: 'md5:abc', size: 1 }] })),
      MEDIA_TYPES.oci.manifest,
    ],
    [
      'an index without linux/amd64',
      Buffer.from(
        JSON.stringify({
          schemaVersion: 2,
          mediaType: MEDIA_TYPES.oci.index,
          manifests: [{ mediaType: arm.mediaType, digest: arm.manifestDigest, size: arm.manifest.length, platform: { os: 'linux', architecture: 'arm64' } }],
        }),
      ),
      MEDIA_TYPES.oci.index,
    ],
  ]
  for (const [name, body, mediaType] of docs) {
    const digest = h.registry.addRawManifest(DEFAULT_PREFIX, body, mediaType)
    const res = await h.proxy.server.inject(packageUrl({ digest }))
    void t.test(name, (t) => {
      assertError(t, res, 502)
      t.end()
    })
  }
  t.equal(h.registry.counts.blob, 0, 'no layer request for any of them')
})

void t.test('504: the registry accepts the connection and never answers', async (t) => {
  const h = await startHarness(t, { timeouts: { headersMs: 300 } })
  h.registry.faults = { neverAnswer: true }
  const started = Date.now()
  const res = await h.proxy.server.inject(packageUrl({ digest: VALID }))
  assertError(t, res, 504)
  t.ok(Date.now() - started < 3000, 'answered soon after the timeout')
  t.equal(h.registry.counts.manifest, 1)
})

void t.test('504: the manifest comes later than headersMs; and the blob too', async (t) => {
  const h = await startHarness(t, { timeouts: { headersMs: 300 } })
  const image = h.registry.addImage(DEFAULT_PREFIX, [bytes(10)])
  h.registry.faults = { manifestDelayMs: 1500 }
  assertError(t, await h.proxy.server.inject(packageUrl({ digest: image.manifestDigest })), 504)
  t.equal(h.registry.counts.blob, 0)
  h.registry.faults = { blobDelayMs: 1500 }
  assertError(t, await h.proxy.server.inject(packageUrl({ digest: image.manifestDigest })), 504)
  t.equal(h.registry.counts.blob, 1)
})

void t.test('504: a manifest body that stalls after its headers (found from outside: no answer at all, for 300 s)', async (t) => {
  const h = await startHarness(t, { timeouts: { idleMs: 300 } })
  const image = h.registry.addImage(DEFAULT_PREFIX, [bytes(10)])
  h.registry.faults = { manifestStallAfterBytes: 10 }
  const started = Date.now()
  assertError(t, await h.proxy.server.inject(packageUrl({ digest: image.manifestDigest })), 504)
  t.ok(Date.now() - started < 3000, `answered after the idle timeout (${Date.now() - started} ms)`)
  t.equal(h.registry.counts.blob, 0)
  t.same(h.proxy.packages.service.lookups, { running: 0, queued: 0 }, 'the lookup slot is free again')
})

void t.test('200: headers exactly per the contract, body byte-exact (OCI)', async (t) => {
  const h = await startHarness(t)
  const pkg = makePackageTarGz({ install: '#!/bin/sh\necho ok\n', 'data/file.txt': bytes(3000) })
  const image = h.registry.addImage(DEFAULT_PREFIX, [bytes(50), pkg])
  const res = await h.proxy.server.inject(packageUrl({ digest: image.manifestDigest }))
  t.equal(res.statusCode, 200)
  assertPackageHeaders(t, res, image.manifestDigest, pkg.length)
  t.ok(res.rawPayload.equals(pkg), 'the last layer, byte for byte')
  t.equal(h.registry.counts.manifest, 1)
  t.equal(h.registry.counts.blob, 1, 'only the last layer is fetched')
  t.ok(h.registry.requests.some((r) => r.url === `/v2/${DEFAULT_PREFIX}/blobs/${sha256(pkg)}`))
  const accept = String(h.registry.requests.find((r) => r.url.includes('/manifests/'))?.headers.accept)
  for (const type of [MEDIA_TYPES.oci.manifest, MEDIA_TYPES.oci.index, MEDIA_TYPES.docker.manifest, MEDIA_TYPES.docker.index]) {
    t.ok(accept.includes(type), `Accept names ${type}`)
  }
})

void t.test('200: Docker schema 2 image and manifest list', async (t) => {
  const h = await startHarness(t)
  const amd = h.registry.addImage(DEFAULT_PREFIX, [bytes(30, 1), bytes(40, 2)], { mediaType: 'docker' })
  const arm = h.registry.addImage(DEFAULT_PREFIX, [bytes(50, 3)], { mediaType: 'docker' })
  const res = await h.proxy.server.inject(packageUrl({ digest: amd.manifestDigest }))
  t.equal(res.statusCode, 200)
  assertPackageHeaders(t, res, amd.manifestDigest, 40)
  t.ok(res.rawPayload.equals(amd.lastLayer.data))

  const list = h.registry.addIndex(
    DEFAULT_PREFIX,
    [
      { image: arm, os: 'linux', architecture: 'arm64' },
      { image: amd, os: 'linux', architecture: 'amd64' },
    ],
    { mediaType: 'docker' },
  )
  const viaList = await h.proxy.server.inject(packageUrl({ digest: list.digest }))
  t.equal(viaList.statusCode, 200)
  assertPackageHeaders(t, viaList, list.digest, 40)
  t.ok(viaList.rawPayload.equals(amd.lastLayer.data), 'the amd64 layer')
})

void t.test('200: an OCI index resolves to its linux/amd64 image', async (t) => {
  const h = await startHarness(t)
  const arm = h.registry.addImage(DEFAULT_PREFIX, [bytes(1000, 7)])
  const windows = h.registry.addImage(DEFAULT_PREFIX, [bytes(1100, 8)])
  const amd = h.registry.addImage(DEFAULT_PREFIX, [bytes(1200, 9)])
  const index = h.registry.addIndex(DEFAULT_PREFIX, [
    { image: arm, os: 'linux', architecture: 'arm64', variant: 'v8' },
    { image: windows, os: 'windows', architecture: 'amd64' },
    { image: amd, os: 'linux', architecture: 'amd64' },
  ])
  const res = await h.proxy.server.inject(packageUrl({ digest: index.digest }))
  t.equal(res.statusCode, 200)
  assertPackageHeaders(t, res, index.digest, 1200)
  t.ok(res.rawPayload.equals(amd.lastLayer.data), 'the linux/amd64 layer')
  t.equal(h.registry.counts.manifest, 2, 'the index, then the amd64 manifest')
  t.ok(h.registry.requests.some((r) => r.url.endsWith(`/manifests/${amd.manifestDigest}`)))
  t.notOk(
    h.registry.requests.some((r) => r.url.includes(arm.lastLayer.digest)),
    'never the arm64 layer',
  )
  t.equal(h.registry.counts.blob, 1)
})

void t.test('repository selects a module source or the default source', async (t) => {
  const h = await startHarness(t)
  const mod = h.registry.addImage(MODULE_PREFIX, [bytes(300, 1)])
  const def = h.registry.addImage(DEFAULT_PREFIX, [bytes(400, 2)])

  const viaModule = await h.proxy.server.inject(packageUrl({ digest: mod.manifestDigest, repository: h.moduleRepository }))
  t.equal(viaModule.statusCode, 200)
  t.ok(viaModule.rawPayload.equals(mod.lastLayer.data))
  t.ok(h.registry.requests.some((r) => r.url === `/v2/${MODULE_PREFIX}/manifests/${mod.manifestDigest}`))

  const viaDefault = await h.proxy.server.inject(packageUrl({ digest: def.manifestDigest, repository: h.defaultRepository }))
  t.equal(viaDefault.statusCode, 200, 'the default source by its own address/path')
  t.ok(viaDefault.rawPayload.equals(def.lastLayer.data))

  const absent = await h.proxy.server.inject(packageUrl({ digest: def.manifestDigest, repository: '' }))
  t.equal(absent.statusCode, 200, 'an empty repository means the default source')

  // Another module image, not cached yet, asked for through the default source.
  const mod2 = h.registry.addImage(MODULE_PREFIX, [bytes(301, 9)])
  h.registry.resetCounts()
  const wrongSource = await h.proxy.server.inject(packageUrl({ digest: mod2.manifestDigest, repository: h.defaultRepository }))
  assertError(t, wrongSource, 404)
  t.ok(
    h.registry.requests.every((r) => !r.url.includes(MODULE_PREFIX)),
    'the default source never reads the module repository',
  )
})

void t.test('path is appended to the source repository', async (t) => {
  const h = await startHarness(t)
  const deep = h.registry.addImage(`${DEFAULT_PREFIX}/pkgs/tool_x`, [bytes(500, 4)])
  const res = await h.proxy.server.inject(packageUrl({ digest: deep.manifestDigest, path: 'pkgs/tool_x' }))
  t.equal(res.statusCode, 200)
  t.ok(res.rawPayload.equals(deep.lastLayer.data))
  t.ok(h.registry.requests.some((r) => r.url === `/v2/${DEFAULT_PREFIX}/pkgs/tool_x/manifests/${deep.manifestDigest}`))
  t.ok(h.registry.requests.some((r) => r.url === `/v2/${DEFAULT_PREFIX}/pkgs/tool_x/blobs/${deep.lastLayer.digest}`))

  const mod = h.registry.addImage(`${MODULE_PREFIX}/sub`, [bytes(600, 5)])
  const viaModule = await h.proxy.server.inject(packageUrl({ digest: mod.manifestDigest, repository: h.moduleRepository, path: 'sub' }))
  t.equal(viaModule.statusCode, 200)
  t.ok(viaModule.rawPayload.equals(mod.lastLayer.data))
  t.ok(h.registry.requests.some((r) => r.url === `/v2/${MODULE_PREFIX}/sub/manifests/${mod.manifestDigest}`))
})

void t.test('the request forms real clients send: a bare registry host, a trailing /, a leading / on path', async (t) => {
  const h = await startHarness(t)
  const def = h.registry.addImage(`${DEFAULT_PREFIX}/pkgs/tool`, [bytes(700, 6)])
  const mod = h.registry.addImage(`${MODULE_PREFIX}/sub`, [bytes(800, 7)])
  const forms: Array<[string, { repository?: string; path: string }, typeof def]> = [
    ['the bare registry host selects the default source', { repository: h.registry.host, path: 'pkgs/tool' }, def],
    ['a trailing / on the bare host', { repository: `${h.registry.host}/`, path: 'pkgs/tool' }, def],
    ['a trailing / on the default address/path', { repository: `${h.defaultRepository}/`, path: 'pkgs/tool' }, def],
    ['a leading / on path (rpp-get passes path on as given)', { path: '/pkgs/tool' }, def],
    ['a trailing / on a module source repo, and a leading / on path', { repository: `${h.moduleRepository}/`, path: '/sub' }, mod],
  ]
  for (const [name, q, image] of forms) {
    h.registry.resetCounts()
    // HEAD: the manifest request alone shows which repository the proxy chose.
    const res = await h.proxy.server.inject({ method: 'HEAD', url: packageUrl({ digest: image.manifestDigest, ...q }) })
    t.equal(res.statusCode, 200, name)
    t.same(
      h.registry.requests.map((r) => r.url),
      [`/v2/${image.repo}/manifests/${image.manifestDigest}`],
      `${name}: the manifest is asked for at ${image.repo}`,
    )
  }
  const got = await h.proxy.server.inject(packageUrl({ digest: def.manifestDigest, repository: h.registry.host, path: '/pkgs/tool' }))
  t.equal(got.statusCode, 200)
  t.ok(got.rawPayload.equals(def.lastLayer.data), 'and a GET in those forms gets the bytes')

  h.registry.resetCounts()
  for (const q of [{ path: '//pkgs/tool' }, { repository: `${h.registry.host}//` }, { path: 'pkgs/tool/' }]) {
    assertError(t, await h.proxy.server.inject(packageUrl({ digest: def.manifestDigest, ...q })), 400)
  }
  assertError(t, await h.proxy.server.inject(packageUrl({ digest: def.manifestDigest, repository: '127.0.0.2:1' })), 404)
  t.equal(h.registry.counts.total, 0, 'refused forms and another host cause no upstream request')
})

void t.test('HEAD on a miss fetches the manifest only', async (t) => {
  const h = await startHarness(t)
  const image = h.registry.addImage(DEFAULT_PREFIX, [bytes(2000)])
  const res = await h.proxy.server.inject({ method: 'HEAD', url: packageUrl({ digest: image.manifestDigest }) })
  t.equal(res.statusCode, 200)
  assertPackageHeaders(t, res, image.manifestDigest, 2000)
  t.equal(res.rawPayload.length, 0)
  t.equal(h.registry.counts.manifest, 1)
  t.equal(h.registry.counts.blob, 0, 'no layer request for HEAD')
  t.equal(h.proxy.packages.service.activeFills, 0)

  const ranged = await h.proxy.server.inject({
    method: 'HEAD',
    url: packageUrl({ digest: image.manifestDigest }),
    headers: { range: 'bytes=0-9' },
  })
  t.equal(ranged.statusCode, 206)
  t.equal(ranged.headers['content-range'], 'bytes 0-9/2000')
  t.equal(ranged.headers['content-length'], '10')
  t.equal(h.registry.counts.blob, 0)
})

void t.test('Range on a miss and on a hit', async (t) => {
  const h = await startHarness(t)
  const data = bytes(100, 11)
  const image = h.registry.addImage(DEFAULT_PREFIX, [data])
  const url = packageUrl({ digest: image.manifestDigest })
  const range = async (header: string): Promise<ServerInjectResponse> => h.proxy.server.inject({ url, headers: { range: header } })

  const miss = await range('bytes=10-19')
  t.equal(miss.statusCode, 206, 'a miss')
  t.equal(miss.headers['content-range'], 'bytes 10-19/100')
  t.equal(miss.headers['content-length'], '10')
  t.ok(miss.rawPayload.equals(data.subarray(10, 20)))
  t.equal(h.registry.counts.blob, 1)
  t.equal(h.registry.counts.blobRange, 0, 'the whole layer is fetched (it has to be verified)')
  await waitCached(h, image.manifestDigest, image.lastLayer.digest)

  h.registry.resetCounts()
  const hit = await range('bytes=10-19')
  t.equal(hit.statusCode, 206, 'a hit')
  t.equal(hit.headers['content-range'], 'bytes 10-19/100')
  t.ok(hit.rawPayload.equals(data.subarray(10, 20)))

  const suffix = await range('bytes=-5')
  t.equal(suffix.statusCode, 206)
  t.equal(suffix.headers['content-range'], 'bytes 95-99/100')
  t.ok(suffix.rawPayload.equals(data.subarray(95)))

  const open = await range('bytes=5-')
  t.equal(open.statusCode, 206)
  t.equal(open.headers['content-range'], 'bytes 5-99/100')
  t.equal(open.headers['content-length'], '95')
  t.ok(open.rawPayload.equals(data.subarray(5)))

  const clipped = await range('bytes=90-1000')
  t.equal(clipped.headers['content-range'], 'bytes 90-99/100')
  t.ok(clipped.rawPayload.equals(data.subarray(90)))

  const whole = await range('bytes=0-99')
  t.equal(whole.statusCode, 206)
  t.ok(whole.rawPayload.equals(data))

  for (const bad of ['bytes=100-', 'bytes=500-600', 'bytes=-0']) {
    const res = await range(bad)
    t.equal(res.statusCode, 416, `${bad}: 416`)
    t.equal(res.headers['content-range'], 'bytes */100')
  }

  const ignored = await range('items=0-1')
  t.equal(ignored.statusCode, 200, 'an unknown unit is ignored')
  t.ok(ignored.rawPayload.equals(data))

  const ifRangeOther = await h.proxy.server.inject({ url, headers: { range: 'bytes=0-1', 'if-range': '"sha256:other"' } })
  t.equal(ifRangeOther.statusCode, 200, 'If-Range with another ETag gets the whole package')
  const ifRangeSame = await h.proxy.server.inject({ url, headers: { range: 'bytes=0-1', 'if-range': `"${image.manifestDigest}"` } })
  t.equal(ifRangeSame.statusCode, 206)

  t.equal(h.registry.counts.total, 0, 'hits and range answers need no registry', {
    requests: h.registry.requests.map((r) => `${r.method} ${r.url} ${String(r.headers.range)}`),
  })
})

void t.test('416 on a miss fetches no layer', async (t) => {
  const h = await startHarness(t)
  const image = h.registry.addImage(DEFAULT_PREFIX, [bytes(100, 12)])
  const res = await h.proxy.server.inject({ url: packageUrl({ digest: image.manifestDigest }), headers: { range: 'bytes=200-' } })
  t.equal(res.statusCode, 416)
  t.equal(res.headers['content-range'], 'bytes */100')
  t.equal(h.registry.counts.blob, 0)
  // An error must not be cached for a year like the package itself.
  t.notMatch(String(res.headers['cache-control']), /immutable|max-age=31536000/, `416 Cache-Control: ${String(res.headers['cache-control'])}`)
  t.notOk(res.headers.etag, 'and carries no ETag of the package')
  t.same(JSON.parse(res.payload), { statusCode: 416, error: 'Range Not Satisfiable', message: 'the package has 100 bytes', code: 'ERANGE' })
  t.equal(res.headers['accept-ranges'], 'bytes')
})

void t.test('If-None-Match with the ETag: 304 without any registry request', async (t) => {
  const h = await startHarness(t)
  const image = h.registry.addImage(DEFAULT_PREFIX, [bytes(100, 13)])
  const url = packageUrl({ digest: image.manifestDigest })
  for (const header of [`"${image.manifestDigest}"`, `W/"${image.manifestDigest}"`, `"sha256:${HEX}", "${image.manifestDigest}"`]) {
    const res = await h.proxy.server.inject({ url, headers: { 'if-none-match': header } })
    t.equal(res.statusCode, 304, header)
    t.equal(res.headers.etag, `"${image.manifestDigest}"`)
    t.equal(res.rawPayload.length, 0)
  }
  const head = await h.proxy.server.inject({ method: 'HEAD', url, headers: { 'if-none-match': `"${image.manifestDigest}"` } })
  t.equal(head.statusCode, 304)
  t.equal(h.registry.counts.total, 0, 'no upstream request at all')

  const other = await h.proxy.server.inject({ url, headers: { 'if-none-match': `"sha256:${HEX}"` } })
  t.equal(other.statusCode, 200, 'another ETag does not match')
  t.ok(other.rawPayload.equals(image.lastLayer.data))
})

void t.test('If-None-Match: * is no shortcut: the digest is looked up like any other', async (t) => {
  const h = await startHarness(t)
  const image = h.registry.addImage(DEFAULT_PREFIX, [bytes(100, 14)])
  const missing = await h.proxy.server.inject({ url: packageUrl({ digest: VALID }), headers: { 'if-none-match': '*' } })
  assertError(t, missing, 404)
  t.equal(h.registry.counts.manifest, 1, 'a digest that exists nowhere is asked for, and is a 404')

  h.registry.resetCounts()
  const present = await h.proxy.server.inject({ url: packageUrl({ digest: image.manifestDigest }), headers: { 'if-none-match': '*' } })
  t.equal(present.statusCode, 304, 'one that exists: 304 (any current representation matches *)')
  t.equal(present.headers.etag, `"${image.manifestDigest}"`)
  t.equal(h.registry.counts.manifest, 1, 'after looking it up')
  t.equal(h.registry.counts.blob, 0, 'without fetching the layer')

  const unknownRepo = await h.proxy.server.inject({
    url: packageUrl({ digest: image.manifestDigest, repository: 'other.example.com/x' }),
    headers: { 'if-none-match': '*' },
  })
  assertError(t, unknownRepo, 404)
})

void t.test('an empty layer is served as an empty 200', async (t) => {
  const h = await startHarness(t)
  const image = h.registry.addImage(DEFAULT_PREFIX, [Buffer.alloc(0)])
  const res = await h.proxy.server.inject(packageUrl({ digest: image.manifestDigest }))
  t.equal(res.statusCode, 200)
  t.equal(res.headers['content-length'], '0')
  t.equal(res.rawPayload.length, 0)
})

void t.test('502: a manifest that gives a layer we hold, or are downloading, another size (never a cut-short 200)', async (t) => {
  const h = await startHarness(t)
  const image = h.registry.addImage(DEFAULT_PREFIX, [bytes(130, 16)])
  const config = Buffer.from('{"architecture":"amd64","os":"linux"}')
  const configDigest = h.registry.addBlob(DEFAULT_PREFIX, config)
  const liar = (size: number): string =>
    h.registry.addRawManifest(
      DEFAULT_PREFIX,
      Buffer.from(
        JSON.stringify({
          schemaVersion: 2,
          mediaType: MEDIA_TYPES.oci.manifest,
          config: { mediaType: 'application/vnd.oci.image.config.v1+json', digest: configDigest, size: config.length },
          layers: [{ mediaType: 'application/vnd.oci.image.layer.v1.tar+gzip', digest: image.lastLayer.digest, size }],
        }),
      ),
      MEDIA_TYPES.oci.manifest,
    )
  // While the true layer downloads (slowly), and once it is cached.
  h.registry.faults = { blobChunkSize: 16, blobChunkDelayMs: 30 }
  const filling = h.proxy.server.inject(packageUrl({ digest: image.manifestDigest }))
  await eventually(() => h.proxy.packages.service.activeFills === 1, 'the true layer is downloading', { intervalMs: 5 })
  for (const size of [5, 230]) assertError(t, await h.proxy.server.inject(packageUrl({ digest: liar(size) })), 502)
  t.ok((await filling).rawPayload.equals(image.lastLayer.data), 'the true download is unharmed')
  await waitCached(h, image.manifestDigest, image.lastLayer.digest)
  for (const size of [5, 230]) {
    const res = await h.proxy.server.inject(packageUrl({ digest: liar(size + 1) }))
    assertError(t, res, 502)
    t.match(res.payload, /has 130/, `size ${size + 1}: the message says what the layer has`)
  }
  t.ok(
    (await h.proxy.server.inject(packageUrl({ digest: image.manifestDigest }))).rawPayload.equals(image.lastLayer.data),
    'and the true manifest is still a hit',
  )
})

void t.test('a layer the manifest calls empty must have the empty digest: anything else is a 502, never an empty 200', async (t) => {
  const h = await startHarness(t)
  // The manifest says size 0, but names a layer with content (which the registry would serve).
  const content = bytes(64, 15)
  const layerDigest = h.registry.addBlob(DEFAULT_PREFIX, content)
  const config = Buffer.from('{"architecture":"amd64","os":"linux"}')
  const configDigest = h.registry.addBlob(DEFAULT_PREFIX, config)
  const manifest = Buffer.from(
    JSON.stringify({
      schemaVersion: 2,
      mediaType: MEDIA_TYPES.oci.manifest,
      config: { mediaType: MEDIA_TYPES.oci.config, digest: configDigest, size: config.length },
      layers: [{ mediaType: MEDIA_TYPES.oci.layer, digest: layerDigest, size: 0 }],
    }),
  )
  const digest = h.registry.addRawManifest(DEFAULT_PREFIX, manifest, MEDIA_TYPES.oci.manifest)
  for (const method of ['GET', 'HEAD'] as const) {
    const res = await h.proxy.server.inject({ method, url: packageUrl({ digest }) })
    t.equal(res.statusCode, 502, `${method}: a digest mismatch`)
    if (method === 'GET') {
      assertError(t, res, 502)
      t.match(JSON.parse(res.payload), { message: /layer digest mismatch/ })
    }
  }
  t.match((await h.proxy.server.inject('/metrics')).payload, /registry_packages_proxy_digest_mismatches_total\{what="layer"\} [1-9]/)
})

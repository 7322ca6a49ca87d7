/**
 * `/v1/images/`: the Deckhouse CLI from the default registry, against the fake registry (its
 * counters show what went upstream; its switches page tag lists and inject faults).
 */
import t from 'tap'
import { makePackageTarGz } from '../fixtures/tarball.js'
import { DEFAULT_PREFIX, startHarness, type Harness } from '../fixtures/proxy-harness.js'

const CLI = `${DEFAULT_PREFIX}/deckhouse-cli`

function cliLayer(text: string): Buffer {
  return makePackageTarGz({ 'bin/d8': `#!/bin/sh\necho ${text}\n` })
}

/** A CLI image tagged `version` under `repo`; returns its manifest digest and last layer. */
function addCli(h: Harness, repo: string, version: string, text = version): { digest: string; layer: Buffer } {
  const image = h.registry.addImage(repo, [makePackageTarGz({ 'etc/base': 'base' }), cliLayer(text)])
  h.registry.tag(repo, version, image.manifestDigest)
  return { digest: image.manifestDigest, layer: image.lastLayer.data }
}

void t.test('tags: every page of the registry tag list, in one answer', async (t) => {
  const h = await startHarness(t)
  const { digest } = addCli(h, CLI, 'v1.0.0')
  for (let i = 0; i < 249; i++) h.registry.tag(CLI, `v0.${i}.0`, digest)
  h.registry.tagPageSize = 100
  h.registry.resetCounts()
  const res = await h.proxy.server.inject('/v1/images/deckhouse-cli/tags')
  t.equal(res.statusCode, 200)
  t.match(res.headers['content-type'], /^application\/json/)
  const body = res.result as { name: string; tags: string[] }
  t.equal(body.name, 'deckhouse-cli')
  t.equal(body.tags.length, 251, 'latest, v1.0.0 and 249 more')
  t.equal(new Set(body.tags).size, 251, 'no tag twice across pages')
  t.equal(h.registry.counts.tags, 3, 'three pages of 100 followed through Link headers')
})

void t.test('tags: a plugin image, the edition-root fallback, 404, 405 and 502', async (t) => {
  const h = await startHarness(t)
  // Published once for all editions: under `deckhouse/`, not `deckhouse/ce/`.
  addCli(h, 'deckhouse/deckhouse-cli/plugins/delivery', 'v0.1.0')
  h.registry.resetCounts()
  const plugin = await h.proxy.server.inject('/v1/images/deckhouse-cli/plugins/delivery/tags')
  t.equal(plugin.statusCode, 200)
  t.same((plugin.result as { tags: string[] }).tags.sort(), ['latest', 'v0.1.0'])
  t.same(
    h.registry.requests.map((r) => r.url),
    ['/v2/deckhouse/ce/deckhouse-cli/plugins/delivery/tags/list', '/v2/deckhouse/deckhouse-cli/plugins/delivery/tags/list'],
    'the edition path first, then the edition root, once',
  )
  t.equal((await h.proxy.server.inject('/v1/images/deckhouse-cli/tags')).statusCode, 404, 'no such repository anywhere')
  t.equal((await h.proxy.server.inject({ method: 'POST', url: '/v1/images/deckhouse-cli/tags' })).statusCode, 405)
  t.equal((await h.proxy.server.inject({ method: 'DELETE', url: '/v1/images/deckhouse-cli/images/v1' })).statusCode, 405)
  h.registry.tagsStatus = 500
  const failed = await h.proxy.server.inject('/v1/images/deckhouse-cli/plugins/delivery/tags')
  t.equal(failed.statusCode, 502)
  t.match(JSON.parse(failed.payload), { statusCode: 502, error: 'Bad Gateway' })
})

void t.test('images other than the CLI are 404 without any connection to the registry', async (t) => {
  const h = await startHarness(t)
  addCli(h, CLI, 'v1.0.0')
  h.registry.resetCounts()
  for (const path of [
    '/v1/images/other/tags',
    '/v1/images/deckhouse-cli/plugins/Not_Valid/tags',
    '/v1/images/deckhouse-cli/plugins/a/b/tags',
    '/v1/images/deckhouse-cli/extra/tags',
    '/v1/images/deckhouse-cli',
    '/v1/images/',
    '/v1/images/deckhouse/images/v1.0.0',
    '/v1/images/deckhouse-cli/../ce/tags',
  ]) {
    t.equal((await h.proxy.server.inject(path)).statusCode, 404, path)
  }
  t.equal(h.registry.counts.total, 0, 'nothing was sent upstream')
})

void t.test('download: the last layer, its headers, HEAD, Range, 304 and one tag lookup for many clients', async (t) => {
  const h = await startHarness(t, { tagTtlMs: 0 })
  const { digest, layer } = addCli(h, CLI, 'v1.2.3')
  h.registry.resetCounts()
  const url = '/v1/images/deckhouse-cli/images/v1.2.3'

  const head = await h.proxy.server.inject({ method: 'HEAD', url })
  t.equal(head.statusCode, 200)
  t.equal(head.headers['content-length'], String(layer.length))
  t.equal(h.registry.counts.blob, 0, 'HEAD fetched no layer')
  h.registry.resetCounts()

  const responses = await Promise.all(Array.from({ length: 6 }, () => h.proxy.server.inject(url)))
  for (const res of responses) {
    t.equal(res.statusCode, 200)
    t.ok(res.rawPayload.equals(layer), 'the last layer, byte for byte')
  }
  const res = responses[0]
  t.match(res?.headers, {
    'content-type': 'application/x-gzip',
    'content-disposition': 'attachment; filename="deckhouse-cli-v1.2.3.tar.gz"',
    etag: `"${digest}"`,
    'docker-content-digest': digest,
    'cache-control': 'no-cache',
    'accept-ranges': 'bytes',
  })
  t.equal(h.registry.counts.blob, 1, 'one layer download for six clients')
  const byTag = h.registry.requests.filter((r) => r.url.endsWith('/manifests/v1.2.3')).length
  t.equal(byTag, 1, 'six concurrent tag lookups shared one registry request')

  const ranged = await h.proxy.server.inject({ url, headers: { range: 'bytes=10-19' } })
  t.equal(ranged.statusCode, 206)
  t.equal(ranged.headers['content-range'], `bytes 10-19/${layer.length}`)
  t.ok(ranged.rawPayload.equals(layer.subarray(10, 20)))
  t.equal((await h.proxy.server.inject({ url, headers: { range: `bytes=${layer.length}-` } })).statusCode, 416)

  const before = h.registry.counts.manifest
  const notModified = await h.proxy.server.inject({ url, headers: { 'if-none-match': `"${digest}"` } })
  t.equal(notModified.statusCode, 304)
  t.equal(h.registry.counts.manifest, before + 1, 'the tag was resolved again before answering 304')

  // The tag moves: the same URL now serves the new image, and the old ETag no longer matches.
  const moved = addCli(h, CLI, 'v1.2.3', 'rebuilt')
  const after = await h.proxy.server.inject({ url, headers: { 'if-none-match': `"${digest}"` } })
  t.equal(after.statusCode, 200)
  t.equal(after.headers.etag, `"${moved.digest}"`)
  t.ok(after.rawPayload.equals(moved.layer))
})

void t.test('download: platform selection in an index, 400 before any connection, 404s', async (t) => {
  const h = await startHarness(t)
  const amd = h.registry.addImage(CLI, [cliLayer('amd64')])
  const arm = h.registry.addImage(CLI, [cliLayer('arm64')])
  const index = h.registry.addIndex(CLI, [
    { image: amd, os: 'linux', architecture: 'amd64' },
    { image: arm, os: 'linux', architecture: 'arm64', variant: 'v8' },
  ])
  h.registry.tag(CLI, 'v2.0.0', index.digest)
  const url = '/v1/images/deckhouse-cli/images/v2.0.0'
  const plain = await h.proxy.server.inject(url)
  t.equal(plain.statusCode, 200)
  t.ok(plain.rawPayload.equals(amd.lastLayer.data), 'linux-amd64 by default')
  t.equal(plain.headers.etag, `"${amd.manifestDigest}"`, 'the ETag names the image served')
  for (const platform of ['linux-arm64', 'linux-arm64-v8']) {
    const res = await h.proxy.server.inject(`${url}?platform=${platform}`)
    t.equal(res.statusCode, 200, platform)
    t.ok(res.rawPayload.equals(arm.lastLayer.data), `${platform} is the arm64 image`)
  }
  t.equal((await h.proxy.server.inject(`${url}?platform=linux-arm64-v7`)).statusCode, 404, 'no such variant')
  t.equal((await h.proxy.server.inject(`${url}?platform=darwin-amd64`)).statusCode, 404, 'no such platform')
  t.equal((await h.proxy.server.inject('/v1/images/deckhouse-cli/images/v9.9.9')).statusCode, 404, 'no such tag')
  h.registry.resetCounts()
  for (const bad of ['?platform=linux', '?platform=Linux-amd64', '?platform=linux-amd64-v8-x', '?platform=a&platform=b']) {
    t.equal((await h.proxy.server.inject(`${url}${bad}`)).statusCode, 400, bad)
  }
  t.equal((await h.proxy.server.inject('/v1/images/deckhouse-cli/images/bad%20tag')).statusCode, 400, 'a version that is no tag')
  t.equal(h.registry.counts.total, 0, 'no request left for the registry')
})

void t.test('download: registry failures are 502, a registry that does not answer 504', async (t) => {
  const h = await startHarness(t, { tagTtlMs: 0, timeouts: { headersMs: 300 } })
  addCli(h, CLI, 'v1.0.0')
  const url = '/v1/images/deckhouse-cli/images/v1.0.0'
  h.registry.faults = { manifestStatus: 500 }
  t.equal((await h.proxy.server.inject(url)).statusCode, 502)
  h.registry.faults = { manifestStatus: 403 }
  t.equal((await h.proxy.server.inject(url)).statusCode, 502)
  h.registry.faults = { neverAnswer: true }
  t.equal((await h.proxy.server.inject(url)).statusCode, 504)
  h.registry.faults = { corruptBlob: true }
  const corrupt = await h.proxy.server.inject(url).then(
    (res) => ({ status: res.statusCode, complete: true }),
    () => ({ status: 0, complete: false }),
  )
  t.notOk(corrupt.status === 200 && corrupt.complete, 'a layer that fails verification never arrives as a complete 200')
})

void t.test('manifests: the bytes as stored by tag or digest, verified by digest', async (t) => {
  const h = await startHarness(t, { tagTtlMs: 0 })
  const image = h.registry.addImage(CLI, [cliLayer('m')])
  h.registry.tag(CLI, 'v3.0.0', image.manifestDigest)
  const byTag = await h.proxy.server.inject('/v1/images/deckhouse-cli/manifests/v3.0.0')
  t.equal(byTag.statusCode, 200)
  t.ok(byTag.rawPayload.equals(image.manifest))
  t.equal(byTag.headers['content-type'], image.mediaType)
  t.equal(byTag.headers['docker-content-digest'], image.manifestDigest)
  t.equal(byTag.headers['cache-control'], 'no-cache')
  const byDigest = await h.proxy.server.inject(`/v1/images/deckhouse-cli/manifests/${image.manifestDigest}`)
  t.equal(byDigest.statusCode, 200)
  t.match(byDigest.headers['cache-control'], /immutable/)
  const again = await h.proxy.server.inject({ url: '/v1/images/deckhouse-cli/manifests/v3.0.0', headers: { 'if-none-match': `"${image.manifestDigest}"` } })
  t.equal(again.statusCode, 304)
  t.equal((await h.proxy.server.inject('/v1/images/deckhouse-cli/manifests/v4.0.0')).statusCode, 404)
  t.equal((await h.proxy.server.inject('/v1/images/deckhouse-cli/manifests/sha256:abc')).statusCode, 400)
  h.registry.faults = { corruptManifest: true }
  t.equal((await h.proxy.server.inject(`/v1/images/deckhouse-cli/manifests/${image.manifestDigest}`)).statusCode, 502, 'bytes that do not match the digest')
})

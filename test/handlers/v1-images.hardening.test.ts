/**
 * `/v1/images/` against what an outside attack on issue 13 found: tag listings shared, the
 * edition-root fallback only for a missing repository, /package-like 416 and `If-None-Match: *`,
 * the ETag of an image under a nested index, manifest responses that cannot run, no echo of a
 * long platform, a registry Link that is no URL.
 */
import { createServer } from 'node:http'
import type { AddressInfo } from 'node:net'
import t from 'tap'
import type { RegistrySource } from '../../plugins/credentials/source.js'
import { ManifestResolver } from '../../plugins/images/manifest-resolver.js'
import { RegistryClient } from '../../plugins/packages/registry/registry-client.js'
import { makePackageTarGz } from '../fixtures/tarball.js'
import { DEFAULT_PREFIX, startHarness, type Harness } from '../fixtures/proxy-harness.js'

const CLI = `${DEFAULT_PREFIX}/deckhouse-cli`
const ROOT_CLI = 'deckhouse/deckhouse-cli'

function addCli(h: Harness, repo: string, version: string): { digest: string; layer: Buffer } {
  const image = h.registry.addImage(repo, [makePackageTarGz({ 'bin/d8': `#!/bin/sh\necho ${version}\n` })])
  h.registry.tag(repo, version, image.manifestDigest)
  return { digest: image.manifestDigest, layer: image.lastLayer.data }
}

void t.test('50 concurrent tag listings of one repository share one walk through its pages', async (t) => {
  const h = await startHarness(t)
  const { digest } = addCli(h, CLI, 'v1.0.0')
  for (let i = 0; i < 9; i++) h.registry.tag(CLI, `v0.${i}.0`, digest)
  h.registry.tagPageSize = 2
  h.registry.resetCounts()
  const all = await Promise.all(Array.from({ length: 50 }, () => h.proxy.server.inject('/v1/images/deckhouse-cli/tags')))
  t.ok(all.every((r) => r.statusCode === 200 && (r.result as { tags: string[] }).tags.length === 11))
  t.equal(h.registry.counts.tags, 6, 'six pages once, not 300 requests')
})

void t.test('the edition-root fallback is for a missing repository, not a missing tag', async (t) => {
  const h = await startHarness(t, { tagTtlMs: 0 })
  addCli(h, CLI, 'v1.0.0')
  const root = addCli(h, ROOT_CLI, 'v2.0.0')
  for (const url of ['/v1/images/deckhouse-cli/images/v2.0.0', '/v1/images/deckhouse-cli/manifests/v2.0.0']) {
    t.equal((await h.proxy.server.inject(url)).statusCode, 404, `${url}: the edition repository exists, the tag does not`)
  }
  const plugin = addCli(h, `${ROOT_CLI}/plugins/delivery`, 'v0.1.0')
  const res = await h.proxy.server.inject('/v1/images/deckhouse-cli/plugins/delivery/images/v0.1.0')
  t.equal(res.statusCode, 200, 'no edition repository at all: the edition root serves')
  t.equal(res.headers.etag, `"${plugin.digest}"`)
  t.not(root.digest, plugin.digest)
})

void t.test('416 and If-None-Match: * behave as on /package', async (t) => {
  const h = await startHarness(t, { tagTtlMs: 0 })
  const { digest, layer } = addCli(h, CLI, 'v1.2.3')
  const url = '/v1/images/deckhouse-cli/images/v1.2.3'
  const unsatisfiable = await h.proxy.server.inject({ url, headers: { range: `bytes=${layer.length}-` } })
  t.equal(unsatisfiable.statusCode, 416)
  t.equal(unsatisfiable.headers['content-range'], `bytes */${layer.length}`)
  t.equal(unsatisfiable.headers.etag, undefined, 'an error carries no ETag')
  t.equal(unsatisfiable.headers['docker-content-digest'], undefined, 'nor the digest')
  const star = await h.proxy.server.inject({ url, headers: { 'if-none-match': '*' } })
  t.equal(star.statusCode, 304, '`*` once the image was found')
  t.equal(star.headers.etag, `"${digest}"`)
  t.equal(
    (await h.proxy.server.inject({ url: '/v1/images/deckhouse-cli/images/v9', headers: { 'if-none-match': '*' } })).statusCode,
    404,
    'not for a missing image',
  )
})

void t.test('an index nested one level: the ETag names the image served', async (t) => {
  const h = await startHarness(t, { tagTtlMs: 0 })
  const image = h.registry.addImage(CLI, [makePackageTarGz({ 'bin/d8': 'arm' })])
  const inner = h.registry.addIndex(CLI, [{ image, os: 'linux', architecture: 'arm64' }])
  const outer = Buffer.from(
    JSON.stringify({
      schemaVersion: 2,
      mediaType: 'application/vnd.oci.image.index.v1+json',
      manifests: [
        {
          mediaType: 'application/vnd.oci.image.index.v1+json',
          digest: inner.digest,
          size: inner.index.length,
          platform: { os: 'linux', architecture: 'arm64' },
        },
      ],
    }),
  )
  h.registry.tag(CLI, 'v3', h.registry.addRawManifest(CLI, outer, 'application/vnd.oci.image.index.v1+json'))
  const res = await h.proxy.server.inject('/v1/images/deckhouse-cli/images/v3?platform=linux-arm64')
  t.equal(res.statusCode, 200)
  t.equal(res.headers.etag, `"${image.manifestDigest}"`, 'the image, not the inner index')
  t.equal(res.headers['docker-content-digest'], image.manifestDigest)
  t.ok(res.rawPayload.equals(image.lastLayer.data))
})

void t.test('manifests cannot be sniffed or run; a long platform is a 400 that does not echo it', async (t) => {
  const h = await startHarness(t, { tagTtlMs: 0 })
  // The fake registry only serves types its Accept allows; its fault switch sends text/plain instead.
  const html = Buffer.from('{"mediaType":"application/vnd.oci.image.manifest.v1+json","x":"<html><script>alert(1)</script>"}')
  h.registry.tag(CLI, 'page', h.registry.addRawManifest(CLI, html, 'application/vnd.oci.image.manifest.v1+json'))
  h.registry.faults = { manifestWrongContentType: true }
  const res = await h.proxy.server.inject('/v1/images/deckhouse-cli/manifests/page')
  h.registry.faults = {}
  t.equal(res.statusCode, 200)
  t.match(res.headers['content-type'], /^text\/plain/, 'the registry Content-Type, as the contract says')
  t.equal(res.headers['x-content-type-options'], 'nosniff')
  t.equal(res.headers['content-security-policy'], "default-src 'none'; sandbox")
  addCli(h, CLI, 'v1')
  const long = `linux-${'a'.repeat(5000)}`
  const bad = await h.proxy.server.inject(`/v1/images/deckhouse-cli/images/v1?platform=${long}`)
  t.equal(bad.statusCode, 400)
  t.notMatch(bad.payload, 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa', 'the platform is not echoed')
})

void t.test('a tag-list Link that is no URL: an UpstreamError (502), not a bare error', async (t) => {
  const server = createServer((_req, res) => {
    res.writeHead(200, { 'Content-Type': 'application/json', Link: '<http://[::1>; rel="next"' })
    res.end(JSON.stringify({ name: 'x', tags: ['a'] }))
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  t.teardown(() => server.close())
  const client = new RegistryClient({ env: {} })
  t.teardown(() => client.close())
  const source = {
    name: 'default',
    registry: `127.0.0.1:${(server.address() as AddressInfo).port}`,
    scheme: 'http',
    namePrefix: '',
    repository: '',
  } as unknown as RegistrySource
  await t.rejects(new ManifestResolver(client).tags(source, 'x'), { code: 'EUPSTREAM', status: 502, message: /not a valid URL/ })
})

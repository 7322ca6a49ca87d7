import { execFileSync } from 'node:child_process'
import { createHash } from 'node:crypto'
import { readFileSync, statSync, writeFileSync } from 'node:fs'
import { request } from 'node:http'
import type { IncomingHttpHeaders } from 'node:http'
import { join } from 'node:path'
import t from 'tap'
import { FakeRegistry, MEDIA_TYPES } from '../fixtures/fake-registry.js'
import type { FakeAuth, FakeImage } from '../fixtures/fake-registry.js'
import { makePackageTarGz } from '../fixtures/tarball.js'

interface Reply {
  status: number
  headers: IncomingHttpHeaders
  body: Buffer
  /** True only when the whole announced body arrived and the message ended normally. */
  complete: boolean
  error: Error | undefined
}

const MANIFEST_ACCEPT = [MEDIA_TYPES.oci.manifest, MEDIA_TYPES.oci.index, MEDIA_TYPES.docker.manifest, MEDIA_TYPES.docker.index].join(', ')

/** A plain node:http request on a fresh connection; never rejects, so faults can be asserted on. */
function fetchRaw(url: string, opts: { method?: string; headers?: Record<string, string>; onBytes?: (received: number) => void } = {}): Promise<Reply> {
  return new Promise((resolve) => {
    const req = request(url, { method: opts.method ?? 'GET', headers: opts.headers, agent: false }, (res) => {
      const chunks: Buffer[] = []
      let received = 0
      let error: Error | undefined
      res.on('data', (chunk: Buffer) => {
        chunks.push(chunk)
        received += chunk.length
        opts.onBytes?.(received)
      })
      res.on('error', (err) => {
        error = err
      })
      res.on('close', () => {
        resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks), complete: res.complete, error })
      })
    })
    req.on('error', (err) => resolve({ status: 0, headers: {}, body: Buffer.alloc(0), complete: false, error: err }))
    req.end()
  })
}

function sha256(data: Buffer): string {
  return `sha256:${createHash('sha256').update(data).digest('hex')}`
}

function basic(username: string, password: string): string {
  return `Basic ${Buffer.from(`${username}:${password}`).toString('base64')}`
}

function bytes(size: number, seed = 1): Buffer {
  const data = Buffer.alloc(size)
  for (let i = 0; i < size; i++) data[i] = (i * 31 + seed) & 0xff
  return data
}

/** Only what the helper needs from a tap test, so it stays independent of tap's plugin types. */
interface Teardown {
  teardown: (fn: () => unknown) => void
}

async function startRegistry(t: Teardown, opts: { auth?: FakeAuth; now?: () => number } = {}): Promise<FakeRegistry> {
  const registry = await FakeRegistry.start(opts)
  t.teardown(() => registry.close())
  return registry
}

function manifestUrl(registry: FakeRegistry, repo: string, digest: string): string {
  return `${registry.url}/v2/${repo}/manifests/${digest}`
}

function blobUrl(registry: FakeRegistry, repo: string, digest: string): string {
  return `${registry.url}/v2/${repo}/blobs/${digest}`
}

function parseChallenge(header: string | undefined): Record<string, string> {
  const params: Record<string, string> = {}
  for (const match of (header ?? '').matchAll(/(\w+)="([^"]*)"/g)) {
    const [, key, value] = match
    if (key !== undefined && value !== undefined) params[key] = value
  }
  return params
}

async function fetchToken(challenge: Record<string, string>, authorization?: string): Promise<Reply> {
  const url = new URL(challenge.realm ?? 'http://127.0.0.1:1/missing-realm')
  url.searchParams.set('service', challenge.service ?? '')
  if (challenge.scope !== undefined) url.searchParams.set('scope', challenge.scope)
  return fetchRaw(url.href, authorization === undefined ? {} : { headers: { Authorization: authorization } })
}

void t.test('makePackageTarGz builds an archive the system tar extracts', (t) => {
  const files = {
    install: '#!/bin/sh\necho installed\n',
    'bin/tool': Buffer.from([0, 1, 2, 255]),
    'share/empty.txt': '',
    [`${'d'.repeat(90)}/${'f'.repeat(60)}.txt`]: 'long path via the ustar prefix\n',
    'exactly-512.bin': bytes(512),
  }
  const archive = makePackageTarGz(files)
  t.same(makePackageTarGz(files), archive, 'same input gives the same bytes')
  t.not(sha256(makePackageTarGz(files, { mtime: 1 })), sha256(archive), 'mtime is part of the bytes')

  const dir = t.testdir({ out: {} })
  const file = join(dir, 'package.tar.gz')
  writeFileSync(file, archive)
  execFileSync('tar', ['-xzf', file, '-C', join(dir, 'out')])
  for (const [name, content] of Object.entries(files)) {
    t.same(readFileSync(join(dir, 'out', name)), Buffer.from(content), `${name} extracted intact`)
  }
  t.equal(statSync(join(dir, 'out', 'install')).mode & 0o777, 0o755, 'install is executable')
  t.equal(statSync(join(dir, 'out', 'bin/tool')).mode & 0o777, 0o644, 'other files are not')
  const listing = execFileSync('tar', ['-tvzf', file], { encoding: 'utf8' })
  t.match(listing, /2023-11-14/, 'default mtime is 1700000000')

  const custom = makePackageTarGz({ install: 'x', run: 'y' }, { mode: { install: 0o700, run: 0o750 } })
  const customFile = join(dir, 'custom.tar.gz')
  writeFileSync(customFile, custom)
  execFileSync('tar', ['-xzf', customFile, '-C', join(dir, 'out')])
  t.equal(statSync(join(dir, 'out', 'install')).mode & 0o777, 0o700)
  t.equal(statSync(join(dir, 'out', 'run')).mode & 0o777, 0o750)
  t.throws(() => makePackageTarGz({ '../escape': 'x' }), /relative path/)
  t.end()
})

void t.test('manifests by digest, scoped to their repository', async (t) => {
  const registry = await startRegistry(t)
  const repo = 'deckhouse/ce/pkg/sub'
  const image = registry.addImage(repo, [bytes(100), makePackageTarGz({ install: 'echo hi' })])
  t.equal(image.manifestDigest, sha256(image.manifest))
  t.equal(image.lastLayer.digest, sha256(image.lastLayer.data))
  t.equal(image.layers.length, 2)
  const parsed = JSON.parse(image.manifest.toString('utf8')) as { layers: Array<{ digest: string; size: number }> }
  t.equal(parsed.layers[1]?.digest, image.lastLayer.digest, 'manifest lists the layers in order')

  const ping = await fetchRaw(`${registry.url}/v2/`)
  t.equal(ping.status, 200)
  t.same(JSON.parse(ping.body.toString('utf8')), {})

  const got = await fetchRaw(manifestUrl(registry, repo, image.manifestDigest), { headers: { Accept: MANIFEST_ACCEPT } })
  t.equal(got.status, 200)
  t.equal(got.headers['content-type'], MEDIA_TYPES.oci.manifest)
  t.equal(got.headers['docker-content-digest'], image.manifestDigest)
  t.equal(got.headers['content-length'], String(image.manifest.length))
  t.same(got.body, image.manifest)

  const head = await fetchRaw(manifestUrl(registry, repo, image.manifestDigest), { method: 'HEAD' })
  t.equal(head.status, 200)
  t.equal(head.headers['docker-content-digest'], image.manifestDigest)
  t.equal(head.headers['content-length'], String(image.manifest.length))
  t.equal(head.body.length, 0)

  const latest = await fetchRaw(manifestUrl(registry, repo, 'latest'))
  t.equal(latest.headers['docker-content-digest'], image.manifestDigest, 'latest tag names the last manifest')

  const elsewhere = await fetchRaw(manifestUrl(registry, 'deckhouse/ce', image.manifestDigest))
  t.equal(elsewhere.status, 404)
  t.same(JSON.parse(elsewhere.body.toString('utf8')), { errors: [{ code: 'MANIFEST_UNKNOWN', message: 'manifest unknown' }] })
  const unknown = await fetchRaw(manifestUrl(registry, repo, sha256(Buffer.from('nope'))))
  t.equal(unknown.status, 404)

  const notAccepted = await fetchRaw(manifestUrl(registry, repo, image.manifestDigest), {
    headers: { Accept: MEDIA_TYPES.docker.manifest },
  })
  t.equal(notAccepted.status, 404, 'an Accept that excludes the media type gets MANIFEST_UNKNOWN')

  const post = await fetchRaw(manifestUrl(registry, repo, image.manifestDigest), { method: 'DELETE' })
  t.equal(post.status, 405)

  t.same(registry.counts, { ping: 1, manifest: 5, manifestHead: 1, blob: 0, blobRange: 0, token: 0, storage: 0, unauthorized: 0, tags: 0, total: 8 })
  registry.resetCounts()
  t.equal(registry.counts.total, 0)
  t.equal(registry.requests.length, 0)
})

void t.test('docker media types, raw manifests and indexes', async (t) => {
  const registry = await startRegistry(t)
  const amd64 = registry.addImage('mods/a', [makePackageTarGz({ install: 'amd64' })], { mediaType: 'docker' })
  const arm64 = registry.addImage('mods/a', [makePackageTarGz({ install: 'arm64' })], { mediaType: 'docker' })
  t.equal(amd64.mediaType, MEDIA_TYPES.docker.manifest)
  t.equal(amd64.layers[0]?.mediaType, MEDIA_TYPES.docker.layer)

  const index = registry.addIndex(
    'mods/a',
    [
      { image: arm64, os: 'linux', architecture: 'arm64', variant: 'v8' },
      { image: amd64, os: 'linux', architecture: 'amd64' },
    ],
    { mediaType: 'docker' },
  )
  t.equal(index.digest, sha256(index.index))
  const got = await fetchRaw(manifestUrl(registry, 'mods/a', index.digest), { headers: { Accept: MANIFEST_ACCEPT } })
  t.equal(got.status, 200)
  t.equal(got.headers['content-type'], MEDIA_TYPES.docker.index)
  const list = JSON.parse(got.body.toString('utf8')) as {
    manifests: Array<{ digest: string; mediaType: string; platform: { architecture: string; os: string; variant?: string } }>
  }
  const entry = list.manifests.find((m) => m.platform.os === 'linux' && m.platform.architecture === 'amd64')
  t.equal(entry?.digest, amd64.manifestDigest)
  t.equal(entry?.mediaType, MEDIA_TYPES.docker.manifest)
  t.equal(list.manifests[0]?.platform.variant, 'v8')
  const child = await fetchRaw(manifestUrl(registry, 'mods/a', amd64.manifestDigest), { headers: { Accept: MANIFEST_ACCEPT } })
  t.same(child.body, amd64.manifest)

  // An OCI index in another repository mounts the images there.
  const ociIndex = registry.addIndex('mods/b', [{ image: amd64, os: 'linux', architecture: 'amd64' }])
  const mounted = await fetchRaw(manifestUrl(registry, 'mods/b', amd64.manifestDigest))
  t.equal(mounted.status, 200)
  const mountedBlob = await fetchRaw(blobUrl(registry, 'mods/b', amd64.lastLayer.digest))
  t.same(mountedBlob.body, amd64.lastLayer.data)
  const ociGot = await fetchRaw(manifestUrl(registry, 'mods/b', ociIndex.digest), { headers: { Accept: MANIFEST_ACCEPT } })
  t.equal(ociGot.headers['content-type'], MEDIA_TYPES.oci.index)

  const raw = Buffer.from('{"schemaVersion": 2, "layers": "not a list"')
  const rawDigest = registry.addRawManifest('mods/a', raw, MEDIA_TYPES.oci.manifest)
  const rawGot = await fetchRaw(manifestUrl(registry, 'mods/a', rawDigest))
  t.same(rawGot.body, raw)
  t.equal(rawDigest, sha256(raw))
  t.throws(() => registry.addImage('127.0.0.1:5000/x', [bytes(1)]), /OCI repository name/)
})

void t.test('blobs, with single ranges', async (t) => {
  const registry = await startRegistry(t)
  const data = bytes(1000)
  const image = registry.addImage('pkgs/x', [data])
  const url = blobUrl(registry, 'pkgs/x', image.lastLayer.digest)

  const full = await fetchRaw(url)
  t.equal(full.status, 200)
  t.same(full.body, data)
  t.equal(full.headers['content-type'], 'application/octet-stream')
  t.equal(full.headers['content-length'], '1000')
  t.equal(full.headers['docker-content-digest'], image.lastLayer.digest)

  const head = await fetchRaw(url, { method: 'HEAD' })
  t.equal(head.headers['content-length'], '1000')
  t.equal(head.body.length, 0)

  const middle = await fetchRaw(url, { headers: { Range: 'bytes=10-19' } })
  t.equal(middle.status, 206)
  t.equal(middle.headers['content-range'], 'bytes 10-19/1000')
  t.same(middle.body, data.subarray(10, 20))

  const tail = await fetchRaw(url, { headers: { Range: 'bytes=990-' } })
  t.equal(tail.status, 206)
  t.same(tail.body, data.subarray(990))
  const suffix = await fetchRaw(url, { headers: { Range: 'bytes=-5' } })
  t.same(suffix.body, data.subarray(995))

  const beyond = await fetchRaw(url, { headers: { Range: 'bytes=1000-' } })
  t.equal(beyond.status, 416)
  t.equal(beyond.headers['content-range'], 'bytes */1000')

  const otherRepo = await fetchRaw(blobUrl(registry, 'pkgs/y', image.lastLayer.digest))
  t.equal(otherRepo.status, 404)
  t.equal((JSON.parse(otherRepo.body.toString('utf8')) as { errors: Array<{ code: string }> }).errors[0]?.code, 'BLOB_UNKNOWN')

  t.equal(registry.counts.blob, 7)
  t.equal(registry.counts.blobRange, 4)
})

void t.test('basic auth', async (t) => {
  const registry = await startRegistry(t, { auth: { kind: 'basic', username: 'user', password: 's3cret' } })
  const image = registry.addImage('pkgs/x', [bytes(10)])
  const url = manifestUrl(registry, 'pkgs/x', image.manifestDigest)

  const anonymous = await fetchRaw(url)
  t.equal(anonymous.status, 401)
  t.equal(anonymous.headers['www-authenticate'], 'Basic realm="fake"')
  const wrong = await fetchRaw(url, { headers: { Authorization: basic('user', 'nope') } })
  t.equal(wrong.status, 401)
  const right = await fetchRaw(url, { headers: { Authorization: basic('user', 's3cret') } })
  t.equal(right.status, 200)
  t.same(right.body, image.manifest)
  const ping = await fetchRaw(`${registry.url}/v2/`)
  t.equal(ping.status, 401)

  t.equal(registry.counts.unauthorized, 3)
  t.equal(registry.counts.manifest, 3)
  t.equal(registry.requests[2]?.headers.authorization, basic('user', 's3cret'), 'requests record headers')
})

void t.test('bearer auth: challenge, token, pull', async (t) => {
  const registry = await startRegistry(t, {
    auth: { kind: 'bearer', username: 'robot', password: 'pw', service: 'my-registry' },
  })
  const image = registry.addImage('deckhouse/ce/pkg', [bytes(10)])
  registry.addImage('other/repo', [bytes(11)])
  const url = manifestUrl(registry, 'deckhouse/ce/pkg', image.manifestDigest)

  const first = await fetchRaw(url)
  t.equal(first.status, 401)
  const challenge = parseChallenge(first.headers['www-authenticate'])
  t.match(first.headers['www-authenticate'], /^Bearer /)
  t.same(challenge, { realm: registry.tokenUrl, service: 'my-registry', scope: 'repository:deckhouse/ce/pkg:pull' })
  t.not(new URL(registry.tokenUrl).port, new URL(registry.url).port, 'the token server is its own origin')

  const noCreds = await fetchToken(challenge)
  t.equal(noCreds.status, 401)
  const badService = await fetchToken({ ...challenge, service: 'other' }, basic('robot', 'pw'))
  t.equal(badService.status, 400)
  const badScope = await fetchToken({ ...challenge, scope: 'repository:deckhouse/ce/pkg:push' }, basic('robot', 'pw'))
  t.equal(badScope.status, 400)

  const issued = await fetchToken(challenge, basic('robot', 'pw'))
  t.equal(issued.status, 200)
  const body = JSON.parse(issued.body.toString('utf8')) as { token: string; expires_in: number; issued_at: string }
  t.type(body.token, 'string')
  t.equal(body.expires_in, 300)
  t.ok(!Number.isNaN(Date.parse(body.issued_at)), 'issued_at is a date')

  const pulled = await fetchRaw(url, { headers: { Authorization: `Bearer ${body.token}` } })
  t.equal(pulled.status, 200)
  t.same(pulled.body, image.manifest)
  const blob = await fetchRaw(blobUrl(registry, 'deckhouse/ce/pkg', image.lastLayer.digest), {
    headers: { Authorization: `Bearer ${body.token}` },
  })
  t.same(blob.body, image.lastLayer.data)

  const outOfScope = await fetchRaw(manifestUrl(registry, 'other/repo', 'latest'), {
    headers: { Authorization: `Bearer ${body.token}` },
  })
  t.equal(outOfScope.status, 401)
  t.match(outOfScope.headers['www-authenticate'], /scope="repository:other\/repo:pull",error="insufficient_scope"/)
  const forged = await fetchRaw(url, { headers: { Authorization: 'Bearer forged' } })
  t.equal(forged.status, 401)

  const ping = await fetchRaw(`${registry.url}/v2/`)
  t.equal(ping.status, 401)
  t.notMatch(ping.headers['www-authenticate'], /scope=/, 'the ping challenge has no scope')

  t.equal(registry.counts.token, 4)
  t.equal(registry.counts.unauthorized, 4)
  t.equal(registry.requests.filter((r) => r.origin === 'token').length, 4)
})

void t.test('bearer tokens expire and can be revoked', async (t) => {
  let now = Date.parse('2024-01-01T00:00:00Z')
  const registry = await startRegistry(t, { auth: { kind: 'bearer', tokenTtlSeconds: 2 }, now: () => now })
  const image = registry.addImage('pkgs/x', [bytes(10)])
  const url = manifestUrl(registry, 'pkgs/x', image.manifestDigest)
  const challenge = parseChallenge((await fetchRaw(url)).headers['www-authenticate'])

  const issued = await fetchToken(challenge)
  t.equal(issued.status, 200, 'anonymous tokens when no credentials are configured')
  const body = JSON.parse(issued.body.toString('utf8')) as { token: string; expires_in: number; issued_at: string }
  t.equal(body.expires_in, 2)
  t.equal(body.issued_at, '2024-01-01T00:00:00.000Z')
  const bearer = { Authorization: `Bearer ${body.token}` }
  t.equal((await fetchRaw(url, { headers: bearer })).status, 200)
  now += 1999
  t.equal((await fetchRaw(url, { headers: bearer })).status, 200, 'still valid just before the ttl')
  now += 1
  const expired = await fetchRaw(url, { headers: bearer })
  t.equal(expired.status, 401)
  t.match(expired.headers['www-authenticate'], /error="invalid_token"/)

  const fresh = JSON.parse((await fetchToken(challenge)).body.toString('utf8')) as { token: string }
  const freshBearer = { Authorization: `Bearer ${fresh.token}` }
  t.equal((await fetchRaw(url, { headers: freshBearer })).status, 200)
  registry.revokeTokens()
  t.equal((await fetchRaw(url, { headers: freshBearer })).status, 401, 'revoked')
})

void t.test('redirectBlobs sends blob GETs to a storage origin that records Authorization', async (t) => {
  const registry = await startRegistry(t, { auth: { kind: 'basic', username: 'u', password: 'p' } })
  const image = registry.addImage('pkgs/x', [bytes(5000)])
  registry.faults.redirectBlobs = true
  const auth = basic('u', 'p')

  const redirect = await fetchRaw(blobUrl(registry, 'pkgs/x', image.lastLayer.digest), { headers: { Authorization: auth } })
  t.equal(redirect.status, 307)
  const location = redirect.headers.location ?? ''
  t.ok(location.startsWith(registry.storageUrl), 'Location names the storage origin')

  // A careful client drops the credential on the cross-origin hop; a careless one forwards it.
  const careful = await fetchRaw(location)
  t.equal(careful.status, 200)
  t.same(careful.body, image.lastLayer.data)
  const careless = await fetchRaw(location, { headers: { Authorization: auth, Range: 'bytes=0-9' } })
  t.equal(careless.status, 206)
  t.same(careless.body, image.lastLayer.data.subarray(0, 10))
  t.same(registry.storageAuthHeaders, [undefined, auth])
  t.same(
    registry.requests.map((r) => r.origin),
    ['registry', 'storage', 'storage'],
  )
  t.equal(registry.counts.storage, 2)
  t.equal(registry.counts.blob, 1)

  const head = await fetchRaw(blobUrl(registry, 'pkgs/x', image.lastLayer.digest), { method: 'HEAD', headers: { Authorization: auth } })
  t.equal(head.status, 200, 'HEAD is answered by the registry itself')
})

void t.test('storageChallenge: the storage origin answers 401 with the given challenge and records the request', async (t) => {
  const registry = await startRegistry(t)
  const image = registry.addImage('pkgs/x', [bytes(100)])
  registry.faults = { redirectBlobs: true, storageChallenge: 'Bearer realm="http://127.0.0.1:1/token",service="s"' }
  const redirect = await fetchRaw(blobUrl(registry, 'pkgs/x', image.lastLayer.digest))
  t.equal(redirect.status, 307)
  const challenged = await fetchRaw(redirect.headers.location ?? '')
  t.equal(challenged.status, 401)
  t.equal(challenged.headers['www-authenticate'], 'Bearer realm="http://127.0.0.1:1/token",service="s"')
  t.equal(registry.counts.storage, 1)
  t.same(registry.storageAuthHeaders, [undefined])
})

void t.test('status faults and delays', async (t) => {
  const registry = await startRegistry(t, { auth: { kind: 'bearer' } })
  const image = registry.addImage('pkgs/x', [bytes(10)])
  const url = manifestUrl(registry, 'pkgs/x', image.manifestDigest)
  const challenge = parseChallenge((await fetchRaw(url)).headers['www-authenticate'])
  const token = (JSON.parse((await fetchToken(challenge)).body.toString('utf8')) as { token: string }).token
  const headers = { Authorization: `Bearer ${token}` }

  registry.faults = { manifestStatus: 429, retryAfter: '7' }
  const limited = await fetchRaw(url, { headers })
  t.equal(limited.status, 429)
  t.equal(limited.headers['retry-after'], '7')
  t.equal((JSON.parse(limited.body.toString('utf8')) as { errors: Array<{ code: string }> }).errors[0]?.code, 'TOOMANYREQUESTS')
  registry.faults = { manifestStatus: 500, retryAfter: '7' }
  const failed = await fetchRaw(url, { headers, method: 'HEAD' })
  t.equal(failed.status, 500)
  t.equal(failed.headers['retry-after'], undefined, 'Retry-After only with 429 and 503')
  t.equal(registry.counts.manifestHead, 1, 'faulted requests are counted')

  registry.faults = { blobStatus: 503, retryAfter: '1' }
  const unavailable = await fetchRaw(blobUrl(registry, 'pkgs/x', image.lastLayer.digest), { headers })
  t.equal(unavailable.status, 503)
  t.equal(unavailable.headers['retry-after'], '1')

  registry.faults = { tokenStatus: 500 }
  t.equal((await fetchToken(challenge)).status, 500)

  registry.faults = { manifestDelayMs: 60 }
  let started = performance.now()
  t.equal((await fetchRaw(url, { headers })).status, 200)
  t.ok(performance.now() - started >= 55, 'manifest headers were delayed')

  registry.faults = { blobDelayMs: 60 }
  started = performance.now()
  t.equal((await fetchRaw(blobUrl(registry, 'pkgs/x', image.lastLayer.digest), { headers })).status, 200)
  t.ok(performance.now() - started >= 55, 'blob headers were delayed')

  registry.faults = { corruptManifest: true, manifestWrongContentType: true }
  const corrupt = await fetchRaw(url, { headers })
  t.equal(corrupt.status, 200)
  t.equal(corrupt.headers['docker-content-digest'], image.manifestDigest, 'still claims the digest')
  t.not(sha256(corrupt.body), image.manifestDigest, 'but the bytes do not match it')
  t.equal(corrupt.headers['content-type'], 'text/plain; charset=utf-8')
})

void t.test('body faults: slow, corrupt, extra bytes', async (t) => {
  const registry = await startRegistry(t)
  const data = bytes(8 * 1024)
  const image = registry.addImage('pkgs/x', [data])
  const url = blobUrl(registry, 'pkgs/x', image.lastLayer.digest)

  registry.faults = { blobChunkSize: 1024, blobChunkDelayMs: 10 }
  const chunkSizes: number[] = []
  let previous = 0
  const started = performance.now()
  const slow = await fetchRaw(url, {
    onBytes: (received) => {
      chunkSizes.push(received - previous)
      previous = received
    },
  })
  t.ok(performance.now() - started >= 65, 'seven pauses between eight chunks')
  t.same(slow.body, data)
  t.ok(
    chunkSizes.every((size) => size <= 1024),
    'bytes arrive in chunks of blobChunkSize',
  )

  registry.faults = { corruptBlob: true }
  const corrupt = await fetchRaw(url)
  t.equal(corrupt.status, 200)
  t.equal(corrupt.body.length, data.length)
  t.equal(corrupt.headers['content-length'], String(data.length))
  let differing = 0
  for (let i = 0; i < data.length; i++) if (corrupt.body[i] !== data[i]) differing += 1
  t.equal(differing, 1, 'exactly one byte differs')
  t.equal(corrupt.body.readUInt8(4096) ^ data.readUInt8(4096), 1, 'by one bit, in the middle')

  registry.faults = { extraBlobBytes: 3 }
  const extra = await fetchRaw(url)
  t.equal(extra.headers['content-length'], String(data.length + 3))
  t.same(extra.body.subarray(0, data.length), data)
  t.equal(extra.body.length, data.length + 3)
})

void t.test('truncated and reset bodies', async (t) => {
  const registry = await startRegistry(t)
  const data = bytes(100 * 1024)
  const image = registry.addImage('pkgs/x', [data])
  const url = blobUrl(registry, 'pkgs/x', image.lastLayer.digest)

  registry.faults = { truncateBlobAt: 40_000 }
  const truncated = await fetchRaw(url)
  t.equal(truncated.status, 200)
  t.equal(truncated.headers['content-length'], String(data.length), 'the full length is announced')
  t.equal(truncated.body.length, 40_000, 'only the first bytes arrive')
  t.same(truncated.body, data.subarray(0, 40_000))
  t.equal(truncated.complete, false)
  t.ok(truncated.error, 'the client sees an error')

  registry.faults = { truncateBlobAt: 0 }
  const empty = await fetchRaw(url)
  t.equal(empty.status, 200, 'headers still arrive when cut at byte 0')
  t.equal(empty.body.length, 0)
  t.equal(empty.complete, false)

  registry.faults = { resetBlobAt: 1000 }
  const reset = await fetchRaw(url)
  t.ok(reset.body.length <= 1000, 'no more than the bytes before the reset')
  t.equal(reset.complete, false)
  t.ok(reset.error, 'the client sees an error')

  registry.faults = { truncateBlobAt: data.length }
  const whole = await fetchRaw(url)
  t.equal(whole.complete, true, 'a cut at or past the end is no cut')
})

void t.test('a stalled body does not hold close()', async (t) => {
  const registry = await startRegistry(t)
  const data = bytes(50_000)
  const image = registry.addImage('pkgs/x', [data])
  registry.faults = { blobStallAfterBytes: 20_000 }
  let reachedStall!: () => void
  const stalled = new Promise<void>((resolve) => {
    reachedStall = resolve
  })
  const reply = fetchRaw(blobUrl(registry, 'pkgs/x', image.lastLayer.digest), {
    onBytes: (received) => {
      if (received >= 20_000) reachedStall()
    },
  })
  await stalled
  await registry.close()
  const result = await reply
  t.equal(result.body.length, 20_000, 'exactly the bytes before the stall')
  t.equal(result.complete, false)
  t.ok(result.error, 'the client sees the connection end')
  await registry.close()
  t.pass('close() is idempotent')
})

void t.test('neverAnswer does not hold close()', async (t) => {
  const registry = await startRegistry(t)
  const image = registry.addImage('pkgs/x', [bytes(10)])
  registry.faults = { neverAnswer: true, manifestDelayMs: 60_000 }
  const reply = fetchRaw(manifestUrl(registry, 'pkgs/x', image.manifestDigest))
  await registry.waitForRequests(1, (r) => r.origin === 'registry')
  t.equal(registry.counts.manifest, 1, 'the unanswered request is counted')
  await registry.close()
  const result = await reply
  t.equal(result.status, 0, 'no response ever came')
  t.ok(result.error)
  await t.rejects(registry.waitForRequests(2), /closed/)
})

void t.test('a pending delay does not hold close()', async (t) => {
  const registry = await startRegistry(t)
  const image = registry.addImage('pkgs/x', [bytes(10)])
  registry.faults = { blobDelayMs: 60_000, blobChunkDelayMs: 60_000 }
  const reply = fetchRaw(blobUrl(registry, 'pkgs/x', image.lastLayer.digest))
  await registry.waitForRequests(1)
  await registry.close()
  t.equal((await reply).status, 0)
})

void t.test('counters and waitForRequests', async (t) => {
  const registry = await startRegistry(t)
  const image: FakeImage = registry.addImage('pkgs/x', [bytes(10), bytes(20)])
  const waited = registry.waitForRequests(2, (r) => r.url.includes('/blobs/'))
  await fetchRaw(`${registry.url}/v2/`)
  await fetchRaw(manifestUrl(registry, 'pkgs/x', image.manifestDigest))
  await fetchRaw(manifestUrl(registry, 'pkgs/x', image.manifestDigest), { method: 'HEAD' })
  await fetchRaw(blobUrl(registry, 'pkgs/x', image.layers[0]?.digest ?? ''))
  await fetchRaw(blobUrl(registry, 'pkgs/x', image.lastLayer.digest), { headers: { Range: 'bytes=0-0' } })
  await waited
  await fetchRaw(`${registry.url}/v2/_catalog`)
  t.same(registry.counts, { ping: 1, manifest: 1, manifestHead: 1, blob: 2, blobRange: 1, token: 0, storage: 0, unauthorized: 0, tags: 0, total: 6 })
  t.same(
    registry.requests.map((r) => `${r.method} ${r.url}`),
    [
      'GET /v2/',
      `GET /v2/pkgs/x/manifests/${image.manifestDigest}`,
      `HEAD /v2/pkgs/x/manifests/${image.manifestDigest}`,
      `GET /v2/pkgs/x/blobs/${image.layers[0]?.digest ?? ''}`,
      `GET /v2/pkgs/x/blobs/${image.lastLayer.digest}`,
      'GET /v2/_catalog',
    ],
  )
  const counts = registry.counts
  registry.resetCounts()
  t.equal(counts.total, 0, 'reset in place, so held references see it')
})

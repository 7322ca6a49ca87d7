import { createServer as createHttpServer, type IncomingHttpHeaders } from 'node:http'
import { createServer as createHttpsServer } from 'node:https'
import { createServer, createServer as createNetServer, connect as connectTcp } from 'node:net'
import t, { type Test } from 'tap'
import { NotFoundError, TimeoutError, UpstreamError } from '../../../../errors.js'
import { parseRegistryConfig } from '../../../../plugins/credentials/file-source.js'
import type { RegistrySource } from '../../../../plugins/credentials/source.js'
import { MANIFEST_ACCEPT, MAX_MANIFEST_BYTES, RegistryClient, type UpstreamKind } from '../../../../plugins/packages/registry/registry-client.js'
import { FakeRegistry, MEDIA_TYPES } from '../../../fixtures/fake-registry.js'
import { DEFAULT_PREFIX, MODULE_PREFIX, bytes, dockerConfig, packageUrl, startHarness, waitCached } from '../../../fixtures/proxy-harness.js'
import { selfSignedCert } from '../../../fixtures/self-signed.js'

function basic(username: string, password: string): string {
  return `Basic ${Buffer.from(`${username}:${password}`).toString('base64')}`
}

function authHeaders(registry: FakeRegistry, origin: 'registry' | 'token' | 'storage'): Array<string | undefined> {
  return registry.requests.filter((r) => r.origin === origin).map((r) => r.headers.authorization as string | undefined)
}

/** A port nothing listens on. */
async function closedPort(): Promise<number> {
  const server = createServer()
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  const address = server.address()
  await new Promise<void>((resolve) => server.close(() => resolve()))
  if (address === null || typeof address === 'string') throw new Error('no port')
  return address.port
}

function sourceFor(host: string, extra: Record<string, unknown> = {}): RegistrySource {
  const [source] = parseRegistryConfig({ default: { address: host, path: DEFAULT_PREFIX, scheme: 'http', ...extra } }, 'test')
  if (!source) throw new Error('no source')
  return source
}

void t.test('Basic: credentials from a docker config "auth" entry', async (t) => {
  const h = await startHarness(t, {
    auth: { kind: 'basic', username: 'reader', password: 's3cret-basic' },
    credentials: { username: 'reader', password: 's3cret-basic', form: 'auth' },
  })
  const a = h.registry.addImage(DEFAULT_PREFIX, [bytes(1000, 1)])
  const b = h.registry.addImage(DEFAULT_PREFIX, [bytes(1001, 2)])
  const first = await h.proxy.server.inject(packageUrl({ digest: a.manifestDigest }))
  t.equal(first.statusCode, 200)
  t.ok(first.rawPayload.equals(a.lastLayer.data))
  t.equal(h.registry.counts.unauthorized, 1, 'one anonymous attempt learns the scheme')
  const second = await h.proxy.server.inject(packageUrl({ digest: b.manifestDigest }))
  t.ok(second.rawPayload.equals(b.lastLayer.data))
  t.equal(h.registry.counts.unauthorized, 1, 'afterwards Basic is sent up front')
  const headers = authHeaders(h.registry, 'registry')
  t.equal(headers[0], undefined, 'the very first request is anonymous')
  t.ok(
    headers.slice(1).every((v) => v === basic('reader', 's3cret-basic')),
    'then always Basic',
  )
  t.equal(h.registry.counts.token, 0)
})

void t.test('Basic: username/password fields, and a module source with base64 dockerCfg', async (t) => {
  const h = await startHarness(t, {
    auth: { kind: 'basic', username: 'reader', password: 'fields-pass' },
    credentials: { username: 'reader', password: 'fields-pass', form: 'fields' },
  })
  const def = h.registry.addImage(DEFAULT_PREFIX, [bytes(700, 3)])
  const mod = h.registry.addImage(MODULE_PREFIX, [bytes(800, 4)])
  const r1 = await h.proxy.server.inject(packageUrl({ digest: def.manifestDigest }))
  t.equal(r1.statusCode, 200)
  t.ok(r1.rawPayload.equals(def.lastLayer.data))
  const r2 = await h.proxy.server.inject(packageUrl({ digest: mod.manifestDigest, repository: h.moduleRepository }))
  t.equal(r2.statusCode, 200)
  t.ok(r2.rawPayload.equals(mod.lastLayer.data))
})

void t.test('Basic without credentials: 502 after a single anonymous try', async (t) => {
  const h = await startHarness(t, { auth: { kind: 'basic', username: 'reader', password: 'nobody-knows' } })
  const image = h.registry.addImage(DEFAULT_PREFIX, [bytes(10, 5)])
  const res = await h.proxy.server.inject(packageUrl({ digest: image.manifestDigest }))
  t.equal(res.statusCode, 502)
  t.equal(h.registry.counts.manifest, 1, 'nothing new to try')
  t.notOk(res.payload.includes('nobody-knows'))
})

void t.test('Bearer: challenge, token, success; one token per repository scope', async (t) => {
  const h = await startHarness(t, { auth: { kind: 'bearer' } })
  const images = [0, 1, 2].map((i) => h.registry.addImage(DEFAULT_PREFIX, [bytes(500 + i, 10 + i)]))
  for (const image of images) {
    const res = await h.proxy.server.inject(packageUrl({ digest: image.manifestDigest }))
    t.equal(res.statusCode, 200)
    t.ok(res.rawPayload.equals(image.lastLayer.data))
  }
  t.equal(h.registry.counts.token, 1, 'one token for three cold digests in one repository')
  t.equal(h.registry.counts.unauthorized, 1, 'one challenge')
  t.equal(h.registry.counts.blob, 3)
  const tokenRequest = h.registry.requests.find((r) => r.origin === 'token')
  const query = new URL(tokenRequest?.url ?? '/', 'http://x').searchParams
  t.equal(query.get('service'), 'fake-registry')
  t.equal(query.get('scope'), `repository:${DEFAULT_PREFIX}:pull`)
  t.equal(tokenRequest?.headers.authorization, undefined, 'anonymous token request without credentials')
  const bearer = authHeaders(h.registry, 'registry').slice(1)
  t.ok(
    bearer.every((v) => v !== undefined && /^Bearer fake-[0-9a-f]+$/.test(v)),
    'Bearer on every request after the challenge',
  )

  const other = h.registry.addImage(`${DEFAULT_PREFIX}/other`, [bytes(600, 20)])
  const res = await h.proxy.server.inject(packageUrl({ digest: other.manifestDigest, path: 'other' }))
  t.equal(res.statusCode, 200)
  t.ok(res.rawPayload.equals(other.lastLayer.data))
  t.equal(h.registry.counts.token, 2, 'another repository needs its own scope')
})

void t.test('Bearer: concurrent cold requests share one token fetch', async (t) => {
  const h = await startHarness(t, { auth: { kind: 'bearer' } })
  const images = [0, 1, 2, 3].map((i) => h.registry.addImage(DEFAULT_PREFIX, [bytes(300 + i, 30 + i)]))
  // The first request learns the scheme; then four at once must not fetch four tokens.
  const warm = h.registry.addImage(DEFAULT_PREFIX, [bytes(299, 29)])
  t.equal((await h.proxy.server.inject(packageUrl({ digest: warm.manifestDigest }))).statusCode, 200)
  h.registry.revokeTokens()
  h.registry.resetCounts()
  const replies = await Promise.all(images.map((image) => h.proxy.server.inject(packageUrl({ digest: image.manifestDigest }))))
  replies.forEach((r, i) => t.ok(r.rawPayload.equals(images[i]?.lastLayer.data ?? Buffer.alloc(1)), `reply ${i}`))
  t.ok(h.registry.counts.token <= 2, `at most one new token per refusal wave (${h.registry.counts.token})`)
})

void t.test('Bearer with credentials at the token server; a wrong password is a 502 without the secret', async (t) => {
  const good = await startHarness(t, {
    auth: { kind: 'bearer', username: 'robot', password: 'token-pass-good', service: 'my-service' },
    credentials: { username: 'robot', password: 'token-pass-good' },
  })
  const image = good.registry.addImage(DEFAULT_PREFIX, [bytes(900, 40)])
  const res = await good.proxy.server.inject(packageUrl({ digest: image.manifestDigest }))
  t.equal(res.statusCode, 200)
  t.ok(res.rawPayload.equals(image.lastLayer.data))
  t.same(authHeaders(good.registry, 'token'), [basic('robot', 'token-pass-good')], 'the token server gets Basic')
  t.equal(new URL(good.registry.requests.find((r) => r.origin === 'token')?.url ?? '/', 'http://x').searchParams.get('service'), 'my-service')

  const bad = await startHarness(t, {
    auth: { kind: 'bearer', username: 'robot', password: 'token-pass-good' },
    credentials: { username: 'robot', password: 'token-pass-WRONG' },
  })
  const image2 = bad.registry.addImage(DEFAULT_PREFIX, [bytes(900, 41)])
  const refused = await bad.proxy.server.inject(packageUrl({ digest: image2.manifestDigest }))
  t.equal(refused.statusCode, 502)
  for (const secret of ['token-pass-WRONG', 'token-pass-good', Buffer.from('robot:token-pass-WRONG').toString('base64')]) {
    t.notOk(refused.payload.includes(secret), 'no secret in the body')
  }
  t.equal(bad.registry.counts.blob, 0)
})

void t.test('Bearer: the token server failing is a 502; tokens never appear in error bodies', async (t) => {
  const h = await startHarness(t, { auth: { kind: 'bearer' } })
  const a = h.registry.addImage(DEFAULT_PREFIX, [bytes(100, 50)])
  const b = h.registry.addImage(DEFAULT_PREFIX, [bytes(101, 51)])
  t.equal((await h.proxy.server.inject(packageUrl({ digest: a.manifestDigest }))).statusCode, 200)
  const token = authHeaders(h.registry, 'registry')
    .find((v) => v?.startsWith('Bearer '))
    ?.slice('Bearer '.length)
  t.ok(token, 'a token was used')
  h.registry.faults = { manifestStatus: 500 }
  const failed = await h.proxy.server.inject(packageUrl({ digest: b.manifestDigest }))
  t.equal(failed.statusCode, 502)
  t.notOk(failed.payload.includes(String(token)), 'the token is not in the body')

  h.registry.revokeTokens()
  h.registry.faults = { tokenStatus: 500 }
  const noToken = await h.proxy.server.inject(packageUrl({ digest: b.manifestDigest }))
  t.equal(noToken.statusCode, 502)
  t.notOk(noToken.payload.includes(String(token)))
})

void t.test('Bearer: a revoked token is dropped, a new one fetched, and the request succeeds', async (t) => {
  const h = await startHarness(t, { auth: { kind: 'bearer' } })
  const a = h.registry.addImage(DEFAULT_PREFIX, [bytes(400, 60)])
  const b = h.registry.addImage(DEFAULT_PREFIX, [bytes(401, 61)])
  t.equal((await h.proxy.server.inject(packageUrl({ digest: a.manifestDigest }))).statusCode, 200)
  const firstToken = authHeaders(h.registry, 'registry').at(-1)
  h.registry.revokeTokens()
  h.registry.resetCounts()
  const res = await h.proxy.server.inject(packageUrl({ digest: b.manifestDigest }))
  t.equal(res.statusCode, 200)
  t.ok(res.rawPayload.equals(b.lastLayer.data))
  t.equal(h.registry.counts.token, 1, 'one new token')
  t.equal(h.registry.counts.unauthorized, 1, 'one refusal')
  t.equal(h.registry.counts.manifest, 2, 'one retry of the manifest')
  t.equal(h.registry.counts.blob, 1)
  const used = authHeaders(h.registry, 'registry')
  t.equal(used[0], firstToken, 'the stale token was tried first')
  t.not(used.at(-1), firstToken, 'the blob went with the new token')
})

void t.test('Bearer: an expired token is refreshed (the registry clock moves on)', async (t) => {
  let now = Date.now()
  const h = await startHarness(t, { auth: { kind: 'bearer', tokenTtlSeconds: 2 }, now: () => now })
  const a = h.registry.addImage(DEFAULT_PREFIX, [bytes(200, 70)])
  const b = h.registry.addImage(DEFAULT_PREFIX, [bytes(201, 71)])
  t.equal((await h.proxy.server.inject(packageUrl({ digest: a.manifestDigest }))).statusCode, 200)
  t.equal(h.registry.counts.token, 1)
  now += 3000
  const res = await h.proxy.server.inject(packageUrl({ digest: b.manifestDigest }))
  t.equal(res.statusCode, 200)
  t.ok(res.rawPayload.equals(b.lastLayer.data))
  t.equal(h.registry.counts.token, 2, 'a fresh token after expiry')
})

void t.test('redirected blobs: the storage origin never receives Authorization', async (t) => {
  for (const auth of [{ kind: 'bearer' as const }, { kind: 'basic' as const, username: 'u', password: 'redirect-pass' }]) {
    const h = await startHarness(t, {
      auth,
      ...(auth.kind === 'basic' ? { credentials: { username: 'u', password: 'redirect-pass' } } : {}),
    })
    const image = h.registry.addImage(DEFAULT_PREFIX, [bytes(30_000, 80)])
    h.registry.faults = { redirectBlobs: true }
    const res = await h.proxy.server.inject(packageUrl({ digest: image.manifestDigest }))
    t.equal(res.statusCode, 200, auth.kind)
    t.ok(res.rawPayload.equals(image.lastLayer.data), `${auth.kind}: right bytes`)
    t.equal(h.registry.counts.storage, 1, `${auth.kind}: fetched from storage`)
    t.same(h.registry.storageAuthHeaders, [undefined], `${auth.kind}: no Authorization at the storage origin`)
    t.ok(authHeaders(h.registry, 'registry').at(-1) !== undefined, `${auth.kind}: the registry itself got credentials`)
    await waitCached(h, image.manifestDigest, image.lastLayer.digest)
  }
})

/** An HTTP server that stands for a host of someone else's choosing and records every request. */
async function recorder(t: Test): Promise<{ url: string; requests: IncomingHttpHeaders[] }> {
  const requests: IncomingHttpHeaders[] = []
  const server = createHttpServer((req, res) => {
    requests.push(req.headers)
    res.writeHead(200, { 'Content-Type': 'application/json' })
    res.end(JSON.stringify({ token: 'harvested-token', expires_in: 300 }))
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  t.teardown(() => new Promise<void>((resolve) => server.close(() => resolve())))
  const address = server.address()
  if (address === null || typeof address === 'string') throw new Error('no port')
  return { url: `http://127.0.0.1:${address.port}`, requests }
}

void t.test('a redirect target that challenges gets no credentials, and neither does the realm it names: 502', async (t) => {
  for (const auth of [
    { kind: 'basic' as const, username: 'u', password: 'storage-harvest-pass' },
    { kind: 'bearer' as const, username: 'u', password: 'storage-harvest-pass' },
  ]) {
    const h = await startHarness(t, { auth, credentials: { username: 'u', password: 'storage-harvest-pass' } })
    const harvest = await recorder(t)
    const image = h.registry.addImage(DEFAULT_PREFIX, [bytes(3000, 81)])
    for (const challenge of [`Bearer realm="${harvest.url}/token",service="cdn"`, 'Basic realm="storage"']) {
      h.registry.resetCounts()
      h.registry.faults = { redirectBlobs: true, storageChallenge: challenge }
      const res = await h.proxy.server.inject(packageUrl({ digest: image.manifestDigest }))
      const what = `${auth.kind} registry, storage says ${challenge.split(' ')[0] ?? ''}`
      t.equal(res.statusCode, 502, `${what}: 502`)
      t.match(JSON.parse(res.payload), { message: /redirected to asked for credentials/ }, what)
      t.notOk(res.payload.includes('storage-harvest-pass'), `${what}: no secret in the body`)
      t.same(harvest.requests, [], `${what}: nothing was sent to the realm the storage named`)
      t.ok(h.registry.counts.storage >= 1, `${what}: the storage was asked`)
      t.same(
        h.registry.storageAuthHeaders.filter((a) => a !== undefined),
        [],
        `${what}: never with Authorization`,
      )
      t.equal(h.registry.counts.blob, 1, `${what}: the registry was not asked again with other credentials`)
    }
    h.registry.faults = { redirectBlobs: true }
    const ok = await h.proxy.server.inject(packageUrl({ digest: image.manifestDigest }))
    t.equal(ok.statusCode, 200, `${auth.kind}: the same redirect without a challenge still serves`)
    t.ok(ok.rawPayload.equals(image.lastLayer.data))
  }
})

void t.test('an https registry that names an http:// token realm: refused, nothing sent there', async (t) => {
  const tls = selfSignedCert(t, t.testdir(), 'registry', 'the TLS realm test')
  if (!tls) return
  const harvest = await recorder(t)
  const seen: Array<{ path: string; authorization: string | undefined }> = []
  let realm = ''
  const manifest = Buffer.from('{"schemaVersion":2}')
  // A registry over TLS with token auth; its challenge names `realm`, and it issues tokens itself.
  const server = createHttpsServer({ cert: tls.cert, key: tls.key }, (req, res) => {
    seen.push({ path: req.url ?? '', authorization: req.headers.authorization })
    if (req.url?.startsWith('/token')) {
      res.writeHead(200, { 'Content-Type': 'application/json' })
      res.end(JSON.stringify({ token: 'good-token', expires_in: 300 }))
    } else if (req.headers.authorization === 'Bearer good-token') {
      res.writeHead(200, { 'Content-Type': MEDIA_TYPES.oci.manifest, 'Content-Length': manifest.length })
      res.end(manifest)
    } else {
      res.writeHead(401, { 'WWW-Authenticate': `Bearer realm="${realm}",service="svc"`, 'Content-Length': 0 })
      res.end()
    }
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  t.teardown(() => new Promise<void>((resolve) => server.close(() => resolve())))
  const address = server.address()
  if (address === null || typeof address === 'string') throw new Error('no port')
  const host = `127.0.0.1:${address.port}`
  const credentials = { username: 'u', password: 'realm-pass' }
  const source = (): RegistrySource => sourceFor(host, { scheme: 'https', ca: tls.cert, dockerConfigJson: dockerConfig(host, credentials) })
  const client = new RegistryClient({ env: {} })
  t.teardown(() => client.close())
  const digest = `sha256:${'3'.repeat(64)}`

  realm = `${harvest.url}/token`
  const err = (await client.fetchManifest(source(), DEFAULT_PREFIX, digest).catch((e: unknown) => e)) as Error
  t.type(err, UpstreamError)
  t.match(err.message, /token realm over plain http/)
  t.same(harvest.requests, [], 'the http realm got nothing, credentials least of all')

  // The control: the same registry naming an https realm gets its token (with the credentials).
  realm = `https://${host}/token`
  const got = await client.fetchManifest(source(), DEFAULT_PREFIX, digest)
  t.ok(got.body.equals(manifest))
  t.equal(seen.find((r) => r.path.startsWith('/token'))?.authorization, basic('u', 'realm-pass'))
})

void t.test('a caller that gives up (a pass-through whose client left) does not fail a token fetch others share', async (t) => {
  const registry = await FakeRegistry.start({ auth: { kind: 'bearer', username: 'u', password: 'shared-pass' } })
  t.teardown(() => registry.close())
  const client = new RegistryClient({ env: {}, timeouts: { headersMs: 5000 } })
  t.teardown(() => client.close())
  const source = sourceFor(registry.host, { dockerConfigJson: dockerConfig(registry.host, { username: 'u', password: 'shared-pass' }) })
  const [a, b] = [bytes(10, 95), bytes(11, 96)].map((data) => registry.addImage(DEFAULT_PREFIX, [data]))
  if (!a || !b) throw new Error('no images')
  // The token server is slow: both requests end up waiting on the one token fetch.
  registry.faults = { tokenDelayMs: 300 }
  const quitter = new AbortController()
  const first = client.fetchManifest(source, DEFAULT_PREFIX, a.manifestDigest, quitter.signal)
  const second = client.fetchManifest(source, DEFAULT_PREFIX, b.manifestDigest)
  first.catch(() => undefined)
  await registry.waitForRequests(1, (r) => r.origin === 'token')
  quitter.abort(new UpstreamError('the client went away'))
  await t.rejects(first, { message: 'the client went away' }, 'the caller that gave up gets its own reason')
  const got = await second
  t.ok(got.body.equals(b.manifest), 'the other request gets its manifest')
  t.equal(registry.counts.token, 1, 'with the one shared token fetch')
})

void t.test('distinct paths: one token per repository, and the token cache stays bounded', async (t) => {
  const registry = await FakeRegistry.start({ auth: { kind: 'bearer' } })
  t.teardown(() => registry.close())
  const client = new RegistryClient({ env: {}, maxTokens: 4 })
  t.teardown(() => client.close())
  const source = sourceFor(registry.host)
  const digest = `sha256:${'4'.repeat(64)}`
  for (let i = 0; i < 10; i++) await t.rejects(client.fetchManifest(source, `${DEFAULT_PREFIX}/p${i}`, digest), NotFoundError)
  const scopes = registry.requests.filter((r) => r.origin === 'token').map((r) => new URL(r.url, 'http://x').searchParams.get('scope'))
  t.same(
    scopes,
    Array.from({ length: 10 }, (_, i) => `repository:${DEFAULT_PREFIX}/p${i}:pull`),
    'each token is scoped to its repository',
  )
  registry.resetCounts()
  await t.rejects(client.fetchManifest(source, `${DEFAULT_PREFIX}/p9`, digest), NotFoundError)
  t.equal(registry.counts.token, 0, 'a recent repository reuses its token')
  await t.rejects(client.fetchManifest(source, `${DEFAULT_PREFIX}/p0`, digest), NotFoundError)
  t.equal(registry.counts.token, 1, 'the oldest was dropped to keep the bound')
})

void t.test('RegistryClient: manifests, blobs and their failures', async (t) => {
  const registry = await FakeRegistry.start()
  t.teardown(() => registry.close())
  const seen: Array<[UpstreamKind, number | 'error']> = []
  const client = new RegistryClient({ env: {}, timeouts: { headersMs: 500, idleMs: 500 }, observe: (kind, code) => seen.push([kind, code]) })
  t.teardown(() => client.close())
  const source = sourceFor(registry.host)
  const image = registry.addImage(DEFAULT_PREFIX, [bytes(100, 90)])

  const manifest = await client.fetchManifest(source, DEFAULT_PREFIX, image.manifestDigest)
  t.ok(manifest.body.equals(image.manifest))
  t.equal(manifest.mediaType, MEDIA_TYPES.oci.manifest)
  t.equal(registry.requests[0]?.headers.accept, MANIFEST_ACCEPT)
  t.match(String(registry.requests[0]?.headers['user-agent']), /registry-packages-proxy/)

  const blob = await client.openBlob(source, DEFAULT_PREFIX, image.lastLayer.digest)
  t.equal(blob.length, 100)
  const chunks: Buffer[] = []
  for await (const c of blob.body) chunks.push(c as Buffer)
  t.ok(Buffer.concat(chunks).equals(image.lastLayer.data))

  const resumed = await client.openBlob(source, DEFAULT_PREFIX, image.lastLayer.digest, { offset: 40 })
  t.equal(resumed.offset, 40)
  t.equal(resumed.length, 60)
  resumed.body.destroy()
  t.equal(registry.requests.at(-1)?.headers.range, 'bytes=40-')

  await t.rejects(client.fetchManifest(source, DEFAULT_PREFIX, `sha256:${'0'.repeat(64)}`), NotFoundError)
  await t.rejects(client.openBlob(source, DEFAULT_PREFIX, `sha256:${'0'.repeat(64)}`), NotFoundError)
  registry.faults = { manifestStatus: 429 }
  await t.rejects(client.fetchManifest(source, DEFAULT_PREFIX, image.manifestDigest), UpstreamError)
  registry.faults = {}
  t.ok(seen.some(([k, c]) => k === 'manifest' && c === 200))
  t.ok(seen.some(([k, c]) => k === 'blob' && c === 206))
  t.ok(seen.some(([k, c]) => k === 'manifest' && c === 404))
})

void t.test('RegistryClient: a body that stalls fails with the idle timeout, not as a broken connection', async (t) => {
  const registry = await FakeRegistry.start()
  t.teardown(() => registry.close())
  const client = new RegistryClient({ env: {}, timeouts: { idleMs: 300 } })
  t.teardown(() => client.close())
  const image = registry.addImage(DEFAULT_PREFIX, [bytes(100, 91)])
  registry.faults = { blobStallAfterBytes: 10 }
  const stalled = await client.openBlob(sourceFor(registry.host), DEFAULT_PREFIX, image.lastLayer.digest)
  const started = Date.now()
  const err = await (async () => {
    for await (const _ of stalled.body) {
      /* drain */
    }
  })().catch((e: unknown) => e)
  t.ok(Date.now() - started >= 250, 'after idleMs')
  // guardBody's fail() destroys the upstream response before the output stream; the response's
  // own 'close' handler then fails the output first with "registry closed the connection".
  t.type(err, TimeoutError, 'the error says what happened: the idle timeout')
  t.match(err, { code: 'ETIMEOUT', phase: 'idle' })
})

void t.test('RegistryClient: an oversized manifest is refused', async (t) => {
  const registry = await FakeRegistry.start()
  t.teardown(() => registry.close())
  const client = new RegistryClient({ env: {} })
  t.teardown(() => client.close())
  const huge = Buffer.from(JSON.stringify({ schemaVersion: 2, pad: 'x'.repeat(MAX_MANIFEST_BYTES) }))
  const digest = registry.addRawManifest(DEFAULT_PREFIX, huge, MEDIA_TYPES.oci.manifest)
  await t.rejects(client.fetchManifest(sourceFor(registry.host), DEFAULT_PREFIX, digest), { code: 'EUPSTREAM', message: /larger than/ })
})

void t.test('RegistryClient: a refused connection and a black hole', async (t) => {
  const port = await closedPort()
  const client = new RegistryClient({ env: {}, timeouts: { connectMs: 300, headersMs: 300 } })
  t.teardown(() => client.close())
  const err = (await client.fetchManifest(sourceFor(`127.0.0.1:${port}`), DEFAULT_PREFIX, `sha256:${'1'.repeat(64)}`).catch((e: unknown) => e)) as Error
  t.type(err, UpstreamError)
  t.match(err.message, /ECONNREFUSED/)

  const registry = await FakeRegistry.start()
  t.teardown(() => registry.close())
  registry.faults = { neverAnswer: true }
  const started = Date.now()
  await t.rejects(client.fetchManifest(sourceFor(registry.host), DEFAULT_PREFIX, `sha256:${'1'.repeat(64)}`), TimeoutError)
  t.ok(Date.now() - started < 2000)

  const controller = new AbortController()
  const pending = client.fetchManifest(sourceFor(registry.host), DEFAULT_PREFIX, `sha256:${'2'.repeat(64)}`, controller.signal)
  controller.abort(new UpstreamError('caller gave up'))
  await t.rejects(pending, { message: 'caller gave up' })
})

void t.test('RegistryClient: a source replaced with new credentials gets new tokens', async (t) => {
  const registry = await FakeRegistry.start({ auth: { kind: 'bearer', username: 'a', password: 'pw-one' } })
  t.teardown(() => registry.close())
  const client = new RegistryClient({ env: {} })
  t.teardown(() => client.close())
  const image = registry.addImage(DEFAULT_PREFIX, [bytes(10, 99)])
  const one = sourceFor(registry.host, { dockerConfigJson: dockerConfig(registry.host, { username: 'a', password: 'pw-one' }) })
  await client.fetchManifest(one, DEFAULT_PREFIX, image.manifestDigest)
  await client.fetchManifest(one, DEFAULT_PREFIX, image.manifestDigest)
  t.equal(registry.counts.token, 1)
  const two = sourceFor(registry.host, { dockerConfigJson: dockerConfig(registry.host, { username: 'a', password: 'pw-one' }) })
  await client.fetchManifest(two, DEFAULT_PREFIX, image.manifestDigest)
  t.equal(registry.counts.token, 2, 'tokens are not shared across source objects')
})

void t.test('through HTTPS_PROXY (CONNECT), a registry is verified with its source CA, end to end', async (t) => {
  const tls = selfSignedCert(t, t.testdir(), 'registry', 'the TLS realm test')
  if (!tls) return
  const manifest = Buffer.from('{"schemaVersion":2}')
  const server = createHttpsServer({ cert: tls.cert, key: tls.key }, (_req, res) => {
    res.writeHead(200, { 'Content-Type': MEDIA_TYPES.oci.manifest, 'Content-Length': manifest.length })
    res.end(manifest)
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  t.teardown(() => new Promise<void>((resolve) => server.close(() => resolve())))
  const address = server.address()
  if (address === null || typeof address === 'string') throw new Error('no port')
  const host = `127.0.0.1:${address.port}`
  // A forward proxy that only tunnels: it sees CONNECT lines, never the TLS inside.
  const tunnels: string[] = []
  const proxy = createNetServer((client) => {
    client.once('data', (head: Buffer) => {
      const target = /^CONNECT ([^ ]+) HTTP/.exec(head.toString('latin1'))?.[1] ?? ''
      tunnels.push(target)
      const [h, p] = target.split(':')
      const upstream = connectTcp(Number(p), h ?? '', () => {
        client.write('HTTP/1.1 200 Connection Established\r\n\r\n')
        upstream.pipe(client).pipe(upstream)
      })
      upstream.on('error', () => client.destroy())
      client.on('error', () => upstream.destroy())
    })
  })
  await new Promise<void>((resolve) => proxy.listen(0, '127.0.0.1', resolve))
  t.teardown(() => new Promise<void>((resolve) => proxy.close(() => resolve())))
  const proxyPort = (proxy.address() as { port: number }).port
  const client = new RegistryClient({ env: { HTTPS_PROXY: `http://127.0.0.1:${proxyPort}` } })
  t.teardown(() => client.close())
  const digest = `sha256:${'4'.repeat(64)}`
  const got = await client.fetchManifest(sourceFor(host, { scheme: 'https', ca: tls.cert }), DEFAULT_PREFIX, digest)
  t.ok(got.body.equals(manifest), 'served through the tunnel, the certificate verified by the source CA')
  t.same(tunnels, [host], 'it went through the proxy')
  // The control: without the CA the same tunnel fails verification (no trust is skipped).
  const err = (await client.fetchManifest(sourceFor(host, { scheme: 'https' }), DEFAULT_PREFIX, digest).catch((e: unknown) => e)) as Error
  t.type(err, UpstreamError, `without the source CA: refused (${err.message})`)
})

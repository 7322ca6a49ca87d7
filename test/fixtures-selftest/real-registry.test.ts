/**
 * Self-test of the real-registry fixture: in each mode, push an image with the fixture and pull it
 * back with independent plain HTTP(S) requests (not through the proxy, not with the fixture's own
 * client), the way a registry client would: challenge → credentials/token → manifest by digest →
 * blob.
 */
import t from 'tap'
import type { Test } from 'tap'
import { createHash, randomBytes } from 'node:crypto'
import * as http from 'node:http'
import type { IncomingHttpHeaders, IncomingMessage } from 'node:http'
import * as https from 'node:https'
import { dockerRegistryBinary, startRealRegistry } from '../fixtures/real-registry.js'
import type { RealRegistry, RealRegistryAuth } from '../fixtures/real-registry.js'

const SKIP_MSG = 'docker-registry is not installed: real-registry tests SKIPPED'
const skip = dockerRegistryBinary() === undefined ? SKIP_MSG : false
if (skip !== false) {
  t.comment('#'.repeat(70))
  t.comment(`### ${SKIP_MSG}`)
  t.comment('#'.repeat(70))
  console.error(`\n!!! ${SKIP_MSG} !!!\n`)
}

const OCI_MANIFEST = 'application/vnd.oci.image.manifest.v1+json'
const DOCKER_MANIFEST = 'application/vnd.docker.distribution.manifest.v2+json'
const OCI_INDEX = 'application/vnd.oci.image.index.v1+json'
const DOCKER_LIST = 'application/vnd.docker.distribution.manifest.list.v2+json'
const ACCEPT = [OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_LIST].join(', ')

interface Res {
  status: number
  headers: IncomingHttpHeaders
  body: Buffer
}

/** Independent HTTP client (node:http/https, CA pinned when given). */
function get(url: string, headers: Record<string, string> = {}, ca?: string, method = 'GET'): Promise<Res> {
  return new Promise((resolve, reject) => {
    const u = new URL(url)
    const opts: https.RequestOptions = { method, headers, agent: false }
    if (ca !== undefined) opts.ca = ca
    const onRes = (res: IncomingMessage): void => {
      const chunks: Buffer[] = []
      res.on('data', (c: Buffer) => chunks.push(c))
      res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks) }))
      res.on('error', reject)
    }
    const req = u.protocol === 'https:' ? https.request(u, opts, onRes) : http.request(u, opts, onRes)
    req.on('error', reject)
    req.end()
  })
}

const sha256 = (b: Buffer): string => `sha256:${createHash('sha256').update(b).digest('hex')}`
const basic = (u: string, p: string): string => `Basic ${Buffer.from(`${u}:${p}`).toString('base64')}`

/** Parses `Bearer realm="..",service="..",scope=".."`. */
function parseChallenge(h: string | undefined): { scheme: string; params: Record<string, string> } {
  if (h === undefined) throw new Error('no WWW-Authenticate')
  const sp = h.indexOf(' ')
  const params: Record<string, string> = {}
  for (const m of h.slice(sp + 1).matchAll(/(\w+)="([^"]*)"/g)) params[m[1] ?? ''] = m[2] ?? ''
  return { scheme: h.slice(0, sp).toLowerCase(), params }
}

/**
 * Gets the Authorization header for pulling `repo`, starting from an anonymous request and
 * following the challenge, as a client would.
 */
async function authFor(t: Test, reg: RealRegistry, auth: RealRegistryAuth, url: string): Promise<Record<string, string>> {
  const anon = await get(url, { accept: ACCEPT }, reg.caPem)
  if (auth === 'none') {
    t.equal(anon.status, 200, 'anonymous pull allowed without auth')
    return {}
  }
  t.equal(anon.status, 401, 'anonymous pull refused')
  const ch = parseChallenge(anon.headers['www-authenticate'])
  if (auth === 'htpasswd') {
    t.equal(ch.scheme, 'basic')
    t.equal(ch.params['realm'], 'basic-realm')
    const wrong = await get(url, { accept: ACCEPT, authorization: basic(reg.username ?? '', 'wrong') }, reg.caPem)
    t.equal(wrong.status, 401, 'wrong password refused')
    return { authorization: basic(reg.username ?? '', reg.password ?? '') }
  }
  t.equal(ch.scheme, 'bearer')
  t.equal(ch.params['realm'], reg.tokenRealm, 'challenge realm is the token server')
  const tokenUrl = new URL(ch.params['realm'] ?? '')
  tokenUrl.searchParams.set('service', ch.params['service'] ?? '')
  tokenUrl.searchParams.set('scope', ch.params['scope'] ?? '')
  t.match(ch.params['scope'], /^repository:.+:pull$/, 'challenge asks for pull scope')
  const before = reg.tokenRequests()
  const anonToken = await get(tokenUrl.toString(), {}, reg.caPem)
  t.equal(anonToken.status, 401, 'token server refuses anonymous')
  const badToken = await get(tokenUrl.toString(), { authorization: basic(reg.username ?? '', 'nope') }, reg.caPem)
  t.equal(badToken.status, 401, 'token server refuses a wrong password')
  const tok = await get(tokenUrl.toString(), { authorization: basic(reg.username ?? '', reg.password ?? '') }, reg.caPem)
  t.equal(tok.status, 200, 'token issued')
  t.equal(reg.tokenRequests() - before, 3, 'tokenRequests counts the token server requests')
  const body = JSON.parse(tok.body.toString('utf8')) as { token: string; access_token: string; expires_in: number; issued_at: string }
  t.equal(body.token, body.access_token)
  t.equal(body.expires_in, 300)
  t.ok(!Number.isNaN(Date.parse(body.issued_at)))
  const forged = body.token.slice(0, body.token.lastIndexOf('.') + 1) + Buffer.from('x'.repeat(256)).toString('base64url')
  const withForged = await get(url, { accept: ACCEPT, authorization: `Bearer ${forged}` }, reg.caPem)
  t.equal(withForged.status, 401, 'a token with a bad signature is refused')
  return { authorization: `Bearer ${body.token}` }
}

interface Mode {
  auth: RealRegistryAuth
  tls: boolean
  mediaType: 'oci' | 'docker'
}
const modes: Mode[] = [
  { auth: 'none', tls: false, mediaType: 'oci' },
  { auth: 'htpasswd', tls: false, mediaType: 'docker' },
  { auth: 'token', tls: false, mediaType: 'oci' },
  { auth: 'none', tls: true, mediaType: 'docker' },
  { auth: 'htpasswd', tls: true, mediaType: 'oci' },
  { auth: 'token', tls: true, mediaType: 'docker' },
]

for (const mode of modes) {
  void t.test(`push and pull back: auth=${mode.auth} tls=${String(mode.tls)} ${mode.mediaType}`, { skip }, async (t) => {
    const reg = await startRealRegistry({ dir: t.testdir(), auth: mode.auth, tls: mode.tls })
    t.teardown(() => reg.stop())
    t.equal(reg.scheme, mode.tls ? 'https' : 'http')
    t.match(reg.host, /^127\.0\.0\.1:\d+$/)
    t.equal(typeof reg.caPem, mode.tls ? 'string' : 'undefined')
    if (mode.tls) {
      // The CA really is needed: without it the handshake fails.
      await t.rejects(get(`https://${reg.host}/v2/`), 'TLS without the CA is rejected')
      const viaLocalhost = await get(`https://localhost:${reg.host.split(':')[1] ?? ''}/v2/`, {}, reg.caPem)
      t.ok([200, 401].includes(viaLocalhost.status), 'certificate also valid for localhost')
    }

    const repo = 'deckhouse/ce/pkg'
    const layers = [randomBytes(1024), randomBytes(64 * 1024 + 7)]
    const img = await reg.push(repo, layers, { mediaType: mode.mediaType, tag: 'v1' })
    t.equal(img.repo, repo)
    t.equal(img.manifestDigest, sha256(img.manifest))
    t.same(img.layerDigests, layers.map(sha256))
    const parsed = JSON.parse(img.manifest.toString('utf8')) as { schemaVersion: number; mediaType: string; config: { digest: string } }
    t.equal(parsed.schemaVersion, 2)
    t.equal(parsed.mediaType, mode.mediaType === 'oci' ? OCI_MANIFEST : DOCKER_MANIFEST)
    t.equal(parsed.config.digest, img.configDigest)

    const base = `${reg.scheme}://${reg.host}/v2/${repo}`
    const manifestUrl = `${base}/manifests/${img.manifestDigest}`
    const auth = await authFor(t, reg, mode.auth, manifestUrl)

    const head = await get(manifestUrl, { ...auth, accept: ACCEPT }, reg.caPem, 'HEAD')
    t.equal(head.status, 200, 'HEAD manifest by digest')
    t.equal(head.headers['docker-content-digest'], img.manifestDigest)
    t.equal(head.headers['content-length'], String(img.manifest.length))

    const m = await get(manifestUrl, { ...auth, accept: ACCEPT }, reg.caPem)
    t.equal(m.status, 200, 'GET manifest by digest')
    t.ok(m.body.equals(img.manifest), 'manifest bytes equal what was pushed')
    t.equal(m.headers['content-type'], parsed.mediaType)
    t.equal(m.headers['docker-content-digest'], img.manifestDigest)

    const byTag = await get(`${base}/manifests/v1`, { ...auth, accept: ACCEPT }, reg.caPem)
    t.equal(byTag.status, 200, 'GET manifest by tag')
    t.equal(byTag.headers['docker-content-digest'], img.manifestDigest)

    const lastDigest = img.layerDigests[img.layerDigests.length - 1] ?? ''
    const blob = await get(`${base}/blobs/${lastDigest}`, auth, reg.caPem)
    t.equal(blob.status, 200, 'blob served directly (no redirect) by the filesystem driver')
    t.ok(blob.body.equals(layers[1] ?? Buffer.alloc(0)), 'last layer bytes equal what was pushed')
    t.equal(blob.headers['docker-content-digest'], lastDigest)

    if (mode.auth === 'token') {
      // A valid token for another repository: 401 with error="insufficient_scope".
      const realm = new URL(reg.tokenRealm ?? '')
      realm.searchParams.set('service', 'real-registry-test-service')
      realm.searchParams.set('scope', 'repository:some/other:pull')
      const other = await get(realm.toString(), { authorization: basic(reg.username ?? '', reg.password ?? '') }, reg.caPem)
      const token = (JSON.parse(other.body.toString('utf8')) as { token: string }).token
      const denied = await get(manifestUrl, { accept: ACCEPT, authorization: `Bearer ${token}` }, reg.caPem)
      t.equal(denied.status, 401, 'token for another repository refused')
      t.match(denied.headers['www-authenticate'], /error="insufficient_scope"/)
    }
    if (mode.auth !== 'none') {
      const anonBlob = await get(`${base}/blobs/${lastDigest}`, {}, reg.caPem)
      t.equal(anonBlob.status, 401, 'anonymous blob fetch refused')
    }
  })
}

void t.test('OCI manifests need an OCI Accept header; docker ones are served regardless', { skip }, async (t) => {
  const reg = await startRealRegistry({ dir: t.testdir(), auth: 'none' })
  t.teardown(() => reg.stop())
  const oci = await reg.push('accept/oci', [randomBytes(100)], { mediaType: 'oci' })
  const docker = await reg.push('accept/docker', [randomBytes(100)], { mediaType: 'docker' })
  const base = `${reg.scheme}://${reg.host}/v2`
  const ociNoAccept = await get(`${base}/accept/oci/manifests/${oci.manifestDigest}`)
  t.equal(ociNoAccept.status, 404, 'OCI manifest without OCI Accept → 404 MANIFEST_UNKNOWN')
  const ociDockerAccept = await get(`${base}/accept/oci/manifests/${oci.manifestDigest}`, { accept: DOCKER_MANIFEST })
  t.equal(ociDockerAccept.status, 404, 'OCI manifest with only docker Accept → 404')
  const dockerNoAccept = await get(`${base}/accept/docker/manifests/${docker.manifestDigest}`)
  t.equal(dockerNoAccept.status, 200, 'docker manifest by digest without Accept → 200')
  t.ok(dockerNoAccept.body.equals(docker.manifest))
})

void t.test('pushIndex: OCI index and docker manifest list', { skip }, async (t) => {
  const reg = await startRealRegistry({ dir: t.testdir(), auth: 'token' })
  t.teardown(() => reg.stop())
  t.equal(reg.tokenRequests(), 0, 'pushes do not go through the token server')
  const repo = 'multi/arch'
  for (const mediaType of ['oci', 'docker'] as const) {
    const amd = await reg.push(repo, [randomBytes(300)], { mediaType, tag: `${mediaType}-amd64` })
    const arm = await reg.push(repo, [randomBytes(300)], { mediaType, tag: `${mediaType}-arm64` })
    const { digest, index } = await reg.pushIndex(
      repo,
      [
        { image: amd, os: 'linux', architecture: 'amd64' },
        { image: arm, os: 'linux', architecture: 'arm64' },
      ],
      { mediaType, tag: mediaType },
    )
    t.equal(digest, sha256(index))
    const url = `${reg.scheme}://${reg.host}/v2/${repo}/manifests/${digest}`
    const auth = await authFor(t, reg, 'token', url)
    const got = await get(url, { ...auth, accept: ACCEPT })
    t.equal(got.status, 200)
    t.ok(got.body.equals(index), `${mediaType} index bytes equal`)
    t.equal(got.headers['content-type'], mediaType === 'oci' ? OCI_INDEX : DOCKER_LIST)
    const parsed = JSON.parse(index.toString('utf8')) as { manifests: Array<{ digest: string; platform: { architecture: string } }> }
    t.same(
      parsed.manifests.map((m) => [m.digest, m.platform.architecture]),
      [
        [amd.manifestDigest, 'amd64'],
        [arm.manifestDigest, 'arm64'],
      ],
    )
  }
})

void t.test('stop is idempotent and frees the port', { skip }, async (t) => {
  const reg = await startRealRegistry({ dir: t.testdir(), auth: 'none' })
  await Promise.all([reg.stop(), reg.stop()])
  await reg.stop()
  await t.rejects(get(`http://${reg.host}/v2/`), 'registry no longer answers')
})

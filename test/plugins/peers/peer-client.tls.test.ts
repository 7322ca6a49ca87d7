/**
 * Peers in Kubernetes are reached over HTTPS through their kube-rbac-proxy: the client sends
 * the pod's service-account token as a bearer token, verifies the serving certificate against
 * the mounted CA (by the peer's IP, or by --peer-server-name), and refuses any other CA. A local
 * TLS server with openssl-made certificates stands in for kube-rbac-proxy.
 */
import { createHash } from 'node:crypto'
import { writeFileSync } from 'node:fs'
import { createServer, type Server } from 'node:https'
import { listenUntilTeardown } from '../../fixtures/listen.js'
import { join } from 'node:path'
import t, { type Test } from 'tap'
import { PeerClient } from '../../../plugins/peers/peer-client.js'
import { TokenFile } from '../../../plugins/peers/token-file.js'
import { makeCa, makeServerCert } from '../../fixtures/peer-tls.js'

const NAME = 'registry-packages-proxy.d8-cloud-instance-manager.svc'
const MANIFEST = Buffer.from('{"schemaVersion":2}')
const DIGEST = `sha256:${createHash('sha256').update(MANIFEST).digest('hex')}`

/** A kube-rbac-proxy stand-in: 401 unless the bearer token is `token()`, else the manifest. */
async function fakeRbacProxy(t: Test, tls: { cert: string; key: string }, token: () => string): Promise<{ member: string; seen: Array<string | undefined> }> {
  const seen: Array<string | undefined> = []
  const server: Server = createServer(tls, (req, res) => {
    seen.push(req.headers.authorization)
    if (req.headers.authorization !== `Bearer ${token()}`) {
      res.writeHead(401).end()
      return
    }
    if (req.url !== `/peers/manifests/${DIGEST}`) {
      res.writeHead(404).end()
      return
    }
    res.writeHead(200, { 'Content-Type': 'application/vnd.oci.image.manifest.v1+json', 'Content-Length': MANIFEST.length }).end(MANIFEST)
  })
  const port = await listenUntilTeardown(t, server)
  return { member: `127.0.0.1:${port}`, seen }
}

void t.test('HTTPS to a peer: bearer token, certificate verified against the CA, never another', async (t) => {
  const dir = t.testdir()
  const [ca, otherCa] = await Promise.all([makeCa(dir, 'peers-ca'), makeCa(dir, 'other-ca')])
  // The certificate names the service, as one made before the node IPs are known would, and
  // 127.0.0.1, so both ways of checking the name are exercised.
  const serving = await makeServerCert(dir, ca, 'kube-rbac-proxy', [`DNS:${NAME}`, 'IP:127.0.0.1'])
  const byName = await makeServerCert(dir, ca, 'by-name-only', [`DNS:${NAME}`])
  const tokenPath = join(dir, 'token')
  writeFileSync(tokenPath, 'token-1\n')
  let accepted = 'token-1'
  const peer = await fakeRbacProxy(t, serving, () => accepted)
  const nameOnly = await fakeRbacProxy(t, byName, () => accepted)
  // A long refresh: a new token is read only because the peer refused the old one.
  const token = new TokenFile({ path: tokenPath, refreshMs: 3_600_000 })
  const timeouts = { firstByteMs: 5_000, idleMs: 5_000 }

  const byIp = new PeerClient(timeouts, { ca: ca.pem, token })
  t.teardown(() => byIp.close())
  const got = await byIp.manifest(peer.member, DIGEST)
  t.equal(got.result, 'ok', 'verified by the IP the certificate names')
  t.equal(got.manifest?.body.toString(), MANIFEST.toString())
  t.same(peer.seen, ['Bearer token-1'], 'the token file, trimmed, as a bearer token')
  t.equal((await byIp.manifest(nameOnly.member, DIGEST)).result, 'unreachable', 'a certificate that does not name the IP is refused')
  t.same(nameOnly.seen, [], 'and no request was sent to it')

  const named = new PeerClient(timeouts, { ca: ca.pem, token, serverName: NAME })
  t.teardown(() => named.close())
  t.equal((await named.manifest(nameOnly.member, DIGEST)).result, 'ok', '--peer-server-name: the certificate must name that instead')
  const misnamed = new PeerClient(timeouts, { ca: ca.pem, token, serverName: 'someone-else.svc' })
  t.teardown(() => misnamed.close())
  t.equal((await misnamed.manifest(peer.member, DIGEST)).result, 'unreachable', 'a certificate for another name is refused')

  const wrongCa = new PeerClient(timeouts, { ca: otherCa.pem, token })
  t.teardown(() => wrongCa.close())
  const before = peer.seen.length
  t.equal((await wrongCa.manifest(peer.member, DIGEST)).result, 'unreachable', 'a certificate from another CA is refused')
  t.equal(peer.seen.length, before, 'the token never went to a server the CA does not vouch for')

  // The kubelet rotates the token: the peer refuses the old one once, then the new one is read.
  writeFileSync(tokenPath, 'token-2\n')
  accepted = 'token-2'
  t.equal((await byIp.manifest(peer.member, DIGEST)).result, 'refused', 'the old token is refused')
  t.equal((await byIp.manifest(peer.member, DIGEST)).result, 'ok', 'the file is read again after a 401')
  t.same(peer.seen.slice(-2), ['Bearer token-1', 'Bearer token-2'])
})

void t.test('TokenFile: read again once it is old; an unreadable file gives no token', async (t) => {
  const dir = t.testdir({ token: 'a\n' })
  let now = 0
  const token = new TokenFile({ path: join(dir, 'token'), refreshMs: 1000, now: () => now })
  t.equal(await token.get(), 'a')
  writeFileSync(join(dir, 'token'), 'b')
  now = 999
  t.equal(await token.get(), 'a', 'reused while fresh')
  now = 1000
  t.equal(await token.get(), 'b', 'read again once refreshMs old')
  t.equal(await new TokenFile({ path: join(dir, 'missing') }).get(), undefined)
})

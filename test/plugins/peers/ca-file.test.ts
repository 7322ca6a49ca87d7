/**
 * The peers' CA file is re-read when it changes (cert-manager renews the CA and the kubelet
 * rewrites the mounted ca.crt): over real TLS, a peer whose certificate a new CA signed is
 * refused while the file holds the old CA and accepted once it holds the new one, with no
 * restart; a file that turns unreadable or holds no certificate keeps the last good CA.
 */
import { createHash } from 'node:crypto'
import { renameSync, rmSync, writeFileSync } from 'node:fs'
import { createServer, type Server } from 'node:https'
import { listenUntilTeardown } from '../../fixtures/listen.js'
import { join } from 'node:path'
import t, { type Test } from 'tap'
import { CaFile } from '../../../plugins/peers/ca-file.js'
import { PeerClient } from '../../../plugins/peers/peer-client.js'
import { captureLogger } from '../../fixtures/log-capture.js'
import { makeCa, makeServerCert } from '../../fixtures/peer-tls.js'

const MANIFEST = Buffer.from('{"schemaVersion":2}')
const DIGEST = `sha256:${createHash('sha256').update(MANIFEST).digest('hex')}`
const TOKEN = { get: () => Promise.resolve('token'), stale: () => undefined }

/** A kube-rbac-proxy stand-in serving the manifest with `tls`; counts the requests it got. */
async function peer(t: Test, tls: { cert: string; key: string }): Promise<{ member: string; requests: () => number }> {
  let requests = 0
  const server: Server = createServer(tls, (_req, res) => {
    requests++
    res.writeHead(200, { 'Content-Type': 'application/vnd.oci.image.manifest.v1+json', 'Content-Length': MANIFEST.length }).end(MANIFEST)
  })
  const port = await listenUntilTeardown(t, server)
  return { member: `127.0.0.1:${port}`, requests: () => requests }
}

void t.test('a renewed CA file is used for new peer connections; a bad one keeps the last good CA', async (t) => {
  const log = captureLogger('info')
  t.teardown(() => undefined)
  const dir = t.testdir()
  const [oldCa, newCa] = await Promise.all([makeCa(dir, 'old-ca'), makeCa(dir, 'new-ca')])
  const [oldPeer, newPeer] = await Promise.all([
    peer(t, await makeServerCert(dir, oldCa, 'old-serving', ['IP:127.0.0.1'])),
    peer(t, await makeServerCert(dir, newCa, 'new-serving', ['IP:127.0.0.1'])),
  ])
  const caPath = join(dir, 'ca.crt')
  writeFileSync(caPath, oldCa.pem)
  let now = 0
  const ca = new CaFile({ path: caPath, checkMs: 5_000, log: log.logger, now: () => now })
  const client = new PeerClient({ firstByteMs: 5_000, idleMs: 5_000 }, { ca, token: TOKEN })
  t.teardown(() => client.close())

  t.equal((await client.manifest(oldPeer.member, DIGEST)).result, 'ok', 'the old CA verifies the old peer')
  t.equal((await client.manifest(newPeer.member, DIGEST)).result, 'unreachable', 'a peer signed by the new CA is refused')
  t.equal(newPeer.requests(), 0, 'and got no request (no token)')

  // The kubelet's way: a new file swapped into place.
  writeFileSync(`${caPath}.new`, newCa.pem)
  renameSync(`${caPath}.new`, caPath)
  now = 4_999
  t.equal((await client.manifest(newPeer.member, DIGEST)).result, 'unreachable', 'not looked at again before the check period')
  now = 5_000
  t.equal((await client.manifest(newPeer.member, DIGEST)).result, 'ok', 'the new CA, once the file was looked at again')
  t.equal(newPeer.requests(), 1)
  t.equal((await client.manifest(oldPeer.member, DIGEST)).result, 'unreachable', 'the old CA is no longer trusted, not even on a pooled connection')
  t.match(log.lines(), [{ msg: 'peer CA file changed; new connections to peers verify against it', path: caPath }])

  // A torn or wrong file: warned once, the last good CA kept.
  writeFileSync(caPath, '-----BEGIN CERTIFICATE-----\nnot base64\n')
  now = 10_000
  t.equal((await client.manifest(newPeer.member, DIGEST)).result, 'ok', 'not PEM: the new CA is kept')
  now = 15_000
  t.equal((await client.manifest(newPeer.member, DIGEST)).result, 'ok')
  rmSync(caPath)
  now = 20_000
  t.equal((await client.manifest(newPeer.member, DIGEST)).result, 'ok', 'missing: the new CA is kept')
  now = 25_000
  await client.manifest(newPeer.member, DIGEST)
  const warnings = log.lines().filter((l) => l.level === 40)
  t.match(warnings, [
    { msg: 'peer CA file holds no PEM certificate; keeping the last good CA' },
    { msg: 'peer CA file cannot be read; keeping the last good CA', code: 'ENOENT' },
  ])
  t.equal(warnings.length, 2, 'each bad state warned once, not every check')
  // Back to the old CA (say, a rollback): taken again.
  writeFileSync(caPath, oldCa.pem)
  now = 30_000
  t.equal((await client.manifest(oldPeer.member, DIGEST)).result, 'ok')
})

void t.test('a CA file that is missing or holds no certificate fails start-up', (t) => {
  const dir = t.testdir({ 'bad.crt': 'hello\n' })
  const log = captureLogger('info').logger
  t.throws(() => new CaFile({ path: join(dir, 'missing.crt'), log }), /--peer-ca-file .*missing.crt: cannot read \(ENOENT\)/)
  t.throws(() => new CaFile({ path: join(dir, 'bad.crt'), log }), /not a PEM certificate/)
  t.end()
})

import { writeFileSync } from 'node:fs'
import { request as httpRequest } from 'node:http'
import { createServer as createHttpsServer } from 'node:https'
import { join } from 'node:path'
import t from 'tap'
import { runCacheCommand } from '../../cli/cache-command.js'
import { bytes, packageUrl, startHarness } from '../fixtures/proxy-harness.js'
import { selfSignedCert } from '../fixtures/self-signed.js'

function io(): { out: string[]; err: string[]; io: { out: (s: string) => void; err: (s: string) => void } } {
  const out: string[] = []
  const err: string[] = []
  return { out, err, io: { out: (s) => out.push(s), err: (s) => err.push(s) } }
}

void t.test('cache ls, show and rm against a running server', async (t) => {
  const h = await startHarness(t)
  await h.proxy.server.start()
  const url = h.proxy.server.info.uri
  const img = h.registry.addImage('deckhouse/ce/cli', [bytes(2048, 9)])
  await h.proxy.server.inject(packageUrl({ digest: img.manifestDigest, path: 'cli' }))
  await h.proxy.packages.service.settled()

  const ls = io()
  t.equal(await runCacheCommand(['ls', '--url', url], ls.io), 0)
  t.match(ls.out.join('\n'), /cache enabled: 2\.0Ki of 64Mi in 1 entries/)
  t.match(ls.out.join('\n'), new RegExp(`${img.lastLayer.digest.slice(7, 19)}\\s+2\\.0Ki\\s+0`))

  const lsJson = io()
  t.equal(await runCacheCommand(['ls', `--url=${url}`, '--json'], lsJson.io), 0)
  const parsed = JSON.parse(lsJson.out.join('')) as { entries: number; items: Array<{ digest: string }> }
  t.equal(parsed.entries, 1)
  t.equal(parsed.items[0]?.digest, img.lastLayer.digest)

  const show = io()
  t.equal(await runCacheCommand(['show', img.manifestDigest, '--url', url], show.io), 0)
  t.match(show.out.join('\n'), new RegExp(`layer\\s+${img.lastLayer.digest}`))
  t.match(show.out.join('\n'), /size\s+2\.0Ki \(2048 bytes\)/)

  // rm needs the proxy's admin token: read from the cache directory, as inside the container.
  const noToken = io()
  t.equal(
    await runCacheCommand(['rm', img.manifestDigest, '--url', url], noToken.io, { RPP_CACHE_DIRECTORY: join(h.dir, 'elsewhere') }),
    1,
    'no token file: exit 1',
  )
  t.match(noToken.err.join(''), /cannot read the cache admin token .*elsewhere\/admin-token \(ENOENT\)/)
  const wrong = join(h.dir, 'wrong-token')
  writeFileSync(wrong, 'f'.repeat(64))
  const refused = io()
  t.equal(await runCacheCommand(['rm', img.manifestDigest, '--url', url, '--token-file', wrong], refused.io), 1, 'a wrong token: exit 1')
  t.match(refused.err.join(''), /^403: .*X-Cache-Token/)
  const rm = io()
  t.equal(await runCacheCommand(['rm', img.manifestDigest, '--url', url], rm.io, { RPP_CACHE_DIRECTORY: h.cacheDirectory }), 0)
  t.match(rm.out.join(''), `removed ${img.lastLayer.digest}`)

  const missing = io()
  t.equal(await runCacheCommand(['show', img.manifestDigest, '--url', url], missing.io), 1, 'not found is exit 1')
  t.match(missing.err.join(''), /^404: .* is not in the cache/)
})

void t.test('usage errors are exit 2; an unreachable server is exit 1', async (t) => {
  for (const argv of [[], ['bogus'], ['show'], ['rm', 'sha256:short'], ['ls', '--what'], ['ls', '--url']]) {
    const x = io()
    t.equal(await runCacheCommand(argv, x.io), 2, `${argv.join(' ') || '(nothing)'} is a usage error`)
    t.ok(x.err.length > 0)
  }
  const down = io()
  t.equal(await runCacheCommand(['ls', '--url', 'http://127.0.0.1:1'], down.io), 1)
  t.match(down.err.join(''), /cannot reach http:\/\/127\.0\.0\.1:1: ECONNREFUSED/)
})

void t.test('--url https://: through a TLS front that wants a bearer token, as kube-rbac-proxy does', async (t) => {
  const tls = selfSignedCert(t, t.testdir(), 'kube-rbac-proxy', 'the https CLI test')
  if (!tls) return
  const h = await startHarness(t)
  await h.proxy.server.start()
  const upstream = new URL(h.proxy.server.info.uri)
  const img = h.registry.addImage('deckhouse/ce/tls', [bytes(1024, 10)])
  await h.proxy.server.inject(packageUrl({ digest: img.manifestDigest, path: 'tls' }))
  await h.proxy.packages.service.settled()
  const seen: Array<string | undefined> = []
  // A small stand-in for kube-rbac-proxy: HTTPS, a bearer token required, forwarded as is.
  const front = createHttpsServer({ cert: tls.cert, key: tls.key }, (req, res) => {
    seen.push(req.headers.authorization)
    if (req.headers.authorization !== 'Bearer on-call-token') {
      res.writeHead(401, { 'Content-Type': 'text/plain' })
      res.end('Unauthorized')
      return
    }
    const forward = httpRequest({ host: upstream.hostname, port: upstream.port, method: req.method, path: req.url, headers: req.headers }, (up) => {
      res.writeHead(up.statusCode ?? 502, up.headers)
      up.pipe(res)
    })
    req.pipe(forward)
  })
  await new Promise<void>((resolve) => front.listen(0, '127.0.0.1', resolve))
  t.teardown(() => new Promise<void>((resolve) => front.close(() => resolve())))
  const address = front.address()
  if (address === null || typeof address === 'string') throw new Error('no port')
  const url = `https://127.0.0.1:${address.port}`
  const bearer = join(h.dir, 'bearer')
  writeFileSync(bearer, 'on-call-token\n')

  const untrusted = io()
  t.equal(await runCacheCommand(['ls', '--url', url], untrusted.io), 1, 'a self-signed certificate is not trusted by default')
  t.match(untrusted.err.join(''), /cannot reach https:\/\/127\.0\.0\.1:\d+: .*(SELF_SIGNED|CERT)/)
  const noBearer = io()
  t.equal(await runCacheCommand(['ls', '--url', url, '--insecure'], noBearer.io), 1)
  t.match(noBearer.err.join(''), /^401: Unauthorized/)
  const ls = io()
  t.equal(await runCacheCommand(['ls', '--url', url, '--insecure', '--bearer-token-file', bearer], ls.io), 0, 'https with --insecure and a bearer token')
  t.match(ls.out.join('\n'), /cache enabled: 1\.0Ki of 64Mi in 1 entries/)
  const rm = io()
  t.equal(
    await runCacheCommand(['rm', img.manifestDigest, '--url', url, '--insecure', '--bearer-token-file', bearer], rm.io, {
      RPP_CACHE_DIRECTORY: h.cacheDirectory,
    }),
    0,
    rm.err.join(''),
  )
  t.match(rm.out.join(''), `removed ${img.lastLayer.digest}`)
  t.ok(
    seen.slice(2).every((a) => a === 'Bearer on-call-token'),
    'the bearer token went with every request',
  )
  const missing = io()
  t.equal(await runCacheCommand(['ls', '--url', url, '--bearer-token-file', join(h.dir, 'nope')], missing.io), 1)
  t.match(missing.err.join(''), /cannot read --bearer-token-file .* \(ENOENT\)/)
})

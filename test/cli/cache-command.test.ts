import t from 'tap'
import { runCacheCommand } from '../../cli/cache-command.js'
import { bytes, packageUrl, startHarness } from '../fixtures/proxy-harness.js'

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

  const rm = io()
  t.equal(await runCacheCommand(['rm', img.manifestDigest, '--url', url], rm.io), 0)
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

/**
 * `/v1/packages/<repository>/<package>/metadata/icon`: icons from the flattened filesystem of
 * package images in a fake registry, the repository named in `--registry-config`'s
 * `packageRepositories` (the Kubernetes watch is tested in test/plugins/credentials/).
 */
import { writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { pino } from 'pino'
import t, { type Test } from 'tap'
import { createServer, type ProxyServer } from '../../server.js'
import { FakeRegistry } from '../fixtures/fake-registry.js'
import { layerTarGz, type LayerEntry } from '../fixtures/layers.js'

const REPO = 'packages/fox/version'
const SVG = '<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script><rect width="1" height="1"/></svg>'

interface Setup {
  registry: FakeRegistry
  proxy: ProxyServer
}

async function setup(t: Test, repository: Record<string, unknown> = {}): Promise<Setup> {
  const registry = await FakeRegistry.start()
  t.teardown(() => registry.close())
  const dir = t.testdir()
  const config = join(dir, 'registry.json')
  writeFileSync(
    config,
    JSON.stringify({
      default: { address: registry.host, path: '/deckhouse/ce', scheme: 'http' },
      packageRepositories: [{ name: 'main', repo: `${registry.host}/packages`, scheme: 'http', ...repository }],
    }),
  )
  const proxy = await createServer({
    cacheDirectory: join(dir, 'cache'),
    limitBytes: 2 ** 26,
    registryConfig: config,
    logger: pino({ level: 'silent' }),
    collectDefaultMetrics: false,
    env: {},
    tagTtlMs: 0,
    timeouts: { headersMs: 2000 },
  })
  t.teardown(() => proxy.server.stop())
  return { registry, proxy }
}

/** Pushes a package image of `layers` tagged `tag`; returns its manifest digest. */
async function push(s: Setup, tag: string, ...layers: LayerEntry[][]): Promise<string> {
  const image = s.registry.addImage(REPO, await Promise.all(layers.map((l) => layerTarGz(l))))
  s.registry.tag(REPO, tag, image.manifestDigest)
  return image.manifestDigest
}

const URL_LATEST = '/v1/packages/main/fox/metadata/icon'

void t.test('the icon of the highest semantic-version tag, with its headers; an SVG gets a CSP', async (t) => {
  const s = await setup(t)
  await push(s, 'v1.2.0', [{ name: 'docs/icon.svg', data: '<svg>old</svg>' }])
  const latest = await push(s, 'v1.10.0', [
    { name: './docs/icon.svg', data: SVG },
    { name: 'docs/icon.png', data: 'png' },
  ])
  await push(s, 'main', [{ name: 'docs/icon.svg', data: '<svg>not a version</svg>' }])
  for (const url of [URL_LATEST, `${URL_LATEST}/`]) {
    const res = await s.proxy.server.inject(url)
    t.equal(res.statusCode, 200, url)
    t.equal(res.payload, SVG, 'v1.10.0 beats v1.2.0; main is ignored; svg beats png')
    t.match(res.headers, {
      'content-type': 'image/svg+xml',
      'content-disposition': 'attachment; filename="fox.svg"',
      'content-length': String(Buffer.byteLength(SVG)),
      etag: `"${latest}"`,
      'x-content-type-options': 'nosniff',
      'content-security-policy': "default-src 'none'; style-src 'unsafe-inline'; sandbox",
      'cache-control': 'no-cache',
    })
  }
  const old = await s.proxy.server.inject(`${URL_LATEST}/v1.2.0`)
  t.equal(old.statusCode, 200)
  t.equal(old.payload, '<svg>old</svg>')
  t.equal(old.headers['cache-control'], 'public, max-age=31536000, immutable', 'a version never changes')
  const head = await s.proxy.server.inject({ method: 'HEAD', url: `${URL_LATEST}/v1.2.0` })
  t.equal(head.statusCode, 200)
  t.equal(head.payload, '')
  t.equal((await s.proxy.server.inject({ url: URL_LATEST, headers: { 'if-none-match': `"${latest}"` } })).statusCode, 304)
  const star = await s.proxy.server.inject({ url: URL_LATEST, headers: { 'if-none-match': '*' } })
  t.equal(star.statusCode, 304, '`*` once the icon was found, as on /package')
  t.equal(star.headers.etag, `"${latest}"`)
})

void t.test('png, jpg and jpeg in that order, from any layer, whiteouts honoured', async (t) => {
  const s = await setup(t)
  await push(
    s,
    '1.0.0',
    [
      { name: 'docs/icon.svg', data: 'svg' },
      { name: 'docs/icon.jpg', data: 'jpg' },
    ],
    [{ name: 'docs/.wh.icon.svg' }],
  )
  const res = await s.proxy.server.inject(URL_LATEST)
  t.equal(res.statusCode, 200)
  t.equal(res.payload, 'jpg', 'the svg was whited out in a later layer')
  t.equal(res.headers['content-type'], 'image/jpeg')
  t.equal(res.headers['content-disposition'], 'attachment; filename="fox.jpg"')
  t.equal(res.headers['content-security-policy'], undefined, 'the CSP is for SVG')
  await push(s, '2.0.0', [
    { name: 'docs/icon.png', data: 'png' },
    { name: 'docs/icon.jpeg', data: 'jpeg' },
  ])
  const png = await s.proxy.server.inject(URL_LATEST)
  t.equal(png.payload, 'png')
  t.equal(png.headers['content-type'], 'image/png')
})

void t.test('extracted icons are kept by manifest digest; concurrent requests share one extraction', async (t) => {
  const s = await setup(t)
  await push(s, '1.0.0', [{ name: 'a', data: 'a' }], [{ name: 'docs/icon.svg', data: SVG }])
  s.registry.resetCounts()
  const all = await Promise.all(Array.from({ length: 5 }, () => s.proxy.server.inject(URL_LATEST)))
  t.same(
    all.map((r) => r.statusCode),
    [200, 200, 200, 200, 200],
  )
  t.equal(s.registry.counts.blob, 2, 'each of the two layers read once for five requests')
  t.equal((await s.proxy.server.inject(URL_LATEST)).statusCode, 200)
  t.equal(s.registry.counts.blob, 2, 'a later request reads no layer')
})

void t.test('404s: unknown repository (no connection), no semver tag, no icon, an icon over 4 MiB', async (t) => {
  const s = await setup(t)
  t.equal((await s.proxy.server.inject('/v1/packages/other/fox/metadata/icon')).statusCode, 404)
  t.equal(s.registry.counts.total, 0, 'an unknown repository reaches no registry')
  t.equal((await s.proxy.server.inject(URL_LATEST)).statusCode, 404, 'no such package')
  await push(s, 'main', [{ name: 'docs/icon.svg', data: SVG }])
  t.equal((await s.proxy.server.inject(URL_LATEST)).statusCode, 404, 'no semantic-version tag')
  await push(s, '1.0.0', [{ name: 'README.md', data: 'no icon' }])
  t.equal((await s.proxy.server.inject(URL_LATEST)).statusCode, 404, 'no icon in the image')
  t.equal((await s.proxy.server.inject(`${URL_LATEST}/9.9.9`)).statusCode, 404, 'no such version')
  await push(s, '2.0.0', [
    { name: 'docs/icon.svg', data: Buffer.alloc(4 * 1024 * 1024 + 1, 0x20) },
    { name: 'docs/icon.png', data: 'png' },
  ])
  t.equal((await s.proxy.server.inject(URL_LATEST)).statusCode, 404, 'the svg is over 4 MiB: not served (and not skipped for the png)')
  await push(s, '3.0.0', [{ name: 'docs/icon.png', data: Buffer.alloc(4 * 1024 * 1024, 0x20) }])
  t.equal((await s.proxy.server.inject(URL_LATEST)).statusCode, 200, 'exactly 4 MiB is served')
})

void t.test('400, 405, 502', async (t) => {
  const s = await setup(t)
  await push(s, '1.0.0', [{ name: 'docs/icon.svg', data: SVG }])
  s.registry.resetCounts()
  t.equal((await s.proxy.server.inject(`${URL_LATEST}/latest`)).statusCode, 400, 'a version that is not semver')
  t.equal((await s.proxy.server.inject('/v1/packages/main/Fox_/metadata/icon')).statusCode, 400, 'a package that is no name')
  t.equal(s.registry.counts.total, 0, 'neither reached the registry')
  t.equal((await s.proxy.server.inject({ method: 'POST', url: URL_LATEST })).statusCode, 405)
  t.equal((await s.proxy.server.inject('/v1/packages/main/fox/metadata/logo')).statusCode, 404)
  s.registry.faults = { blobStatus: 500 }
  t.equal((await s.proxy.server.inject(URL_LATEST)).statusCode, 502)
  s.registry.faults = { corruptBlob: true }
  t.equal((await s.proxy.server.inject(URL_LATEST)).statusCode, 502, 'a layer that does not verify yields no icon')
  s.registry.faults = {}
  t.equal((await s.proxy.server.inject(URL_LATEST)).statusCode, 200, 'and a failure is not remembered')
})

void t.test('login/password and dockerCfg credentials reach the registry', async (t) => {
  const registry = await FakeRegistry.start({ auth: { kind: 'basic', username: 'u', password: 'p' } })
  t.teardown(() => registry.close())
  for (const [what, creds] of [
    ['login/password', { login: 'u', password: 'p', dockerCfg: Buffer.from('{"auths":{}}').toString('base64') }],
    ['dockerCfg', { dockerCfg: Buffer.from(JSON.stringify({ auths: { [registry.host]: { username: 'u', password: 'p' } } })).toString('base64') }],
  ] as const) {
    const dir = t.testdir()
    writeFileSync(join(dir, 'r.json'), JSON.stringify({ packageRepositories: [{ name: 'main', repo: `${registry.host}/packages`, scheme: 'http', ...creds }] }))
    const proxy = await createServer({
      cacheDirectory: join(dir, 'c'),
      limitBytes: 2 ** 20,
      registryConfig: join(dir, 'r.json'),
      logger: pino({ level: 'silent' }),
      collectDefaultMetrics: false,
      env: {},
    })
    const image = registry.addImage(REPO, [await layerTarGz([{ name: 'docs/icon.svg', data: what }])])
    registry.tag(REPO, '1.0.0', image.manifestDigest)
    const res = await proxy.server.inject(URL_LATEST)
    t.equal(res.statusCode, 200, what)
    t.equal(res.payload, what)
    await proxy.server.stop()
  }
})

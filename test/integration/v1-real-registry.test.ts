/**
 * The v1 endpoints against a real registry (Debian's docker-registry): a multi-arch CLI index
 * and several tags pushed by the test, and a package image of several tar layers with whiteouts.
 */
import { mkdirSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { pino } from 'pino'
import t from 'tap'
import { createServer } from '../../server.js'
import { layerTarGz } from '../fixtures/layers.js'
import { haveRealRegistry, startRealRegistry } from '../fixtures/real-registry.js'
import { makePackageTarGz } from '../fixtures/tarball.js'

void t.test('CLI tags, platform downloads with Range, and an icon through whiteouts, from a real registry', async (t) => {
  if (!haveRealRegistry(t, 'SKIPPED: v1 endpoints against a real registry (docker-registry is not installed)')) return
  // One testdir per test (a second call would empty it under the running registry).
  const root = t.testdir()
  const registry = await startRealRegistry({ dir: join(root, 'registry'), auth: 'none' })
  t.teardown(() => registry.stop())
  const cli = 'deckhouse/ce/deckhouse-cli'
  const amd = await registry.push(cli, [makePackageTarGz({ 'bin/d8': 'amd64 build' })], { tag: 'amd64-only' })
  const arm = await registry.push(cli, [makePackageTarGz({ 'bin/d8': 'arm64 build' })], { mediaType: 'docker', tag: 'arm64-only' })
  await registry.pushIndex(
    cli,
    [
      { image: amd, os: 'linux', architecture: 'amd64' },
      { image: arm, os: 'linux', architecture: 'arm64' },
    ],
    { tag: 'v0.20.0' },
  )
  await registry.pushIndex(cli, [{ image: amd, os: 'linux', architecture: 'amd64' }], { tag: 'v0.19.0' })

  const pkg = 'packages/fox/version'
  await registry.push(
    pkg,
    [
      await layerTarGz([
        { name: 'docs/', type: 'directory' },
        { name: 'docs/icon.svg', data: '<svg>old</svg>' },
        { name: 'docs/icon.png', data: 'png' },
      ]),
      await layerTarGz([{ name: './docs/.wh.icon.svg' }, { name: 'docs/icon.jpg', data: 'jpg' }]),
      await layerTarGz([{ name: '/docs/.wh..wh..opq' }, { name: 'docs/icon.jpeg', data: 'jpeg' }]),
    ],
    { tag: 'v1.0.0' },
  )
  await registry.push(pkg, [await layerTarGz([{ name: 'docs/icon.svg', data: '<svg>new</svg>' }])], { tag: 'v0.9.0' })

  const dir = join(root, 'proxy')
  mkdirSync(dir)
  writeFileSync(
    join(dir, 'r.json'),
    JSON.stringify({
      default: { address: registry.host, path: '/deckhouse/ce', scheme: 'http' },
      packageRepositories: [{ name: 'main', repo: `${registry.host}/packages`, scheme: 'http' }],
    }),
  )
  const proxy = await createServer({
    cacheDirectory: join(dir, 'cache'),
    limitBytes: 2 ** 24,
    registryConfig: join(dir, 'r.json'),
    logger: pino({ level: 'silent' }),
    collectDefaultMetrics: false,
    env: {},
  })
  t.teardown(() => proxy.server.stop())

  const tags = await proxy.server.inject('/v1/images/deckhouse-cli/tags')
  t.equal(tags.statusCode, 200, tags.payload)
  t.same((tags.result as { tags: string[] }).tags.sort(), ['amd64-only', 'arm64-only', 'v0.19.0', 'v0.20.0'])

  const url = '/v1/images/deckhouse-cli/images/v0.20.0'
  const amdRes = await proxy.server.inject(url)
  t.equal(amdRes.statusCode, 200)
  t.ok(amdRes.rawPayload.equals(amd.layers[0] ?? Buffer.alloc(1)), 'linux-amd64 from the OCI index')
  t.equal(amdRes.headers['docker-content-digest'], amd.manifestDigest)
  const armRes = await proxy.server.inject(`${url}?platform=linux-arm64`)
  t.ok(armRes.rawPayload.equals(arm.layers[0] ?? Buffer.alloc(1)), 'linux-arm64, a Docker schema 2 image in the index')
  const ranged = await proxy.server.inject({ url: `${url}?platform=linux-arm64`, headers: { range: 'bytes=5-14' } })
  t.equal(ranged.statusCode, 206)
  t.ok(ranged.rawPayload.equals((arm.layers[0] ?? Buffer.alloc(0)).subarray(5, 15)))
  t.equal((await proxy.server.inject(`${url}?platform=linux-s390x`)).statusCode, 404)
  const manifest = await proxy.server.inject('/v1/images/deckhouse-cli/manifests/v0.20.0')
  t.equal(manifest.statusCode, 200)
  t.equal(manifest.headers['content-type'], 'application/vnd.oci.image.index.v1+json')

  const icon = await proxy.server.inject('/v1/packages/main/fox/metadata/icon')
  t.equal(icon.statusCode, 200)
  t.equal(icon.payload, 'jpeg', 'v1.0.0 (not v0.9.0); the svg whited out, then the opaque docs/ hid the png and jpg')
  t.equal(icon.headers['content-type'], 'image/jpeg')
  const older = await proxy.server.inject('/v1/packages/main/fox/metadata/icon/v0.9.0')
  t.equal(older.payload, '<svg>new</svg>')
  t.match(older.headers['content-security-policy'], /default-src 'none'/)
  // Fills commit just after their last byte; let them finish before tap removes the directory.
  await proxy.packages.service.settled()
})

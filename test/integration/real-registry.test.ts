/**
 * The proxy against a REAL registry (Debian's docker-registry, distribution 2.8) in every auth
 * mode, with and without TLS: real packages go in with plain pushes, come out through the
 * proxy's HTTP listener byte for byte, and are extracted with the system `tar` as the node
 * bootstrap would. A hit is proved by stopping the registry and fetching again.
 */
import t from 'tap'
import type { Test } from 'tap'
import { execFile } from 'node:child_process'
import { constants } from 'node:fs'
import { access, mkdir, readFile, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { promisify } from 'node:util'
import { captureLogger, type CapturedLog } from '../fixtures/log-capture.js'
import { haveRealRegistry, startRealRegistry } from '../fixtures/real-registry.js'
import type { PushedImage, RealRegistry, RealRegistryAuth, RealRegistryOptions } from '../fixtures/real-registry.js'
import { makePackageTarGz } from '../fixtures/tarball.js'
import { eventually } from '../fixtures/eventually.js'
import KeyvSqlite from '@keyv/sqlite'
import { createServer } from '../../server.js'
import {
  basicToken,
  dockerConfigJson,
  listFiles,
  request,
  writeRegistryConfig,
  type DefaultSourceConfig,
  type ModuleSourceConfig,
  type RawResponse,
} from '../fixtures/registry-config.js'

const execFileAsync = promisify(execFile)

const SKIP_MSG = 'docker-registry is not installed: real-registry integration tests SKIPPED'
const skip = haveRealRegistry(t, SKIP_MSG) ? false : SKIP_MSG

/** A proxy listening on a real socket, with its log lines captured. */
interface RunningProxy {
  url: string
  cacheDir: string
  logs: CapturedLog
  get(query: string, init?: { method?: string; headers?: Record<string, string> }): Promise<RawResponse>
  /** How the proxy says it served the n-th /package request (`hit`, `miss`, ...). */
  results(): unknown[]
  /** Upstream exchanges the proxy made, by kind (its own counter; the registry cannot count). */
  upstream(): Promise<Record<string, number>>
  /** Layer downloads into the cache running now. */
  activeFills(): number
  /** Resolves once every running fill has committed or cleaned up. */
  settled(): Promise<void>
}

async function startProxy(t: Test, dir: string, config: { default?: DefaultSourceConfig; moduleSources?: ModuleSourceConfig[] }): Promise<RunningProxy> {
  await mkdir(dir, { recursive: true })
  const cacheDir = join(dir, 'cache')
  const registryConfig = await writeRegistryConfig(dir, config)
  const logs = captureLogger('info')
  const proxy = await createServer({
    cacheDirectory: cacheDir,
    limitBytes: 256 * 1024 * 1024,
    registryConfig,
    logger: logs.logger,
    env: {},
    collectDefaultMetrics: false,
    timeouts: { connectMs: 5_000, headersMs: 10_000, idleMs: 10_000 },
  })
  await proxy.server.start()
  t.teardown(() => proxy.server.stop())
  const url = proxy.server.info.uri
  return {
    url,
    cacheDir,
    logs,
    // Each answer waits for the fill behind it to commit: a fill commits (fsync, rename, row)
    // just after its last byte, and tap removes a test's directory before its teardowns run
    // when t.testdir() came first, which would pull the cache folder from under that commit.
    get: async (query, init) => {
      const res = await request(`${url}/package?${query}`, init)
      await proxy.packages.service.settled()
      return res
    },
    results: () =>
      logs
        .lines()
        .filter((l) => l.path === '/package')
        .map((l) => l.result),
    upstream: async () => {
      const out: Record<string, number> = {}
      for (const v of (await proxy.metrics.upstreamRequests.get()).values) {
        const kind = String(v.labels.kind)
        out[kind] = (out[kind] ?? 0) + v.value
      }
      return out
    },
    activeFills: () => proxy.packages.service.activeFills,
    settled: () => proxy.packages.service.settled(),
  }
}

/** A two-layer image whose last layer is a real package with an executable `install`. */
function packageLayers(name: string): { base: Buffer; pkg: Buffer } {
  const base = makePackageTarGz({ 'usr/share/doc/base.txt': `base layer of ${name}\n` })
  const pkg = makePackageTarGz({
    install: `#!/bin/sh\nset -e\necho installing ${name}\n`,
    uninstall: '#!/bin/sh\nexit 0\n',
    [`${name}/payload.bin`]: Buffer.from(`${name}:`.repeat(4096)),
  })
  return { base, pkg }
}

/** A real registry under `dir` (stopped at teardown) holding `deckhouse/ce/pkg`, two layers, the last one a package. */
async function registryWithPackage(
  t: Test,
  dir: string,
  options: Omit<RealRegistryOptions, 'dir'>,
): Promise<{ reg: RealRegistry; image: PushedImage; pkg: Buffer; query: string }> {
  const reg = await startRealRegistry({ dir: join(dir, 'registry'), ...options })
  t.teardown(() => reg.stop())
  const { base, pkg } = packageLayers('pkg')
  const image = await reg.push('deckhouse/ce/pkg', [base, pkg])
  return { reg, image, pkg, query: `digest=${image.manifestDigest}&path=pkg` }
}

/** An assertion message for a 200 that shows the error body when it is not one. */
function said200(what: string, res: RawResponse): string {
  return res.status === 200 ? `${what}: 200` : `${what}: 200 (got ${res.status}: ${res.body.subarray(0, 300).toString('utf8')})`
}

/** Checks the contract's headers for a 200 of `layer` requested as `digest`. */
function checkHeaders(t: Test, res: RawResponse, digest: string, image: PushedImage): void {
  const layer = image.layers[image.layers.length - 1] ?? Buffer.alloc(0)
  const layerDigest = image.layerDigests[image.layerDigests.length - 1] ?? ''
  t.equal(res.headers['content-type'], 'application/x-gzip', 'Content-Type')
  t.equal(res.headers['content-length'], String(layer.length), 'Content-Length is the layer size')
  t.equal(res.headers.etag, `"${digest}"`, 'ETag is the requested digest')
  t.equal(res.headers['cache-control'], 'public, max-age=31536000, immutable', 'Cache-Control')
  t.equal(res.headers['accept-ranges'], 'bytes', 'Accept-Ranges')
  const disposition = /^attachment; filename="([0-9a-f]{64})\.tar\.gz"$/.exec(res.headers['content-disposition'] ?? '')
  t.ok(disposition, `Content-Disposition is an attachment named <64 hex>.tar.gz: ${String(res.headers['content-disposition'])}`)
  t.ok([digest.slice(7), layerDigest.slice(7)].includes(disposition?.[1] ?? ''), 'the file name is the hex of the requested (or layer) digest')
}

/** Extracts the served bytes with the system tar, as the node bootstrap does. */
async function extractsAsPackage(t: Test, dir: string, body: Buffer, name: string): Promise<void> {
  await mkdir(dir, { recursive: true })
  const archive = join(dir, 'package.tar.gz')
  const out = join(dir, 'out')
  await mkdir(out)
  await writeFile(archive, body)
  await execFileAsync('tar', ['-xzf', archive, '-C', out])
  await access(join(out, 'install'), constants.X_OK)
  t.pass('tar -xzf gives an executable ./install')
  t.match(await readFile(join(out, 'install'), 'utf8'), `echo installing ${name}`, 'install is the pushed one')
}

/** The bodies and logs that must never carry a credential. */
function assertNoSecret(t: Test, haystacks: Array<[string, string]>, reg: RealRegistry, extra: string[] = []): void {
  const secrets = [...extra]
  if (reg.password !== undefined) secrets.push(reg.password, basicToken(reg.username ?? '', reg.password))
  for (const [what, text] of haystacks) {
    for (const s of secrets) t.notOk(text.includes(s), `${what} holds no credential`)
  }
}

const MODES: Array<{ auth: RealRegistryAuth; tls: boolean }> = [
  { auth: 'none', tls: false },
  { auth: 'htpasswd', tls: false },
  { auth: 'token', tls: false },
  { auth: 'none', tls: true },
  { auth: 'htpasswd', tls: true },
  { auth: 'token', tls: true },
]

/** The default source for `reg`, credentials and CA included. */
function defaultSource(reg: RealRegistry, overrides: Partial<DefaultSourceConfig> = {}): DefaultSourceConfig {
  return {
    address: reg.host,
    path: '/deckhouse/ce',
    scheme: reg.scheme,
    ...(reg.caPem !== undefined ? { ca: reg.caPem } : {}),
    ...(reg.password !== undefined ? { dockerConfigJson: dockerConfigJson(reg.host, reg.username ?? '', reg.password) } : {}),
    ...overrides,
  }
}

for (const mode of MODES) {
  const label = `${mode.auth}${mode.tls ? '+tls' : ''}`
  void t.test(`${label}: a package is served byte-exact, then from the cache with the registry gone`, { skip }, async (t) => {
    const dir = t.testdir()
    const { reg, image, pkg, query } = await registryWithPackage(t, dir, { auth: mode.auth, tls: mode.tls })
    const proxy = await startProxy(t, join(dir, 'proxy'), { default: defaultSource(reg) })

    const first = await proxy.get(query)
    t.equal(first.status, 200, said200('miss', first))
    t.ok(first.body.equals(pkg), 'miss: the bytes are the last layer, exactly')
    checkHeaders(t, first, image.manifestDigest, image)
    const tokensAfterMiss = reg.tokenRequests()
    if (mode.auth === 'token') t.ok(tokensAfterMiss >= 1, 'the proxy got a token from the token server')
    const upstreamAfterMiss = await proxy.upstream()
    t.ok((upstreamAfterMiss.blob ?? 0) >= 1, 'the miss fetched the layer from the registry')

    // The fill commits (rename, index rows) just after the last byte went out; a GET inside
    // that window is the subject of its own test below. Here: the steady state, a hit.
    await proxy.settled()
    const second = await proxy.get(query)
    t.equal(second.status, 200, 'second GET: 200')
    t.ok(second.body.equals(pkg), 'second GET: byte-exact')
    checkHeaders(t, second, image.manifestDigest, image)
    t.equal(reg.tokenRequests(), tokensAfterMiss, 'the hit asked the token server for nothing')
    t.same(await proxy.upstream(), upstreamAfterMiss, 'the hit made no upstream request at all')
    // The log line is written when hapi has finished the response, which may be just after
    // the client saw its last byte.
    await eventually(() => proxy.results().length >= 2, 'both requests are logged', { timeoutMs: 5_000 })
    t.same(proxy.results(), ['miss', 'hit'], 'logged as a miss, then a hit')

    await reg.stop()
    const third = await proxy.get(query)
    t.equal(third.status, 200, 'with the registry stopped: still 200')
    t.ok(third.body.equals(pkg), 'with the registry stopped: byte-exact from the cache')

    await extractsAsPackage(t, join(dir, 'tar'), third.body, 'pkg')
    assertNoSecret(t, [['the proxy log', proxy.logs.text()]], reg)
  })
}

void t.test('a ModuleSource repository with its own dockerCfg credentials', { skip }, async (t) => {
  const dir = t.testdir()
  const reg = await startRealRegistry({ dir: join(dir, 'registry'), auth: 'htpasswd' })
  t.teardown(() => reg.stop())
  const { base, pkg } = packageLayers('example')
  const image = await reg.push('modules/example/pkg', [base, pkg])
  const repo = `${reg.host}/modules/example`
  // The default source has no credentials: only the ModuleSource's dockerCfg can pull this.
  const proxy = await startProxy(t, join(dir, 'proxy'), {
    default: { address: reg.host, path: '/deckhouse/ce', scheme: 'http' },
    moduleSources: [
      {
        name: 'example',
        repo,
        scheme: 'http',
        dockerCfg: Buffer.from(dockerConfigJson(reg.host, reg.username ?? '', reg.password ?? '')).toString('base64'),
      },
    ],
  })
  const res = await proxy.get(`digest=${image.manifestDigest}&repository=${encodeURIComponent(repo)}&path=pkg`)
  t.equal(res.status, 200, said200('200', res))
  t.ok(res.body.equals(pkg), 'byte-exact')
  checkHeaders(t, res, image.manifestDigest, image)
  await extractsAsPackage(t, join(dir, 'tar'), res.body, 'example')

  const unknown = await proxy.get(`digest=${image.manifestDigest}&repository=${encodeURIComponent(`${reg.host}/modules/other`)}&path=pkg`)
  t.equal(unknown.status, 404, 'a repository that matches no source: 404')
})

void t.test('image indexes resolve to linux/amd64; Docker schema 2 manifests are accepted', { skip }, async (t) => {
  const dir = t.testdir()
  const reg = await startRealRegistry({ dir: join(dir, 'registry'), auth: 'none' })
  t.teardown(() => reg.stop())
  const amd = packageLayers('amd64')
  const arm = packageLayers('arm64')
  const proxy = await startProxy(t, join(dir, 'proxy'), { default: defaultSource(reg) })

  for (const kind of ['oci', 'docker'] as const) {
    const repo = `deckhouse/ce/multi-${kind}`
    const armImage = await reg.push(repo, [arm.base, arm.pkg], { mediaType: kind, tag: 'arm64' })
    const amdImage = await reg.push(repo, [amd.base, amd.pkg], { mediaType: kind, tag: 'amd64' })
    const index = await reg.pushIndex(
      repo,
      [
        { image: armImage, os: 'linux', architecture: 'arm64' },
        { image: amdImage, os: 'linux', architecture: 'amd64' },
      ],
      { mediaType: kind, tag: 'multi' },
    )
    const res = await proxy.get(`digest=${index.digest}&path=multi-${kind}`)
    t.equal(res.status, 200, said200(`${kind} index`, res))
    t.ok(res.body.equals(amd.pkg), `${kind} index: the linux/amd64 image's last layer`)
    t.equal(res.headers.etag, `"${index.digest}"`, `${kind} index: the ETag is the index digest asked for`)
    await extractsAsPackage(t, join(dir, `tar-${kind}`), res.body, 'amd64')
  }

  const dockerRepo = 'deckhouse/ce/docker'
  const { base, pkg } = packageLayers('docker')
  const image = await reg.push(dockerRepo, [base, pkg], { mediaType: 'docker' })
  t.match(image.manifest.toString('utf8'), 'application/vnd.docker.distribution.manifest.v2+json', 'pushed as Docker schema 2')
  const res = await proxy.get(`digest=${image.manifestDigest}&path=docker`)
  t.equal(res.status, 200, said200(`Docker schema 2`, res))
  t.ok(res.body.equals(pkg), 'Docker schema 2: byte-exact')
  checkHeaders(t, res, image.manifestDigest, image)
})

for (const auth of ['htpasswd', 'token'] as const) {
  void t.test(`${auth}: a wrong password is a 502 that names no secret`, { skip }, async (t) => {
    const dir = t.testdir()
    const { reg, query } = await registryWithPackage(t, dir, { auth })
    const wrong = 'Wr0ng-Pa55-do-not-print'
    const proxy = await startProxy(t, join(dir, 'proxy'), {
      default: defaultSource(reg, { dockerConfigJson: dockerConfigJson(reg.host, reg.username ?? '', wrong) }),
    })
    const res = await proxy.get(query)
    t.equal(res.status, 502, '502')
    const body = JSON.parse(res.body.toString('utf8')) as Record<string, unknown>
    t.match(body, { statusCode: 502, error: String, message: String }, 'a JSON error body')
    assertNoSecret(
      t,
      [
        ['the response body', res.body.toString('utf8')],
        ['the response headers', JSON.stringify(res.headers)],
        ['the proxy log', proxy.logs.text()],
      ],
      reg,
      [wrong, basicToken(reg.username ?? '', wrong)],
    )
    t.same(await listFiles(join(proxy.cacheDir, 'blobs')), [], 'nothing was cached')
  })
}

void t.test('TLS: a registry whose CA is not configured is a 502; with the CA it works', { skip }, async (t) => {
  const dir = t.testdir()
  const { reg, pkg, query } = await registryWithPackage(t, dir, { auth: 'none', tls: true })

  const { ca: _ca, ...withoutCa } = defaultSource(reg)
  const untrusting = await startProxy(t, join(dir, 'untrusting'), { default: withoutCa })
  const refused = await untrusting.get(query)
  t.equal(refused.status, 502, 'unknown CA: 502')
  t.match(JSON.parse(refused.body.toString('utf8')), { statusCode: 502 }, 'a JSON error body')

  // The same registry with its CA configured: the 502 above was the missing trust, nothing else.
  const trusting = await startProxy(t, join(dir, 'trusting'), { default: defaultSource(reg) })
  const ok = await trusting.get(query)
  t.equal(ok.status, 200, 'CA configured: 200')
  t.ok(ok.body.equals(pkg), 'CA configured: byte-exact')
})

void t.test('HEAD on a miss answers from the manifest and never downloads the layer', { skip }, async (t) => {
  const dir = t.testdir()
  const { reg, image, pkg, query } = await registryWithPackage(t, dir, { auth: 'none' })
  const proxy = await startProxy(t, join(dir, 'proxy'), { default: defaultSource(reg) })

  const head = await proxy.get(query, { method: 'HEAD' })
  t.equal(head.status, 200, 'HEAD: 200')
  t.equal(head.body.length, 0, 'HEAD: no body')
  checkHeaders(t, head, image.manifestDigest, image)
  t.equal((await proxy.upstream()).blob ?? 0, 0, 'HEAD: no blob request to the registry')
  // A fill is registered before its first await and committed before it is unregistered: no
  // running fill and no file means none was ever started.
  t.equal(proxy.activeFills(), 0, 'HEAD: no fill running')
  const afterHead = await listFiles(proxy.cacheDir)
  t.same(
    afterHead.filter((f) => f.startsWith('blobs/') || f.startsWith('tmp/')),
    [],
    'HEAD: no blob file, no partial file',
  )

  // The same check after a GET finds the file: the assertion above looks in the right place.
  const get = await proxy.get(query)
  t.equal(get.status, 200, 'GET: 200')
  t.ok(get.body.equals(pkg), 'GET: byte-exact')
  const layerHex = (image.layerDigests[1] ?? '').slice('sha256:'.length)
  await proxy.settled()
  const afterGet = (await listFiles(proxy.cacheDir)).includes(join('blobs', 'sha256', layerHex.slice(0, 2), layerHex))
  t.ok(afterGet, 'GET: the layer is now a blob file in the cache')
})

void t.test('a GET right after a complete miss needs no registry (the fill is committed in time)', { skip }, async (t) => {
  const dir = t.testdir()
  const { reg, pkg, query } = await registryWithPackage(t, dir, { auth: 'none' })
  const proxy = await startProxy(t, join(dir, 'proxy'), { default: defaultSource(reg) })

  // Hold the SQLite write lock so the commit after the fill (rename + index rows) cannot finish:
  // it makes the window between "the client has every byte" and "the entry is in the index"
  // as long as the test needs, instead of a few racy milliseconds. The proxy's busy timeout
  // is 5 s; the lock is released well before that.
  const lock = new KeyvSqlite({ uri: `sqlite://${join(proxy.cacheDir, 'index.sqlite')}`, busyTimeout: 5_000 })
  let locked = true
  const unlock = async (): Promise<void> => {
    if (!locked) return
    locked = false
    await lock.query('COMMIT')
  }
  t.teardown(async () => {
    await unlock()
    await lock.disconnect()
  })
  await lock.query('BEGIN IMMEDIATE')
  // A proxy that withholds the last byte until the commit (one correct design) would wait on
  // the lock: release it if the first response has not ended after 1.5 s.
  const fallback = setTimeout(() => void unlock(), 1_500)
  const first = await proxy.get(query)
  clearTimeout(fallback)
  t.equal(first.status, 200, 'first GET: 200')
  t.ok(first.body.equals(pkg), 'first GET: byte-exact')
  const upstreamAfterFirst = await proxy.upstream()

  // The client has the whole package; the registry now goes away.
  await reg.stop()
  const second = await proxy.get(query)
  t.equal(second.status, 200, said200('GET after the registry stopped', second))
  t.ok(second.body.equals(pkg), 'GET after the registry stopped: byte-exact')
  t.same(await proxy.upstream(), upstreamAfterFirst, 'no upstream request for a package the proxy has just served')
  await unlock()
  await proxy.settled()
  const third = await proxy.get(query)
  t.equal(third.status, 200, 'after the commit: 200')
  t.ok(third.body.equals(pkg), 'after the commit: byte-exact')
})

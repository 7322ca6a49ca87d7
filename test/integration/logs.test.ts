/**
 * Logs of the shipped binary (`node dist/main.js --log-level=debug`) over a run that uses every
 * kind of credential: the fake registry with Basic and with Bearer tokens (a token server that
 * wants Basic credentials), and a real docker-registry in htpasswd and in token mode, each with a
 * right and a wrong password; packages fetched (misses, hits, HEAD), errors hit (refused
 * credentials, unknown digest and repository, a layer that fails verification mid-stream), a
 * SIGHUP reload and a SIGTERM. Then all output, stdout and stderr, is searched for every secret
 * the run used (passwords, base64 `user:password`, docker configs, issued tokens), and every
 * line must be JSON with the fields on-call greps for.
 */
import { spawn } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import t, { type Test } from 'tap'
import { eventually } from '../fixtures/eventually.js'
import { FakeRegistry } from '../fixtures/fake-registry.js'
import { MAIN, buildIfMissing, childEnv } from '../fixtures/main-process.js'
import { freePort } from '../fixtures/net.js'
import { bytes, fetchRaw } from '../fixtures/proxy-harness.js'
import { haveRealRegistry, startRealRegistry } from '../fixtures/real-registry.js'

buildIfMissing()

const SKIP_MSG = 'docker-registry is not installed: the real-registry half of the log secrets test is SKIPPED'
const haveRegistry = haveRealRegistry(t, SKIP_MSG)

const b64 = (text: string): string => Buffer.from(text).toString('base64')
const secret = (what: string): string => `${what}-${randomBytes(6).toString('hex')}`
const dockerConfig = (host: string, username: string, password: string): string =>
  JSON.stringify({ auths: { [host]: { auth: b64(`${username}:${password}`) } } })

/** A module source of the config file, with what it should serve. */
interface Case {
  name: string
  repository: string
  /** Image path under the source's repository, and its manifest digest. */
  path: string
  digest: string
  expect: number
}

/** Runs the binary; resolves once it logged that it listens. */
async function runProxy(
  t: Test,
  args: string[],
): Promise<{ url: string; stop: () => Promise<{ code: number | null; stdout: string; stderr: string }>; hup: () => void; stdout: () => string }> {
  const port = await freePort()
  const child = spawn(process.execPath, [MAIN, `--listen-address=127.0.0.1:${port}`, ...args], {
    cwd: t.testdirName,
    env: childEnv(),
    stdio: ['ignore', 'pipe', 'pipe'],
  })
  let stdout = ''
  let stderr = ''
  child.stdout.on('data', (c: Buffer) => (stdout += c.toString('utf8')))
  child.stderr.on('data', (c: Buffer) => (stderr += c.toString('utf8')))
  const exited = new Promise<number | null>((resolve) => child.once('close', (code) => resolve(code)))
  t.teardown(async () => {
    if (child.exitCode === null) child.kill('SIGKILL')
    await exited
  })
  const deadline = Date.now() + 30_000
  while (!stdout.includes('"msg":"registry-packages-proxy listening"')) {
    if (child.exitCode !== null || Date.now() > deadline) throw new Error(`the proxy did not start:\n${stdout}\n${stderr}`)
    await new Promise((resolve) => setTimeout(resolve, 50))
  }
  return {
    url: `http://127.0.0.1:${port}`,
    hup: () => child.kill('SIGHUP'),
    stdout: () => stdout,
    stop: async () => {
      child.kill('SIGTERM')
      const code = await exited
      return { code, stdout, stderr }
    },
  }
}

void t.test('JSON lines with the request fields, and no secret anywhere in the output', async (t) => {
  const dir = t.testdir()
  const secrets: Array<[string, string]> = []
  const cases: Case[] = []
  const keep = (what: string, value: string): string => {
    secrets.push([what, value])
    return value
  }

  // The fake registry, Basic: the default source (right password) and a module source (wrong one).
  const basicPass = keep('fake Basic password', secret('basic-pw'))
  const fakeBasic = await FakeRegistry.start({ auth: { kind: 'basic', username: 'basic-user', password: basicPass } })
  t.teardown(() => fakeBasic.close())
  const defaultImage = fakeBasic.addImage('deckhouse/ce/pkg', [bytes(8192, 1)])
  const corruptImage = fakeBasic.addImage('deckhouse/ce/corrupt', [bytes(200_000, 2)])
  const basicBad = fakeBasic.addImage('modules/basic-bad/pkg', [bytes(1024, 3)])
  const basicWrong = keep('wrong fake Basic password', secret('basic-wrong'))
  cases.push({ name: 'fake-basic-bad', repository: `${fakeBasic.host}/modules/basic-bad`, path: 'pkg', digest: basicBad.manifestDigest, expect: 502 })

  // The fake registry, Bearer: its token server wants Basic credentials.
  const bearerPass = keep('fake token server password', secret('bearer-pw'))
  const fakeBearer = await FakeRegistry.start({ auth: { kind: 'bearer', username: 'bearer-user', password: bearerPass } })
  t.teardown(() => fakeBearer.close())
  const bearerGood = fakeBearer.addImage('modules/bearer-good/pkg', [bytes(4096, 4)])
  const bearerBad = fakeBearer.addImage('modules/bearer-bad/pkg', [bytes(1024, 5)])
  const bearerWrong = keep('wrong fake token server password', secret('bearer-wrong'))
  cases.push(
    { name: 'fake-bearer-good', repository: `${fakeBearer.host}/modules/bearer-good`, path: 'pkg', digest: bearerGood.manifestDigest, expect: 200 },
    { name: 'fake-bearer-bad', repository: `${fakeBearer.host}/modules/bearer-bad`, path: 'pkg', digest: bearerBad.manifestDigest, expect: 502 },
  )
  const modules: Array<{ name: string; repo: string; scheme: string; dockerCfg: string }> = [
    {
      name: 'fake-basic-bad',
      repo: `${fakeBasic.host}/modules/basic-bad`,
      scheme: 'http',
      dockerCfg: b64(dockerConfig(fakeBasic.host, 'basic-user', basicWrong)),
    },
    {
      name: 'fake-bearer-good',
      repo: `${fakeBearer.host}/modules/bearer-good`,
      scheme: 'http',
      dockerCfg: b64(dockerConfig(fakeBearer.host, 'bearer-user', bearerPass)),
    },
    {
      name: 'fake-bearer-bad',
      repo: `${fakeBearer.host}/modules/bearer-bad`,
      scheme: 'http',
      dockerCfg: b64(dockerConfig(fakeBearer.host, 'bearer-user', bearerWrong)),
    },
  ]

  // The real registry, htpasswd and token modes.
  const reals: Array<{ auth: string; tokenRequests: () => number }> = []
  if (haveRegistry) {
    for (const auth of ['htpasswd', 'token'] as const) {
      const password = keep(`real ${auth} password`, secret(`real-${auth}-pw`))
      const wrong = keep(`wrong real ${auth} password`, secret(`real-${auth}-wrong`))
      const real = await startRealRegistry({ dir: join(dir, `real-${auth}`), auth, username: `real-${auth}-user`, password })
      t.teardown(() => real.stop())
      reals.push({ auth, tokenRequests: () => real.tokenRequests() })
      // Seeds differ per registry: the same bytes would be the same digest in both.
      const seed = auth === 'htpasswd' ? 10 : 20
      const good = await real.push(`modules/real-${auth}-good/pkg`, [bytes(4096, seed)])
      const bad = await real.push(`modules/real-${auth}-bad/pkg`, [bytes(1024, seed + 1)])
      for (const [kind, image, pass, expect] of [
        ['good', good, password, 200],
        ['bad', bad, wrong, 502],
      ] as const) {
        const name = `real-${auth}-${kind}`
        modules.push({ name, repo: `${real.host}/modules/${name}`, scheme: 'http', dockerCfg: b64(dockerConfig(real.host, `real-${auth}-user`, pass)) })
        cases.push({ name, repository: `${real.host}/modules/${name}`, path: 'pkg', digest: image.manifestDigest, expect })
      }
    }
  } else {
    t.comment(`### ${SKIP_MSG}`)
  }

  const defaultConfig = dockerConfig(fakeBasic.host, 'basic-user', basicPass)
  keep('the default docker config', defaultConfig)
  for (const m of modules) keep(`${m.name} dockerCfg`, m.dockerCfg)
  for (const [what, value] of [...secrets]) {
    if (what.includes('password')) {
      const user = what.includes('Basic')
        ? 'basic-user'
        : what.includes('token server')
          ? 'bearer-user'
          : what.includes('htpasswd')
            ? 'real-htpasswd-user'
            : 'real-token-user'
      keep(`base64 user:${what}`, b64(`${user}:${value}`))
    }
  }
  const configPath = join(dir, 'registry.json')
  await writeFile(
    configPath,
    JSON.stringify({ default: { address: fakeBasic.host, path: '/deckhouse/ce', scheme: 'http', dockerConfigJson: defaultConfig }, moduleSources: modules }),
  )

  const proxy = await runProxy(t, [`--cache-directory=${join(dir, 'cache')}`, `--registry-config=${configPath}`, '--log-level=debug'])
  const get = (path: string, method = 'GET'): ReturnType<typeof fetchRaw> => fetchRaw(`${proxy.url}${path}`, { method })
  const pkg = (q: Record<string, string>): string => `/package?${new URLSearchParams(q).toString()}`

  /** A fill commits after its response ended: wait for it, so the next request is a hit. */
  const cached = (digest: string): Promise<void> =>
    eventually(async () => (await get(`/cache/${digest}`)).status === 200, `${digest} is cached`, { intervalMs: 50 })
  // The default source: miss, hit, HEAD.
  const defaultQuery = pkg({ digest: defaultImage.manifestDigest, path: 'pkg' })
  t.equal((await get(defaultQuery)).status, 200, 'default source: a miss')
  await cached(defaultImage.manifestDigest)
  t.equal((await get(defaultQuery)).status, 200, 'default source: a hit')
  t.equal((await get(defaultQuery, 'HEAD')).status, 200, 'default source: HEAD')
  // Every module source, twice (a hit for the good ones).
  for (const c of cases) {
    const query = pkg({ digest: c.digest, repository: c.repository, path: c.path })
    t.equal((await get(query)).status, c.expect, `${c.name}: ${c.expect}`)
    if (c.expect === 200) await cached(c.digest)
    t.equal((await get(query)).status, c.expect, `${c.name}: ${c.expect} again`)
  }
  // Errors: a digest the registry does not have, a repository no source names, a bad request.
  t.equal((await get(pkg({ digest: `sha256:${'0'.repeat(64)}`, path: 'pkg' }))).status, 404)
  t.equal((await get(pkg({ digest: defaultImage.manifestDigest, repository: 'registry.example.com/nothing' }))).status, 404)
  t.equal((await get('/package?digest=sha256:nothex')).status, 400)
  // A layer that fails verification after the headers went out.
  fakeBasic.faults = { corruptBlob: true }
  const cut = await get(pkg({ digest: corruptImage.manifestDigest, path: 'corrupt' }))
  fakeBasic.faults = {}
  t.notOk(cut.complete, 'the corrupt layer was cut before its last byte')
  for (const path of ['/healthz', '/readyz', '/metrics', '/cache']) t.equal((await get(path)).status, 200, path)
  // A reload re-reads the credentials.
  proxy.hup()
  const deadline = Date.now() + 10_000
  while (!/SIGHUP/.test(proxy.stdout()) && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 50))
  const { code, stdout, stderr } = await proxy.stop()
  t.equal(code, 0, 'SIGTERM: exit 0')

  // The secrets were really used, so finding none means something.
  const auths = (r: FakeRegistry): string[] => r.requests.map((q) => q.headers.authorization).filter((h): h is string => typeof h === 'string')
  t.ok(auths(fakeBasic).includes(`Basic ${b64(`basic-user:${basicPass}`)}`), 'the fake Basic registry got the password')
  t.ok(auths(fakeBasic).includes(`Basic ${b64(`basic-user:${basicWrong}`)}`), 'and the wrong one')
  const issued = [
    ...new Set(
      auths(fakeBearer)
        .filter((h) => h.startsWith('Bearer '))
        .map((h) => h.slice('Bearer '.length)),
    ),
  ]
  t.ok(issued.length > 0, `the fake token server issued ${issued.length} tokens`)
  for (const token of issued) keep('a token the fake token server issued', token)
  for (const real of reals.filter((r) => r.auth === 'token')) t.ok(real.tokenRequests() > 0, 'the real token server was asked for tokens')

  const everything = `${stdout}\n${stderr}`
  for (const [what, value] of secrets) t.notOk(everything.includes(value), `${what} appears nowhere`)
  t.notMatch(everything, /eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}/, 'no JWT (the real token server issues JWTs)')
  t.notMatch(everything, /Basic [A-Za-z0-9+/=]{8,}|Bearer [A-Za-z0-9._~+/=-]{8,}/i, 'no Authorization value')
  t.equal(stderr, '', 'nothing on stderr')

  const lines = stdout.split('\n').filter((l) => l !== '')
  const parsed: Array<Record<string, unknown>> = []
  for (const line of lines) {
    let value: unknown
    try {
      value = JSON.parse(line)
    } catch {
      t.fail(`a line that is not JSON: ${line}`)
      continue
    }
    parsed.push(value as Record<string, unknown>)
  }
  t.ok(parsed.length > 20, `${parsed.length} lines`)
  const malformed = parsed.filter((l) => typeof l.level !== 'number' || typeof l.time !== 'number' || typeof l.msg !== 'string')
  t.same(malformed, [], 'every line has level, time and msg')
  t.ok(
    parsed.some((l) => l.level === 20),
    'debug lines are there at --log-level=debug',
  )

  const requests = parsed.filter((l) => l.msg === 'request' && l.path === '/package')
  t.equal(requests.length, 3 + cases.length * 2 + 4, 'one line per package request')
  const reqIds = requests.map((l) => l.req)
  t.equal(new Set(reqIds).size, reqIds.length, 'request ids are unique')
  const corrupt = requests.find((l) => l.digest === corruptImage.manifestDigest)
  for (const l of requests.filter((x) => x !== corrupt)) {
    const where = `request ${String(l.req)} ${String(l.status)}`
    t.type(l.req, 'string', `${where}: req`)
    t.type(l.status, 'number', `${where}: status`)
    t.type(l.ms, 'number', `${where}: ms`)
    t.type(l.bytes, 'number', `${where}: bytes`)
    if (l.status !== 400) {
      t.match(l.digest, /^sha256:[0-9a-f]{64}$/, `${where}: digest`)
      t.type(l.result, 'string', `${where}: result`)
    }
  }
  for (const c of cases) {
    const mine = requests.filter((l) => l.digest === c.digest)
    t.equal(mine.length, 2, `${c.name}: two lines, found by digest`)
    for (const l of mine) {
      t.equal(l.repository, c.repository, `${c.name}: repository`)
      t.equal(l.status, c.expect, `${c.name}: status`)
      if (c.expect === 502) t.match(l.err, { code: 'EUPSTREAM' }, `${c.name}: err says the registry refused`)
    }
    if (c.expect === 200)
      t.same(
        mine.map((l) => l.result),
        ['miss', 'hit'],
        `${c.name}: miss, then hit`,
      )
  }
  const defaults = requests.filter((l) => l.digest === defaultImage.manifestDigest && l.repository === undefined)
  t.same(
    defaults.map((l) => l.result),
    ['miss', 'hit', 'head'],
  )
  t.same(
    defaults.slice(0, 2).map((l) => l.bytes),
    [8192, 8192],
    'bytes of each complete response',
  )
  t.match(corrupt, { req: String, result: 'miss', err: { code: 'EDIGEST' } }, 'the mid-stream mismatch is logged with its code')
  t.equal(corrupt?.aborted, true, 'the cut response is marked aborted')
  t.equal(corrupt?.status, 500, 'and counted as the failure it was')
  t.type(corrupt?.ms, 'number', 'with its duration')
  t.ok(
    parsed.some((l) => l.msg === 'request' && l.path === '/healthz' && l.level === 20),
    'probes are logged at debug',
  )
})

/**
 * The shipped binary (`node dist/main.js`) with `--kubeconfig`: start-up errors, readiness
 * waiting for the API server, SIGHUP re-reading `--registry-config`, and a clean SIGTERM with
 * watches open. Everything runs on 127.0.0.1.
 */
import { spawn, type ChildProcess } from 'node:child_process'
import { writeFileSync } from 'node:fs'
import { request } from 'node:http'
import { join } from 'node:path'
import t, { type Test } from 'tap'
import { FakeKubeApi, b64, moduleSource, registrySecret } from '../fixtures/fake-kube-api.js'
import { eventually } from '../fixtures/eventually.js'
import { FakeRegistry } from '../fixtures/fake-registry.js'
import { MAIN, buildIfMissing, childEnv } from '../fixtures/main-process.js'
import { freePort } from '../fixtures/net.js'

const TOKEN = 'proc-token-0c7d'
const PASSWORD = 'proc-pass-a41e'

buildIfMissing()

interface Proc {
  child: ChildProcess
  out: () => string
  err: () => string
  exited: Promise<number | null>
}

function spawnMain(t: Test, args: string[]): Proc {
  const child = spawn(process.execPath, [MAIN, ...args], { cwd: t.testdirName, env: childEnv(), stdio: ['ignore', 'pipe', 'pipe'] })
  let out = ''
  let err = ''
  child.stdout?.on('data', (c: Buffer) => (out += c.toString('utf8')))
  child.stderr?.on('data', (c: Buffer) => (err += c.toString('utf8')))
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => setImmediate(() => resolve(code))))
  t.teardown(async () => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL')
    await exited
  })
  return { child, out: () => out, err: () => err, exited }
}

function get(url: string): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = request(url, { agent: false }, (res) => {
      let body = ''
      res.on('data', (c: Buffer) => (body += c.toString('utf8')))
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body }))
    })
    req.on('error', reject)
    req.end()
  })
}

function logLines(text: string): Array<Record<string, unknown>> {
  return text
    .split('\n')
    .filter((l) => l.startsWith('{'))
    .map((l) => JSON.parse(l) as Record<string, unknown>)
}

void t.test('a bad --kubeconfig: one line naming it on stderr, exit code 2', async (t) => {
  const dir = t.testdir({ 'kc.yaml': `clusters: [{{ token: ${TOKEN}`, cache: {} })
  const p = spawnMain(t, [`--kubeconfig=${join(dir, 'kc.yaml')}`, `--cache-directory=${join(dir, 'cache')}`, '--listen-address=127.0.0.1:1'])
  t.equal(await p.exited, 2)
  const lines = p
    .err()
    .split('\n')
    .filter((l) => l !== '')
  t.equal(lines.length, 1, p.err())
  t.match(lines[0], /--kubeconfig .*kc\.yaml: not a valid kubeconfig/)
  t.notMatch(p.err() + p.out(), TOKEN)
})

void t.test('the binary: unready until the API server answers, SIGHUP reloads the file, SIGTERM exits 0', async (t) => {
  const dir = t.testdir({ cache: {} })
  const registry = await FakeRegistry.start({ auth: { kind: 'basic', username: 'u', password: PASSWORD } })
  t.teardown(() => registry.close())
  const image = registry.addImage('from-file/pkg', [Buffer.from('payload from the file source')])
  const auth = JSON.stringify({ auths: { [registry.host]: { auth: b64(`u:${PASSWORD}`) } } })

  const api = FakeKubeApi.create(await freePort())
  t.teardown(() => api.close())
  api.putSecret(registrySecret({ address: registry.host, path: 'deckhouse/ce', scheme: 'http', dockerconfigjson: auth }))
  api.putModuleSource(moduleSource('kube', { repo: `${registry.host}/kube`, scheme: 'http', dockerCfg: b64(auth) }))
  const configPath = join(dir, 'registry.json')
  writeFileSync(configPath, JSON.stringify({ moduleSources: [] }))
  const port = await freePort()
  const url = `http://127.0.0.1:${port}`
  const p = spawnMain(t, [
    `--listen-address=127.0.0.1:${port}`,
    `--cache-directory=${join(dir, 'cache')}`,
    `--kubeconfig=${api.writeKubeconfig(dir, TOKEN)}`,
    `--registry-config=${configPath}`,
    '--log-level=debug',
  ])
  await eventually(() => p.out().includes('registry-packages-proxy listening') || p.child.exitCode !== null, 'listening', { timeoutMs: 30_000 })
  t.equal(p.child.exitCode, null, `the proxy runs: ${p.out()}${p.err()}`)
  const before = await get(`${url}/readyz`)
  t.equal(before.status, 503, 'not ready: the API server is not up')
  t.match(before.body, /not synced yet: .*secret/)

  await api.listen()
  await eventually(async () => (await get(`${url}/readyz`)).status === 200, 'ready', { timeoutMs: 30_000 })

  // A new module source in the file; SIGHUP makes the proxy re-read it at once.
  writeFileSync(configPath, JSON.stringify({ moduleSources: [{ name: 'f', repo: `${registry.host}/from-file`, scheme: 'http', dockerCfg: b64(auth) }] }))
  p.child.kill('SIGHUP')
  await eventually(() => logLines(p.out()).some((l) => l.reason === 'SIGHUP'), 'the SIGHUP reload logged', { timeoutMs: 30_000 })
  t.equal(p.child.exitCode, null, 'SIGHUP does not stop the process')
  const pkg = await get(`${url}/package?digest=${image.manifestDigest}&repository=${encodeURIComponent(`${registry.host}/from-file`)}&path=pkg`)
  t.equal(pkg.status, 200, 'the reloaded file source serves')
  t.equal(pkg.body, 'payload from the file source')
  t.equal((await get(`${url}/readyz`)).status, 200)

  p.child.kill('SIGTERM')
  t.equal(await p.exited, 0, 'SIGTERM with watches open: exit 0')
  for (const secret of [TOKEN, PASSWORD, b64(`u:${PASSWORD}`)]) t.notOk((p.out() + p.err()).includes(secret), 'no credential in the output')
  t.ok(api.requests.every((r) => r.headers.authorization === `Bearer ${TOKEN}`))
})

/**
 * The container image, without a Docker engine. The Dockerfile's shape is checked (multi-stage,
 * slim Node 20 runtime, production dependencies only, non-root, /cache); then its runtime file
 * set is assembled in a temp folder the way its COPY lines build it, and the ENTRYPOINT runs
 * there with the image's ENV and the Deployment's args, as the image's user (when the test runs
 * as root) over an app folder it cannot write: it must serve /healthz and /readyz, answer the
 * on-call CLI, write nothing outside the cache volume and stop cleanly on SIGTERM.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process'
import { chmodSync, chownSync, existsSync, lstatSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, writeFileSync } from 'node:fs'
import { request } from 'node:http'
import { tmpdir } from 'node:os'
import { join, posix, relative } from 'node:path'
import t from 'tap'
import { eventually } from '../fixtures/eventually.js'
import { freePort } from '../fixtures/net.js'
import { env, execForm, last, parseDockerfile, runs } from '../fixtures/infra/dockerfile.js'
import { assembleRuntime, checkRuntimeImports } from '../fixtures/infra/image.js'
import { pathMatch } from '../fixtures/infra/kube-rbac-proxy.js'
import { container, loadManifests, PROXY_CONTAINER, ROOT } from '../fixtures/infra/manifests.js'

const stages = parseDockerfile(readFileSync(join(ROOT, 'Dockerfile'), 'utf8'))
const runtime = stages.at(-1)
if (!runtime) throw new Error('the Dockerfile has no stage')

function get(url: string): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = request(url, { agent: false, timeout: 10_000 }, (res) => {
      let body = ''
      res.on('data', (c: Buffer) => (body += c.toString('utf8')))
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body }))
    })
    req.on('error', reject)
    req.end()
  })
}

/**
 * `env -i` with exactly `vars`, then the command: the child sees the image's environment only.
 * It also drops the NODE_OPTIONS that tap adds to every child it spawns (its process-info
 * loader, which would write into .tap/ at exit and is no part of the image).
 */
function inImageEnv(vars: NodeJS.ProcessEnv, command: string, args: readonly string[]): [string, string[]] {
  const assignments = Object.entries(vars).flatMap(([k, v]) => (v === undefined ? [] : [`${k}=${v}`]))
  return ['env', ['-i', ...assignments, command, ...args]]
}

/** Every path under `dir`, depth first, without following symlinks. */
function walk(dir: string): string[] {
  const out: string[] = []
  for (const name of readdirSync(dir)) {
    const path = join(dir, name)
    out.push(path)
    if (lstatSync(path).isDirectory()) out.push(...walk(path))
  }
  return out
}

void t.test('the Dockerfile: multi-stage, slim Node 20 runtime with production dependencies, non-root, /cache', (t) => {
  t.ok(stages.length >= 2, 'a build stage and a runtime stage')
  t.match(runtime.base, /^node:20[\w.-]*-slim$/, 'runtime on a slim Node 20 base')
  const build = stages.find((s) => s.name !== undefined && s !== runtime)
  t.match(build?.base, /^node:20\b/, 'built with the same Node major')
  const buildRuns = build ? runs(build).join('\n') : ''
  t.match(buildRuns, /npm_config_build_from_source=true[^\n]*npm ci/, 'sqlite3 is compiled in the build stage')
  t.match(buildRuns, /libsqlite3-dev/, 'against Debian libsqlite3')
  t.match(buildRuns, /npm prune --omit=dev/, 'dev dependencies are pruned before the copy')
  t.notMatch(runs(runtime).join('\n'), /\bnpm\b|\bnpx\b/, 'the runtime stage installs nothing with npm')
  t.match(runs(runtime).join('\n'), /libsqlite3-0/, 'the runtime has the shared SQLite the build linked')
  const user = last(runtime, 'USER')?.args ?? ''
  t.match(user, /^[1-9]\d*(:\d+)?$/, 'a numeric non-root USER (the kubelet can check runAsNonRoot)')
  const entrypoint = execForm(last(runtime, 'ENTRYPOINT')?.args ?? '')
  t.same(entrypoint?.slice(0, 1), ['node'], 'exec-form ENTRYPOINT running the binary with node')
  t.equal(env(runtime).RPP_CACHE_DIRECTORY, '/cache')
  t.match(last(runtime, 'VOLUME')?.args, /\/cache/)
  t.match(runs(runtime).join('\n'), /chown 65534:65534 \/cache/, '/cache belongs to the image user (an anonymous volume inherits it)')
  const ignored = readFileSync(join(ROOT, '.dockerignore'), 'utf8')
    .split('\n')
    .map((l) => l.trim())
  for (const p of ['node_modules', 'dist', '.git', 'cache']) t.ok(ignored.includes(p), `.dockerignore keeps ${p} out of the build context`)
  t.end()
})

void t.test('the runtime file set, assembled as the Dockerfile copies it', async (t) => {
  const started = Date.now()
  // Under the system temp folder, not t.testdir(): the image user must be able to reach it.
  const root = mkdtempSync(join(tmpdir(), 'rpp-image-'))
  chmodSync(root, 0o755)
  const asRoot = process.getuid?.() === 0
  t.teardown(() => {
    if (!asRoot) spawnSync('chmod', ['-R', 'u+w', root])
    spawnSync('rm', ['-rf', root])
  })
  // Hard links save copying 80 MB, but only as root: otherwise the app folder is made
  // read-only below, which would change the repository's own files through the links.
  const log = await assembleRuntime(stages, root, { link: asRoot })
  t.comment(`assembled in ${Date.now() - started} ms: ${log.join('; ')}`)

  const appDir = join(root, last(runtime, 'WORKDIR')?.args ?? '/app')
  const entrypoint = execForm(last(runtime, 'ENTRYPOINT')?.args ?? '') ?? []
  const script = join(root, entrypoint[1] ?? '')
  t.ok(existsSync(script), `the ENTRYPOINT script ${entrypoint[1]} is in the image`)

  await t.test('.dockerignore keeps every source the build stage compiles in the context', (t) => {
    const patterns = readFileSync(join(ROOT, '.dockerignore'), 'utf8')
      .split('\n')
      .map((l) => l.trim())
      .filter((l) => l !== '' && !l.startsWith('#'))
    t.notOk(
      patterns.some((p) => p.startsWith('!')),
      'no exceptions (this check reads plain patterns only)',
    )
    const tsconfig = /tsc -p (\S+)/.exec(stages.flatMap(runs).join('\n'))?.[1] ?? ''
    // What the build reads: the package files, the tsconfig chain, the sources of each compiled
    // top-level entry (main.js <- main.ts, plugins/ <- plugins/).
    const sources = readdirSync(join(appDir, 'dist')).map((f) => f.replace(/\.js$/, '.ts'))
    const needed = ['package.json', 'package-lock.json', tsconfig, 'tsconfig.json', ...sources]
    for (const path of needed) {
      const hit = patterns.find(
        (p) => pathMatch(p, path) || pathMatch(p, path.split('/')[0] ?? '') || (p.startsWith('**/') && pathMatch(p.slice(3), posix.basename(path))),
      )
      t.equal(hit, undefined, `${path} reaches the build`)
    }
    t.end()
  })

  await t.test('every runtime import is a production dependency installed in the image', (t) => {
    const result = checkRuntimeImports(script, join(appDir, 'package.json'), join(appDir, 'node_modules'))
    t.same(result.problems, [])
    t.comment(`${result.files} modules; packages imported: ${result.packages.join(', ')}`)
    t.ok(result.packages.includes('@hapi/hapi') && result.packages.includes('@kubernetes/client-node'), 'the graph reaches the server and the informers')
    t.notOk(existsSync(join(appDir, 'node_modules', 'typescript')), 'no dev dependency (typescript) in the image')
    t.notOk(existsSync(join(appDir, 'node_modules', 'tap')), 'no dev dependency (tap) in the image')
    // The check itself would notice a dev-only import.
    const fake = t.testdir({ 'main.js': "import t from 'tap'\nimport { x } from './lib.js'\n", 'lib.js': "export const x = await import('yaml')\n" })
    t.match(checkRuntimeImports(join(fake, 'main.js'), join(ROOT, 'package.json'), join(ROOT, 'node_modules')).problems, [
      /imports tap: tap is not in package.json dependencies/,
      /imports yaml: yaml is not in package.json dependencies/,
    ])
    t.end()
  })

  await t.test('the ENTRYPOINT starts with the image ENV and the Deployment args, read-only, and serves', async (t) => {
    const [uid = 65534, gid = uid] = (last(runtime, 'USER')?.args ?? '').split(':').map(Number)
    // The image's /cache (mkdir + chown in the runtime stage), and a config with a default
    // source: /readyz needs one, and the image's own default (in-cluster) needs Kubernetes.
    const imageEnv = env(runtime)
    const cacheDir = join(root, imageEnv.RPP_CACHE_DIRECTORY ?? '/cache')
    mkdirSync(cacheDir, { recursive: true })
    const configDir = join(root, 'config')
    mkdirSync(configDir)
    writeFileSync(join(configDir, 'registry.json'), JSON.stringify({ default: { address: '127.0.0.1:5000', path: '/deckhouse/ce', scheme: 'http' } }))
    if (asRoot) chownSync(cacheDir, uid, gid)
    else spawnSync('chmod', ['-R', 'a-w', appDir, configDir])

    // The Deployment's args, on a free port, without --cache-directory so the image ENV decides.
    const port = await freePort()
    const deploymentArgs = container(loadManifests(), PROXY_CONTAINER).args ?? []
    const bootstrapPort = await freePort()
    // The kubelet expands $(VAR) from the container's env; here: loopback and a sample UUID.
    const expand = (a: string): string => a.replace('$(POD_IP):4282', `127.0.0.1:${bootstrapPort}`).replace('$(CLUSTER_UUID)', 'sample-cluster-uuid')
    const args = [
      ...deploymentArgs
        .filter((a) => !a.startsWith('--cache-directory='))
        .map((a) => (a.startsWith('--listen-address=') ? `--listen-address=127.0.0.1:${port}` : expand(a))),
      `--registry-config=${join(configDir, 'registry.json')}`,
    ]
    const childEnv: NodeJS.ProcessEnv = {
      PATH: process.env.PATH,
      ...imageEnv,
      RPP_CACHE_DIRECTORY: cacheDir,
      // As in the image: no home, and a temp folder that does not exist, so a stray temp file
      // fails instead of landing somewhere this test cannot see.
      HOME: '/nonexistent',
      TMPDIR: join(root, 'no-such-tmp'),
    }
    const spawnAs = asRoot ? { uid, gid } : {}
    const child: ChildProcess = spawn(...inImageEnv(childEnv, process.execPath, [script, ...args]), {
      cwd: appDir,
      stdio: ['ignore', 'pipe', 'pipe'],
      ...spawnAs,
    })
    let output = ''
    child.stdout?.on('data', (c: Buffer) => (output += c.toString('utf8')))
    child.stderr?.on('data', (c: Buffer) => (output += c.toString('utf8')))
    const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)))
    t.teardown(async () => {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL')
      await exited
    })

    const base = `http://127.0.0.1:${port}`
    const startAt = Date.now()
    await eventually(
      async () => {
        if (child.exitCode !== null) throw new Error(`the binary exited with ${child.exitCode}:\n${output}`)
        return (await get(`${base}/readyz`).catch(() => ({ status: 0 }))).status === 200
      },
      '/readyz answers 200',
      { timeoutMs: 60_000 },
    )
    t.comment(`ready ${Date.now() - startAt} ms after spawn, running as ${asRoot ? `uid ${uid}` : 'the current user over a read-only app folder'}`)
    const health = await get(`${base}/healthz`)
    t.equal(health.status, 200)
    t.equal(health.body, 'ok')
    const metrics = await get(`${base}/metrics`)
    t.equal(metrics.status, 200)
    t.match(metrics.body, /^registry_packages_proxy_cache_size /m)
    const rss = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${child.pid}/status`, 'utf8'))?.[1]
    t.comment(`resident memory after start: ${rss ? Math.round(Number(rss) / 1024) : '?'} MiB`)

    // The on-call CLI works from the image too (kubectl exec … registry-packages-proxy cache ls).
    const cli = spawnSync(...inImageEnv(childEnv, process.execPath, [script, 'cache', 'ls', '--url', base, '--json']), {
      cwd: appDir,
      encoding: 'utf8',
      ...spawnAs,
    })
    t.equal(cli.status, 0, 'cache ls exits 0')
    t.equal(cli.stderr, '')
    t.match(JSON.parse(cli.stdout) as unknown, { entries: 0 })

    child.kill('SIGTERM')
    t.equal(await exited, 0, 'SIGTERM: exit 0')
    t.ok(existsSync(join(cacheDir, 'index.sqlite')), 'the index is in the cache volume: the image ENV chose the cache directory')

    // Nothing written outside the cache volume.
    const outside = walk(root).filter((p) => p !== cacheDir && !p.startsWith(cacheDir + '/'))
    if (asRoot) {
      t.same(
        outside.filter((p) => lstatSync(p).uid === uid).map((p) => relative(root, p)),
        [],
        'no file outside /cache belongs to the image user',
      )
      const stray = spawnSync(
        'find',
        [tmpdir(), '-xdev', '-user', String(uid), '-newermt', `@${Math.floor(started / 1000) - 1}`, '-not', '-path', `${cacheDir}*`],
        { encoding: 'utf8' },
      )
      t.equal(stray.stdout.trim(), '', `no file in ${tmpdir()} belongs to the image user`)
    } else {
      t.same(
        outside.filter((p) => lstatSync(p).mtimeMs > startAt && !p.startsWith(configDir)).map((p) => relative(root, p)),
        [],
        'no file outside /cache changed',
      )
    }
    t.ok(readdirSync(cacheDir).length > 0, `the cache volume holds ${readdirSync(cacheDir).join(', ')}`)
  })
})

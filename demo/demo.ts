/**
 * `npm run demo`: the proxy's main job on embedded defaults, with nothing else installed.
 *
 * Starts a small sample OCI registry on loopback (the same fake registry the tests use),
 * seeds it with real tar.gz packages, starts the real binary (`dist/main.js`) against it with
 * its real SQLite index and blob cache, fetches one package twice (a miss, then a hit) and
 * keeps serving, printing curl commands to try. `--once` stops after the two fetches.
 */
import { spawn } from 'node:child_process'
import { createCipheriv, createHash } from 'node:crypto'
import { mkdirSync, writeFileSync } from 'node:fs'
import { request } from 'node:http'
import { join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'
import { FakeRegistry } from '../tools/sample-registry.js'
import { makePackageTarGz } from '../tools/tarball.js'

const once = process.argv.includes('--once')
const listen = process.env.RPP_LISTEN_ADDRESS ?? '127.0.0.1:5080'
// The rpp-get listener sits two ports above the main one unless told otherwise.
const bootstrapListen = process.env.RPP_BOOTSTRAP_LISTEN_ADDRESS ?? listen.replace(/:(\d+)$/, (_, port: string) => `:${Number(port) + 2}`)
const clusterUuid = 'demo-cluster-uuid'
const root = resolve(fileURLToPath(import.meta.url), '../../..')
const workDir = join(process.cwd(), '.demo')

/** Incompressible but reproducible bytes (an AES-CTR keystream under a fixed key). */
function pseudoRandom(size: number): Buffer {
  return createCipheriv('aes-128-ctr', Buffer.alloc(16, 1), Buffer.alloc(16, 0)).update(Buffer.alloc(size))
}

function installScript(name: string): string {
  return `#!/bin/sh\nset -e\necho "installing ${name}"\nmkdir -p "\${PREFIX:-/opt/deckhouse}/bin"\ncp ${name} "\${PREFIX:-/opt/deckhouse}/bin/"\n`
}

function get(url: string): Promise<{ status: number; headers: Record<string, string | string[] | undefined>; body: Buffer; ms: number }> {
  const started = Date.now()
  return new Promise((resolvePromise, reject) => {
    request(url, (res) => {
      const chunks: Buffer[] = []
      res.on('data', (c: Buffer) => chunks.push(c))
      res.on('end', () => resolvePromise({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks), ms: Date.now() - started }))
      res.on('error', reject)
    })
      .on('error', reject)
      .end()
  })
}

async function waitReady(base: string, child: ReturnType<typeof spawn>): Promise<void> {
  for (let i = 0; i < 200; i++) {
    if (child.exitCode !== null) throw new Error(`the proxy exited with code ${child.exitCode}`)
    try {
      if ((await get(`${base}/readyz`)).status === 200) return
    } catch {
      // not listening yet
    }
    await new Promise((r) => setTimeout(r, 100))
  }
  throw new Error('the proxy did not become ready in 20 s')
}

async function main(): Promise<void> {
  mkdirSync(workDir, { recursive: true })
  const registry = await FakeRegistry.start()
  // Deterministic tarballs: the same digests every run, so a second demo run is all hits.
  const hello = makePackageTarGz({ install: installScript('hello'), hello: '#!/bin/sh\necho hello from a registry package\n', 'README.md': '# hello\n' })
  const big = makePackageTarGz({ install: installScript('blob.bin'), 'blob.bin': pseudoRandom(8 * 1024 * 1024) })
  const base = registry.addImage('deckhouse/ce/packages/hello', [Buffer.from('base layer'), hello])
  const bigImage = registry.addImage('deckhouse/ce/packages/big', [big])
  // A Deckhouse CLI build (/v1/images/), a package with an icon (/v1/packages/) and an image
  // whose last layer carries rpp-get (the bootstrap listener).
  const cli = registry.addImage('deckhouse/ce/deckhouse-cli', [makePackageTarGz({ 'bin/d8': '#!/bin/sh\necho d8 v0.20.0\n' })])
  registry.tag('deckhouse/ce/deckhouse-cli', 'v0.20.0', cli.manifestDigest)
  const icon = '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16"><circle cx="8" cy="8" r="7" fill="teal"/></svg>\n'
  const iconImage = registry.addImage('demo-packages/hello/version', [makePackageTarGz({ 'docs/icon.svg': icon, 'README.md': '# hello\n' })])
  registry.tag('demo-packages/hello/version', 'v1.0.0', iconImage.manifestDigest)
  const rppGet = registry.addImage('deckhouse/ce', [makePackageTarGz({ 'rpp-get': '#!/bin/sh\necho rpp-get\n' })])
  const moduleImage = registry.addImage('modules/example/packages/tool', [makePackageTarGz({ install: installScript('tool'), tool: 'tool\n' })], {
    mediaType: 'docker',
  })

  const configPath = join(workDir, 'registry-config.json')
  writeFileSync(
    configPath,
    JSON.stringify(
      {
        default: { address: registry.host, path: '/deckhouse/ce', scheme: 'http' },
        moduleSources: [{ name: 'example', repo: `${registry.host}/modules/example`, scheme: 'http' }],
        packageRepositories: [{ name: 'demo', repo: `${registry.host}/demo-packages`, scheme: 'http' }],
      },
      null,
      2,
    ),
  )

  const child = spawn(
    process.execPath,
    [
      join(root, 'dist/main.js'),
      `--registry-config=${configPath}`,
      `--listen-address=${listen}`,
      `--bootstrap-listen-address=${bootstrapListen}`,
      `--cluster-uuid=${clusterUuid}`,
    ],
    {
      stdio: ['ignore', 'inherit', 'inherit'],
      env: process.env,
    },
  )
  const proxy = `http://${listen}`
  let closing = false
  const shutdown = async (code: number): Promise<void> => {
    if (closing) return
    closing = true
    child.kill('SIGTERM')
    await new Promise((r) => (child.exitCode !== null ? r(undefined) : child.once('exit', r)))
    await registry.close()
    process.exit(code)
  }
  process.on('SIGINT', () => void shutdown(0))
  process.on('SIGTERM', () => void shutdown(0))
  await waitReady(proxy, child)

  const url = `${proxy}/package?digest=${base.manifestDigest}&path=packages/hello`
  console.log(`\n== sample registry on ${registry.url}; proxy on ${proxy}; cache in ./cache ==`)
  for (const attempt of ['first', 'second']) {
    const before = registry.counts.blob
    const res = await get(url)
    const sha = `sha256:${createHash('sha256').update(res.body).digest('hex')}`
    const ok = res.status === 200 && sha === base.lastLayer.digest
    console.log(
      `${attempt} fetch: HTTP ${res.status}, X-Cache ${String(res.headers['x-cache'])}, ${res.body.length} bytes in ${res.ms} ms, ` +
        `layer digest ${ok ? 'verified' : 'WRONG'}, registry blob downloads: ${registry.counts.blob - before}`,
    )
    if (!ok) return shutdown(1)
    // Let the fill commit its index row before asking again.
    await new Promise((r) => setTimeout(r, 200))
  }
  const cliUrl = `${proxy}/v1/images/deckhouse-cli/images/v0.20.0`
  const iconUrl = `${proxy}/v1/packages/demo/hello/metadata/icon`
  const rppGetUrl = `http://${bootstrapListen}/${clusterUuid}/rpp-get?digest=${rppGet.manifestDigest}`
  for (const [what, target, expected] of [
    ['cli download', cliUrl, cli.lastLayer.data],
    ['package icon', iconUrl, Buffer.from(icon)],
    ['rpp-get', rppGetUrl, Buffer.from('#!/bin/sh\necho rpp-get\n')],
  ] as const) {
    const res = await get(target)
    const ok = res.status === 200 && res.body.equals(expected)
    console.log(`${what}: HTTP ${res.status}, ${res.body.length} bytes, ${ok ? 'as seeded' : 'WRONG'}`)
    if (!ok) return shutdown(1)
  }
  console.log(`
Try it (the proxy keeps serving until Ctrl-C):
  curl -sS '${proxy}/v1/images/deckhouse-cli/tags'                       # the CLI's tags
  curl -sS -o d8.tar.gz -D - '${cliUrl}'   # a CLI build
  curl -sS -D - '${iconUrl}'                  # a package icon (SVG, with a CSP)
  curl -sS -o rpp-get -D - '${rppGetUrl}'     # the bootstrap listener
  curl -sS -o hello.tar.gz -D - '${url}'
  curl -sS -o big.tar.gz -w '%{http_code} %{size_download} bytes\\n' '${proxy}/package?digest=${bigImage.manifestDigest}&path=packages/big'
  curl -sS -o tool.tar.gz -D - '${proxy}/package?digest=${moduleImage.manifestDigest}&repository=${registry.host}/modules/example&path=packages/tool'
  curl -sS -I '${url}'                                   # HEAD: headers only
  curl -sS -H 'Range: bytes=0-99' -o part.bin -D - '${url}'  # one range: 206
  curl -sS '${proxy}/package?digest=sha256:nothex'          # 400, JSON body
  curl -sS '${proxy}/metrics' | grep ^registry_packages_proxy_
  curl -sS '${proxy}/readyz'
`)
  if (once) await shutdown(0)
}

main().catch((err: unknown) => {
  console.error(`demo failed: ${(err as Error).message}`)
  process.exit(1)
})

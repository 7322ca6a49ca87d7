/**
 * Where a cache hit's time goes: runs the proxy under `node --cpu-prof`, drives cache hits of
 * one package size with wrk (the benchmark's `-t1 -c32`; the proxy at `--log-level info`), stops the proxy cleanly so V8 writes
 * its profile, and summarizes self and inclusive time by function and by package.
 *
 *   npm run build && node dist/bench/profile.js [--size 64k|4m|32m] [--seconds 10]
 *
 * Prints the summary and writes it to `bench/results/profile-<size>.md`; the raw `.cpuprofile`
 * is kept in the printed scratch directory (open it in Chrome DevTools).
 */
import { chmodSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, writeFileSync } from 'node:fs'
import { loadavg, tmpdir } from 'node:os'
import { join } from 'node:path'
import { FakeRegistry } from '../tools/sample-registry.js'
import { freePort } from '../tools/net.js'
import { Children, fetchHashed, fmt, KiB, MiB, pseudoRandom, ROOT, runWrk, startProxy, textOption, waitForHit } from './lib.js'

interface CallFrame {
  functionName: string
  url: string
  lineNumber: number
}
interface ProfileNode {
  id: number
  callFrame: CallFrame
  children?: number[]
}
interface CpuProfile {
  nodes: ProfileNode[]
  samples: number[]
  timeDeltas: number[]
  startTime: number
  endTime: number
}

/** `fn file:line`, with paths shortened to the package or project file. */
function keyOf(frame: CallFrame): string {
  const name = frame.functionName || '(anonymous)'
  if (frame.url === '') return name
  const url = frame.url
    .replace(/^file:\/\//, '')
    .replace(/^.*\/node_modules\//, '')
    .replace(`${ROOT}/dist/`, '')
  return `${name} ${url}:${frame.lineNumber + 1}`
}

/** Which part of the stack a frame belongs to. */
function categoryOf(frame: CallFrame): string {
  const url = frame.url
  if (url === '') {
    if (/^\((program|garbage collector|idle|root)\)$/.test(frame.functionName)) return frame.functionName
    return 'native (V8 builtins, C++ bindings)'
  }
  if (url.startsWith('node:')) return 'Node.js core (JS)'
  const pkg = /\/node_modules\/((?:@[^/]+\/)?[^/]+)\//.exec(url)?.[1]
  if (pkg) return pkg
  if (url.includes(`${ROOT}/dist/`)) return 'proxy code (dist/)'
  return 'other'
}

function summarize(profile: CpuProfile, top = 25): string {
  const byId = new Map(profile.nodes.map((n) => [n.id, n]))
  const selfUs = new Map<number, number>()
  // timeDeltas[i] is the time before sample i; the time after it belongs to sample i.
  for (let i = 0; i < profile.samples.length; i++) {
    const id = profile.samples[i] ?? 0
    selfUs.set(id, (selfUs.get(id) ?? 0) + (profile.timeDeltas[i + 1] ?? 0))
  }
  const total = [...selfUs.values()].reduce((a, b) => a + b, 0)
  const idle = [...selfUs.entries()].filter(([id]) => byId.get(id)?.callFrame.functionName === '(idle)').reduce((a, [, us]) => a + us, 0)
  const busy = total - idle

  const self = new Map<string, number>()
  const categories = new Map<string, number>()
  const inclusive = new Map<string, number>()
  // Depth-first from the root, adding each node's subtree time to every distinct key on its
  // stack once (so recursion does not count twice).
  const subtreeUs = new Map<number, number>()
  const subtree = (id: number): number => {
    const known = subtreeUs.get(id)
    if (known !== undefined) return known
    const node = byId.get(id)
    const us = (selfUs.get(id) ?? 0) + (node?.children ?? []).reduce((a, c) => a + subtree(c), 0)
    subtreeUs.set(id, us)
    return us
  }
  for (const n of profile.nodes) subtree(n.id)
  const walk = (id: number, onStack: Set<string>): void => {
    const node = byId.get(id)
    if (!node) return
    const key = keyOf(node.callFrame)
    const own = selfUs.get(id) ?? 0
    self.set(key, (self.get(key) ?? 0) + own)
    const cat = categoryOf(node.callFrame)
    categories.set(cat, (categories.get(cat) ?? 0) + own)
    const fresh = !onStack.has(key)
    if (fresh) {
      inclusive.set(key, (inclusive.get(key) ?? 0) + (subtreeUs.get(id) ?? 0))
      onStack.add(key)
    }
    for (const c of node.children ?? []) walk(c, onStack)
    if (fresh) onStack.delete(key)
  }
  const root = profile.nodes[0]
  if (root) walk(root.id, new Set())

  const pct = (us: number): string => `${fmt((us / busy) * 100, 1)}%`
  const rows = (m: Map<string, number>, skip: (k: string) => boolean): string[] =>
    [...m.entries()]
      .filter(([k]) => !skip(k))
      .sort((a, b) => b[1] - a[1])
      .slice(0, top)
      .map(([k, us]) => `| ${pct(us)} | ${fmt(us / 1000)} ms | \`${k.replace(/\|/g, '\\|')}\` |`)
  const lines = [
    `Profile: ${fmt(total / 1e6, 1)} s sampled, ${fmt(busy / 1e6, 1)} s busy (not idle); percentages are of busy time.`,
    '',
    '### By package / category (self time)',
    '',
    '| busy | time | category |',
    '|---|---|---|',
    ...rows(categories, (k) => k === '(idle)' || k === '(root)'),
    '',
    `### Top ${top} functions by self time`,
    '',
    '| busy | time | function |',
    '|---|---|---|',
    ...rows(self, (k) => k === '(idle)' || k === '(root)'),
    '',
    `### Top ${top} functions by inclusive time (the function and everything it called)`,
    '',
    '| busy | time | function |',
    '|---|---|---|',
    ...rows(inclusive, (k) => k === '(idle)' || k === '(root)' || k === '(program)' || k === '(garbage collector)'),
    '',
  ]
  return lines.join('\n')
}

async function main(): Promise<void> {
  const sizes: Record<string, number> = { '64k': 64 * KiB, '4m': 4 * MiB, '32m': 32 * MiB }
  const size = textOption('size', '64k')
  const bytes = sizes[size]
  if (bytes === undefined) throw new Error(`--size must be one of ${Object.keys(sizes).join(', ')}`)
  const seconds = Number(textOption('seconds', '10')) || 10
  const children = new Children()
  const tmp = mkdtempSync(join(tmpdir(), 'rpp-profile-'))
  chmodSync(tmp, 0o755)
  const registry = await FakeRegistry.start()
  try {
    const image = registry.addImage('bench/pkg/profiled', [pseudoRandom(bytes, `profile ${size}`)])
    const configPath = join(tmp, 'registry-config.json')
    writeFileSync(configPath, JSON.stringify({ default: { address: registry.host, path: '/bench', scheme: 'http' } }))
    const port = await freePort()
    const profDir = join(tmp, 'prof')
    const proxy = await startProxy(children, {
      configPath,
      cacheDir: join(tmp, 'cache'),
      port,
      logFile: join(tmp, 'proxy.log'),
      nodeArgs: ['--cpu-prof', `--cpu-prof-dir=${profDir}`],
      logLevel: 'info', // as deployed: the request log is part of a hit's cost
    })
    const url = `http://127.0.0.1:${port}/package?digest=${image.manifestDigest}&path=pkg/profiled`
    const first = await fetchHashed(url)
    if (first.status !== 200 || first.digest !== image.lastLayer.digest) throw new Error(`warm-up: HTTP ${first.status}`)
    await waitForHit(url, image.lastLayer.digest)
    console.log(
      `load average ${loadavg()
        .map((l) => l.toFixed(2))
        .join(', ')}; wrk -t1 -c32 -d${seconds}s on ${size} cache hits under --cpu-prof`,
    )
    const r = await runWrk(children, { url, threads: 1, connections: 32, seconds, serverPids: [proxy.pid ?? -1] })
    console.log(`${fmt(r.requestsPerSec)} req/s, ${fmt(r.transferMiBPerSec)} MiB/s, proxy CPU ${fmt(r.serverCpu * 100)}% (profiling overhead included)`)
    // A clean exit (SIGTERM, exit 0) is what makes V8 write the profile.
    await children.stop(proxy, 30_000)
    const file = readdirSync(profDir).find((f) => f.endsWith('.cpuprofile'))
    if (!file) throw new Error(`no .cpuprofile in ${profDir}`)
    const profile = JSON.parse(readFileSync(join(profDir, file), 'utf8')) as CpuProfile
    const md = [
      `## CPU profile of ${size} cache hits (${new Date().toISOString()})`,
      '',
      `wrk -t1 -c32 -d${seconds}s, proxy at --log-level info: ${fmt(r.requestsPerSec)} req/s under the profiler, proxy CPU ${fmt(r.serverCpu * 100)}% of one core. ` +
        'The profile covers the whole process lifetime (start-up and the warm-up miss are a few hundred ms of it).',
      '',
      summarize(profile),
    ].join('\n')
    const resultsDir = join(ROOT, 'bench', 'results')
    mkdirSync(resultsDir, { recursive: true })
    writeFileSync(join(resultsDir, `profile-${size}.md`), md)
    console.log(`\n${md}`)
    console.log(`written to bench/results/profile-${size}.md; raw profile: ${join(profDir, file)}`)
  } finally {
    await children.stopAll()
    await registry.close()
  }
}

main().catch((err: unknown) => {
  console.error(`profile failed: ${(err as Error).stack ?? String(err)}`)
  process.exitCode = 1
})

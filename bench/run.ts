/**
 * `npm run bench`: the proxy's cache hits (as deployed, `--log-level info`) against nginx (one
 * worker, sendfile) and plain `node:http` (`res.end(buffer)`, the runtime's floor) serving the
 * same bytes at 64 KiB, 4 MiB and 32 MiB, with requests/s and CPU per request from /proc;
 * request coalescing under 50 concurrent cold requests; peak RSS during 24 concurrent cold
 * downloads. One machine, one run; results go to stdout and `bench/results/latest.{md,json}`.
 * Not a test and not in CI: the numbers depend on the machine and whatever else runs on it.
 *
 * wrk runs with one thread (`-t1`), so on a 2-core machine the server under test has the other
 * core to itself. Each round runs every server once, in an order that rotates from round to
 * round. The ratios (proxy to nginx, proxy to plain node:http) are taken within each round,
 * whose runs are a minute apart at most, and the median of those is reported: this machine's
 * speed moves by up to 2x between minutes (its host is shared), and it moves each server's cost
 * differently, so a ratio of figures from different rounds measures the host, not the servers.
 * Each round also times a fixed piece of work (`hostProbeMs`) to show which phase it ran in.
 *
 * Options (after `npm run bench --`): `--seconds N` (wrk duration, default 6),
 * `--rounds N` (default 5), `--sizes 64k,4m,32m,32m1` (which hit sizes; 32m1 is 32 MiB over one
 * connection), `--log-level L` (the proxy's,
 * default `info`), `--hits-only` (skip the
 * coalescing and memory checks), `--quiet-wait N` (before each measured run, wait up to N s,
 * default 30, for other processes to use under 25% of the CPUs; `--no-quiet-wait` skips that).
 */
import { spawnSync } from 'node:child_process'
import { chmodSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { Agent } from 'node:http'
import { availableParallelism, cpus, loadavg, release, tmpdir, totalmem } from 'node:os'
import { join } from 'node:path'
import { FakeRegistry, type FakeImage } from '../tools/sample-registry.js'
import { freePort } from '../tools/net.js'
import {
  Children,
  fetchHashed,
  fmt,
  KiB,
  median,
  memoryOf,
  MiB,
  option,
  hostProbeMs,
  pseudoRandom,
  resetPeakRss,
  ROOT,
  runWrk,
  sha256,
  sleep,
  textOption,
  startNginx,
  startBaseline,
  startProxy,
  waitForHit,
  type WrkResult,
} from './lib.js'

const THREADS = 1
const CONNECTIONS = 32
const WARMUP_SECONDS = 2
const COLD_CLIENTS = 50
const RSS_DOWNLOADS = 24
const RSS_SAMPLE_MS = 20

const SECONDS = option('seconds', 6)
const ROUNDS = option('rounds', 5)
/** Before each measured run, wait up to this long for other processes to use < QUIET_BELOW of the CPUs. */
const QUIET_WAIT_S = process.argv.includes('--no-quiet-wait') ? 0 : option('quiet-wait', 30)
const QUIET_BELOW = 0.25

const HITS_ONLY = process.argv.includes('--hits-only')
/** The proxy's log level: `info` as deployed; another only to see what the request log costs. */
const LOG_LEVEL = textOption('log-level', 'info')

type Target = 'proxy' | 'nginx' | 'node'
const TARGETS: Target[] = ['proxy', 'nginx', 'node']
const TARGET_NAMES: Record<Target, string> = {
  proxy: `proxy (\`--log-level ${LOG_LEVEL}\`)`,
  nginx: 'nginx (1 worker, sendfile)',
  node: 'plain `node:http`, `res.end(buffer)`',
}

/** Hit sizes, and how many connections wrk keeps open for each. */
const ALL_SIZES = [
  { key: '64k', label: '64 KiB', bytes: 64 * KiB, connections: CONNECTIONS },
  { key: '4m', label: '4 MiB', bytes: 4 * MiB, connections: CONNECTIONS },
  { key: '32m', label: '32 MiB', bytes: 32 * MiB, connections: CONNECTIONS },
  // One client at a time: a large package that no herd wants is sent from its file, not memory.
  { key: '32m1', label: '32 MiB, 1 connection', bytes: 32 * MiB, connections: 1 },
]
const SIZES = ((): typeof ALL_SIZES => {
  const i = process.argv.indexOf('--sizes')
  if (i === -1) return ALL_SIZES
  const keys = (process.argv[i + 1] ?? '').split(',')
  const chosen = ALL_SIZES.filter((s) => keys.includes(s.key))
  if (chosen.length === 0) throw new Error(`--sizes takes a list of ${ALL_SIZES.map((s) => s.key).join(', ')}`)
  return chosen
})()
const REQS_TARGET = 0.8
const CPU_TARGET = 1.5

interface SizeResult {
  label: string
  bytes: number
  connections: number
  rounds: Record<Target, WrkResult[]>
  median: Record<Target, WrkResult>
  /** Per round: the proxy's figures over nginx's and over plain node:http's, from the same round. */
  ratios: RoundRatios[]
  /** Per round: ms for the fixed work of {@link hostProbeMs}, timed just before the round. */
  probeMs: number[]
}

interface RoundRatios {
  /** Requests/s, proxy over nginx. */
  reqs: number
  /** CPU per request, proxy over nginx. */
  cpu: number
  /** CPU per request, proxy over plain node:http. */
  cpuNode: number
  /** CPU per request, plain node:http over nginx. */
  nodeCpu: number
}

const cpuPerRequestUs = (r: WrkResult): number => (r.serverCpu / r.requestsPerSec) * 1e6

interface ColdResult {
  clients: number
  upstreamBlobGets: number
  upstreamManifestGets: number
  allVerified: boolean
  statuses: Record<string, number>
  xCache: Record<string, number>
  wallMs: number
  slowestMs: number
}

interface RssResult {
  /** RSS of the proxy just after /readyz, before any package request. */
  startRssMiB: number
  downloads: number
  allVerified: boolean
  baselineRssMiB: number
  hwmBeforeMiB: number
  hwmResetWorked: boolean
  hwmAfterMiB: number
  maxSampleMiB: number
  samples: number
  wallMs: number
  peakMiB: number
}

interface Machine {
  cpus: number
  cpuModel: string
  memGiB: number
  kernel: string
  node: string
  nginx: string
  wrk: string
  /** The commit measured, and the product files changed on top of it (bench/ and BENCHMARKS.md aside). */
  commit: string
  uncommitted: string[]
  loadBefore: number[]
  uptimeBefore: string
  loadAfter?: number[]
}

function tool(cmd: string, args: string[]): string {
  const r = spawnSync(cmd, args, { encoding: 'utf8' })
  return `${r.stdout}${r.stderr}`.split('\n')[0]?.trim() ?? ''
}

function machineInfo(): Machine {
  return {
    cpus: availableParallelism(),
    cpuModel: cpus()[0]?.model ?? 'unknown',
    memGiB: totalmem() / 1024 / MiB,
    kernel: release(),
    node: process.version,
    nginx: tool('/usr/sbin/nginx', ['-v']),
    wrk: tool('/usr/bin/wrk', ['--version']).replace(/\s+Copyright.*$/, ''),
    commit: spawnSync('git', ['log', '-1', '--format=%h %s'], { cwd: ROOT, encoding: 'utf8' }).stdout.trim() || 'unknown',
    uncommitted: spawnSync('git', ['status', '--porcelain', '--', '.', ':!bench', ':!BENCHMARKS.md'], { cwd: ROOT, encoding: 'utf8' })
      .stdout.split('\n')
      .filter((l) => l.trim() !== ''),
    loadBefore: loadavg(),
    uptimeBefore: tool('uptime', []),
  }
}

function tally(values: string[]): Record<string, number> {
  const out: Record<string, number> = {}
  for (const v of values) out[v] = (out[v] ?? 0) + 1
  return out
}

const countsText = (c: Record<string, number>): string =>
  Object.entries(c)
    .map(([k, v]) => `${k} ${v}`)
    .join(', ')

async function benchSize(
  children: Children,
  label: string,
  bytes: number,
  connections: number,
  urls: Record<Target, string>,
  pids: Record<Target, number[]>,
): Promise<SizeResult> {
  const rounds: Record<Target, WrkResult[]> = { proxy: [], nginx: [], node: [] }
  const probeMs: number[] = []
  for (let round = 0; round < ROUNDS; round++) {
    probeMs.push(hostProbeMs())
    console.log(`  ${label} round ${round + 1}: host probe ${fmt(probeMs[round] ?? NaN, 1)} ms`)
    // The order rotates, so that drift in the machine's load falls on every server alike.
    const order = TARGETS.map((_, i) => TARGETS[(i + round) % TARGETS.length] as Target)
    for (const target of order) {
      // A short run first, discarded: connection set-up, JIT and page cache settle.
      await runWrk(children, { url: urls[target], threads: THREADS, connections, seconds: WARMUP_SECONDS, serverPids: pids[target] })
      const r = await runWrk(children, {
        url: urls[target],
        threads: THREADS,
        connections,
        seconds: SECONDS,
        serverPids: pids[target],
        ...(QUIET_WAIT_S > 0 ? { quiet: { maxMs: QUIET_WAIT_S * 1000, threshold: QUIET_BELOW } } : {}),
      })
      // A wrong status is a broken server; a socket error (a response slower than wrk's 10 s
      // timeout) is a result, reported with the numbers.
      if (r.non2xx > 0) throw new Error(`${target} ${label}: ${r.non2xx} non-2xx responses`)
      rounds[target].push(r)
      console.log(
        `  ${label} round ${round + 1} ${target.padEnd(6)} ${fmt(r.requestsPerSec).padStart(8)} req/s ${fmt(r.transferMiBPerSec).padStart(6)} MiB/s ` +
          `p50 ${fmt(r.p50Ms, 2)} ms p99 ${fmt(r.p99Ms, 2)} ms, server CPU ${fmt(r.serverCpu * 100)}% = ${fmt(cpuPerRequestUs(r))} µs/request, machine busy ${fmt(r.machineBusy * 100)}%` +
          (r.backgroundBusy === undefined ? '' : ` (others: ${fmt(r.backgroundBusy * 100)}% just before, after waiting ${fmt(r.waitedMs / 1000)} s)`) +
          (r.socketErrors === undefined ? '' : `, SOCKET ERRORS: ${r.socketErrors}`),
      )
    }
  }
  // The round with the median requests/s; its CPU figure comes with it, measured over the same run.
  const medianOf = (rs: WrkResult[]): WrkResult => [...rs].sort((a, b) => a.requestsPerSec - b.requestsPerSec)[Math.floor((rs.length - 1) / 2)] as WrkResult
  const ratios = rounds.proxy.map((p, i): RoundRatios => {
    const n = rounds.nginx[i] as WrkResult
    const b = rounds.node[i] as WrkResult
    return {
      reqs: p.requestsPerSec / n.requestsPerSec,
      cpu: cpuPerRequestUs(p) / cpuPerRequestUs(n),
      cpuNode: cpuPerRequestUs(p) / cpuPerRequestUs(b),
      nodeCpu: cpuPerRequestUs(b) / cpuPerRequestUs(n),
    }
  })
  return {
    label,
    bytes,
    connections,
    rounds,
    median: { proxy: medianOf(rounds.proxy), nginx: medianOf(rounds.nginx), node: medianOf(rounds.node) },
    ratios,
    probeMs,
  }
}

async function coldRequests(registry: FakeRegistry, proxyBase: string, image: FakeImage, path: string): Promise<ColdResult> {
  // A slow registry (64 KiB every 2 ms, about 0.3 s for 8 MiB) so that all 50 overlap one fill.
  registry.faults = { blobChunkSize: 64 * KiB, blobChunkDelayMs: 2 }
  const blobs0 = registry.counts.blob
  const manifests0 = registry.counts.manifest
  const agent = new Agent({ keepAlive: false, maxSockets: Infinity })
  const url = `${proxyBase}/package?digest=${image.manifestDigest}&path=${path}`
  const t0 = performance.now()
  try {
    const results = await Promise.all(Array.from({ length: COLD_CLIENTS }, () => fetchHashed(url, agent)))
    return {
      clients: COLD_CLIENTS,
      upstreamBlobGets: registry.counts.blob - blobs0,
      upstreamManifestGets: registry.counts.manifest - manifests0,
      allVerified: results.every((r) => r.status === 200 && r.digest === image.lastLayer.digest),
      statuses: tally(results.map((r) => String(r.status))),
      xCache: tally(results.map((r) => String(r.headers['x-cache']))),
      wallMs: performance.now() - t0,
      slowestMs: Math.max(...results.map((r) => r.ms)),
    }
  } finally {
    registry.faults = {}
    agent.destroy()
  }
}

async function peakRss(proxyPid: number, proxyBase: string, images: Array<{ image: FakeImage; path: string }>, startRssMiB: number): Promise<RssResult> {
  const baseline = memoryOf(proxyPid)
  const hwmBefore = baseline.hwmKiB
  // VmHWM is the peak since the process started (the wrk runs included): reset it if allowed.
  const hwmResetWorked = resetPeakRss(proxyPid)
  let maxSample = baseline.rssKiB
  let samples = 0
  const sampler = setInterval(() => {
    try {
      maxSample = Math.max(maxSample, memoryOf(proxyPid).rssKiB)
      samples++
    } catch {
      // the proxy died; the downloads will fail and say so
    }
  }, RSS_SAMPLE_MS)
  const agent = new Agent({ keepAlive: false, maxSockets: Infinity })
  const t0 = performance.now()
  try {
    const results = await Promise.all(images.map(({ image, path }) => fetchHashed(`${proxyBase}/package?digest=${image.manifestDigest}&path=${path}`, agent)))
    const wallMs = performance.now() - t0
    const after = memoryOf(proxyPid)
    maxSample = Math.max(maxSample, after.rssKiB)
    const allVerified = results.every((r, i) => r.status === 200 && r.digest === images[i]?.image.lastLayer.digest)
    const peakKiB = hwmResetWorked ? Math.max(after.hwmKiB, maxSample) : maxSample
    return {
      startRssMiB,
      downloads: images.length,
      allVerified,
      baselineRssMiB: baseline.rssKiB / 1024,
      hwmBeforeMiB: hwmBefore / 1024,
      hwmResetWorked,
      hwmAfterMiB: after.hwmKiB / 1024,
      maxSampleMiB: maxSample / 1024,
      samples,
      wallMs,
      peakMiB: peakKiB / 1024,
    }
  } finally {
    clearInterval(sampler)
    agent.destroy()
  }
}

function report(machine: Machine, sizes: SizeResult[], cold: ColdResult | undefined, rss: RssResult | undefined, startedAt: Date): string {
  const lines: string[] = []
  const busy = machine.loadBefore[0] ?? 0
  lines.push(`## Benchmark run ${startedAt.toISOString()}`)
  lines.push('')
  lines.push(
    `Machine: ${machine.cpus} CPUs (${machine.cpuModel}), ${fmt(machine.memGiB, 1)} GiB, Linux ${machine.kernel}; ` +
      `Node ${machine.node}; ${machine.nginx}; ${machine.wrk}.`,
  )
  lines.push(
    `Code: commit ${machine.commit}` +
      (machine.uncommitted.length > 0
        ? `, plus uncommitted changes: ${machine.uncommitted.map((l) => l.trim()).join(', ')}.`
        : ', no uncommitted product changes.'),
  )
  lines.push(
    `Load average before the run: ${machine.loadBefore.map((l) => l.toFixed(2)).join(', ')} (1, 5, 15 min)` +
      (machine.loadAfter ? `; after: ${machine.loadAfter.map((l) => l.toFixed(2)).join(', ')}` : '') +
      '.',
  )
  if (busy > 1.0) {
    lines.push('')
    lines.push(
      `**Warning: the 1-minute load average was ${busy.toFixed(2)} (> 1.0) before the run: other processes (or \`npm run bench\`'s own ` +
        `build, just before) were using this ${machine.cpus}-CPU machine, so throughput numbers may be depressed and noisy (the load ` +
        `average lags by minutes; the "busy before (others)" column below shows how busy the machine was just before each measured run).**`,
    )
  }
  lines.push('')
  lines.push(
    `wrk -t${THREADS} -c${CONNECTIONS} (or -c1 where the size says so) -d${SECONDS}s --latency (the server under test has the other core); each measured run preceded by a discarded ${WARMUP_SECONDS} s run; ` +
      `${ROUNDS} rounds, each running every server once in a rotating order. Ratios are taken within each round and the median over rounds is reported ` +
      '(rounds in brackets, in order); the detail table gives the median round of each server.',
  )
  lines.push('')
  lines.push('| check | measured (median of per-round ratios) | target | result |')
  lines.push('|---|---|---|---|')
  const rounds = (xs: number[]): string => xs.map((x) => fmt(x, 2)).join(', ')
  for (const s of sizes) {
    const reqs = median(s.ratios.map((r) => r.reqs))
    const cpu = median(s.ratios.map((r) => r.cpu))
    lines.push(
      `| ${s.label} hits, requests/s vs nginx | **${fmt(reqs, 2)}x** (${rounds(s.ratios.map((r) => r.reqs))}) | >= ${REQS_TARGET}x | ${reqs >= REQS_TARGET ? 'PASS' : 'MISS'} |`,
    )
    lines.push(
      `| ${s.label} hits, CPU per request vs nginx | **${fmt(cpu, 2)}x** (${rounds(s.ratios.map((r) => r.cpu))}); ` +
        `vs plain node:http ${fmt(median(s.ratios.map((r) => r.cpuNode)), 2)}x (${rounds(s.ratios.map((r) => r.cpuNode))}); ` +
        `node:http vs nginx ${fmt(median(s.ratios.map((r) => r.nodeCpu)), 2)}x | <= ${CPU_TARGET}x | ${cpu <= CPU_TARGET ? 'PASS' : 'MISS'} |`,
    )
  }
  if (cold) {
    lines.push(
      `| ${cold.clients} concurrent cold requests, one 8 MiB package | ${cold.upstreamBlobGets} upstream layer GET(s); ${cold.allVerified ? 'all' : 'NOT all'} ${cold.clients} bodies verified | exactly 1 | ` +
        `${cold.upstreamBlobGets === 1 && cold.allVerified ? 'PASS' : `MISS (${cold.upstreamBlobGets} GETs${cold.allVerified ? '' : ', bad bodies'})`} |`,
    )
  }
  if (rss) {
    lines.push(
      `| peak RSS, ${rss.downloads} concurrent cold 8 MiB downloads | ${fmt(rss.peakMiB, 1)} MiB; ${rss.allVerified ? 'all' : 'NOT all'} bodies verified | < 256 MiB | ` +
        `${rss.peakMiB < 256 && rss.allVerified ? 'PASS' : `MISS (${fmt(rss.peakMiB - 256, 1)} MiB over${rss.allVerified ? '' : ', bad bodies'})`} |`,
    )
  }
  lines.push('')
  lines.push('### Hits in detail (median round of each)')
  lines.push('')
  lines.push('| size | server | req/s | MiB/s | p50 | p99 | server CPU | CPU per request | machine CPU busy | busy before (others) |')
  lines.push('|---|---|---|---|---|---|---|---|---|---|')
  for (const s of sizes) {
    for (const t of TARGETS) {
      const r = s.median[t]
      lines.push(
        `| ${s.label} | ${TARGET_NAMES[t]} | ${fmt(r.requestsPerSec)} | ${fmt(r.transferMiBPerSec)} | ${fmt(r.p50Ms, 2)} ms | ` +
          `${fmt(r.p99Ms, 2)} ms | ${fmt(r.serverCpu * 100)}% | ${fmt(cpuPerRequestUs(r))} µs | ${fmt(r.machineBusy * 100)}% | ${r.backgroundBusy === undefined ? 'n/a' : `${fmt(r.backgroundBusy * 100)}%`} |`,
      )
    }
  }
  const errors = sizes.flatMap((s) =>
    TARGETS.flatMap((t) => s.rounds[t].filter((r) => r.socketErrors !== undefined).map((r) => `${s.label} ${t}: ${r.socketErrors ?? ''}`)),
  )
  if (errors.length > 0) lines.push('', `Socket errors reported by wrk (timeout = no response within 10 s): ${errors.join('; ')}.`)
  lines.push('')
  lines.push(
    'All rounds, req/s (CPU µs per request): ' +
      sizes
        .map(
          (s) =>
            `${s.label}: ` +
            TARGETS.map((t) => `${t} ${s.rounds[t].map((r) => `${fmt(r.requestsPerSec)} (${fmt(cpuPerRequestUs(r))})`).join(' / ')}`).join('; '),
        )
        .join(' | ') +
      '.',
  )
  lines.push(
    `Host probe (ms for a fixed piece of work, timed before each round; lower is a faster host): ` +
      sizes.map((s) => `${s.label}: ${s.probeMs.map((ms) => fmt(ms)).join(' / ')}`).join(' | ') +
      '.',
  )
  lines.push(
    '"server CPU" is CPU seconds per second of the server process (user + system, all its threads, from /proc/<pid>/stat), or of the nginx master and worker (100% = one core); ' +
      '"CPU per request" divides it by req/s; ' +
      '"machine CPU busy" is the share of all CPUs busy during the run (wrk included); "busy before (others)" is that share in the second just before ' +
      `the run, with our servers idle: other processes' load (each measured run first waited up to ${QUIET_WAIT_S} s for it to fall under ${QUIET_BELOW * 100}%).`,
  )
  lines.push('')
  if (!cold || !rss) return lines.join('\n')
  lines.push('### Cold requests and memory')
  lines.push('')
  lines.push(
    `- ${cold.clients} concurrent cold requests for one 8 MiB package (registry sending 64 KiB every 2 ms): upstream layer GETs ${cold.upstreamBlobGets}, ` +
      `manifest GETs ${cold.upstreamManifestGets}; statuses ${countsText(cold.statuses)}; X-Cache ${countsText(cold.xCache)}; ` +
      `all done in ${fmt(cold.wallMs)} ms (slowest client ${fmt(cold.slowestMs)} ms).`,
  )
  lines.push(
    `- ${rss.downloads} concurrent cold downloads of distinct 8 MiB packages (registry at full speed) in ${fmt(rss.wallMs)} ms: ` +
      `proxy RSS ${fmt(rss.startRssMiB, 1)} MiB at start-up, ${fmt(rss.baselineRssMiB, 1)} MiB before this test; max of ${rss.samples} VmRSS samples (every ${RSS_SAMPLE_MS} ms) ${fmt(rss.maxSampleMiB, 1)} MiB; ` +
      `VmHWM ${fmt(rss.hwmBeforeMiB, 1)} MiB before (peak since start, the wrk runs included), ` +
      (rss.hwmResetWorked
        ? `reset through /proc/<pid>/clear_refs, ${fmt(rss.hwmAfterMiB, 1)} MiB after (the peak during this test).`
        : `${fmt(rss.hwmAfterMiB, 1)} MiB after (could not be reset: an upper bound only).`),
  )
  lines.push('')
  return lines.join('\n')
}

/**
 * The proxy's request lines for /package so far, and the lines its log counted as dropped (a
 * reader that fell behind): read once the periodic flush has run.
 */
async function requestLogCounts(file: string): Promise<{ lines: number; dropped: number }> {
  await sleep(600)
  let lines = 0
  let dropped = 0
  for (const line of readFileSync(file, 'utf8').split('\n')) {
    if (line.includes('"path":"/package"')) lines++
    const m = /"droppedLines":(\d+)/.exec(line)
    if (m) dropped += Number(m[1])
  }
  return { lines, dropped }
}

/** `latest.md` and `latest.json`, and the run's own copy of the tables (`YYYY-MM-DD-HHMM.md`, UTC start time) for the history. */
function writeResults(md: string, json: object, startedAt: Date): void {
  const resultsDir = join(ROOT, 'bench', 'results')
  mkdirSync(resultsDir, { recursive: true })
  const dated = `${startedAt.toISOString().slice(0, 16).replace('T', '-').replace(':', '')}.md`
  writeFileSync(join(resultsDir, 'latest.md'), md)
  writeFileSync(join(resultsDir, 'latest.json'), JSON.stringify(json, null, 2) + '\n')
  writeFileSync(join(resultsDir, dated), md)
  console.log(`\n${md}`)
  console.log(`written to bench/results/latest.md, latest.json and ${dated}`)
}

async function main(): Promise<void> {
  const startedAt = new Date()
  const machine = machineInfo()
  console.log(
    `machine: ${machine.cpus} CPUs, ${machine.node}, ${machine.nginx}, ${machine.wrk}; code: ${machine.commit}${machine.uncommitted.length > 0 ? ` + ${machine.uncommitted.length} changed files` : ''}`,
  )
  console.log(`uptime before the run: ${machine.uptimeBefore}`)
  if ((machine.loadBefore[0] ?? 0) > 1.0)
    console.log(`WARNING: load average ${machine.loadBefore[0]?.toFixed(2)} > 1.0: other processes are busy on this machine; expect depressed, noisy numbers`)

  const children = new Children()
  const tmp = mkdtempSync(join(tmpdir(), 'rpp-bench-'))
  chmodSync(tmp, 0o755)
  let registry: FakeRegistry | undefined
  let failed = true
  const onSignal = (): void => {
    children.killNow()
    rmSync(tmp, { recursive: true, force: true })
    process.exit(130)
  }
  process.on('SIGINT', onSignal)
  process.on('SIGTERM', onSignal)
  try {
    // 1. The registry, in this process, with incompressible deterministic layers.
    const reg = await FakeRegistry.start()
    registry = reg
    const hitImages = SIZES.map((size) => ({
      ...size,
      image: reg.addImage(`bench/pkg/hit-${size.key}`, [pseudoRandom(size.bytes, `bench ${size.label}`)]),
      path: `pkg/hit-${size.key}`,
    }))
    const cold = registry.addImage('bench/pkg/cold', [pseudoRandom(8 * MiB, 'bench cold 8 MiB')])
    const rssImages = Array.from({ length: RSS_DOWNLOADS }, (_, i) => ({
      image: reg.addImage(`bench/rss/pkg-${i}`, [pseudoRandom(8 * MiB, `bench rss 8 MiB #${i}`)]),
      path: `rss/pkg-${i}`,
    }))
    const configPath = join(tmp, 'registry-config.json')
    writeFileSync(configPath, JSON.stringify({ default: { address: registry.host, path: '/bench', scheme: 'http' } }, null, 2))

    // 2. The real binary.
    const proxyPort = await freePort()
    // As deployed: `--log-level info`, so every request writes its log line.
    const proxy = await startProxy(children, {
      configPath,
      cacheDir: join(tmp, 'cache'),
      port: proxyPort,
      logFile: join(tmp, 'proxy.log'),
      logLevel: LOG_LEVEL,
    })
    const proxyPid = proxy.pid ?? -1
    const proxyBase = `http://127.0.0.1:${proxyPort}`
    const startRssMiB = memoryOf(proxyPid).rssKiB / 1024
    console.log(`proxy pid ${proxyPid} on ${proxyBase}, registry on ${registry.url}, scratch in ${tmp}`)

    // 3. Warm the hit packages: a verified miss, then a verified hit.
    const hitUrl = (image: FakeImage, path: string): string => `${proxyBase}/package?digest=${image.manifestDigest}&path=${path}`
    for (const { image, path } of hitImages) {
      const first = await fetchHashed(hitUrl(image, path))
      if (first.status !== 200 || first.digest !== image.lastLayer.digest) throw new Error(`warm-up of ${path}: HTTP ${first.status}, body ${first.digest}`)
      await waitForHit(hitUrl(image, path), image.lastLayer.digest)
    }
    const blobsAfterWarm = registry.counts.blob

    // 4. nginx (one worker) and plain node:http on the same bytes.
    const www = join(tmp, 'www')
    mkdirSync(www)
    for (const { key, image } of hitImages) writeFileSync(join(www, `${key}.bin`), image.lastLayer.data)
    const nginxPort = await freePort()
    const nginx = await startNginx(children, { dir: join(tmp, 'nginx'), root: www, port: nginxPort, workers: '1' })
    const nodePorts: Record<string, number> = {}
    const nodeServers = []
    for (const { key } of hitImages) {
      const port = await freePort()
      nodePorts[key] = port
      nodeServers.push(await startBaseline(children, 'node-memory', port, join(www, `${key}.bin`), join(tmp, `node-${key}.log`)))
    }
    for (const { key, image } of hitImages) {
      for (const url of [`http://127.0.0.1:${nginxPort}/${key}.bin`, `http://127.0.0.1:${nodePorts[key]}/`]) {
        const r = await fetchHashed(url)
        if (r.status !== 200 || r.digest !== sha256(image.lastLayer.data)) throw new Error(`${url}: HTTP ${r.status}, body ${r.digest}`)
      }
    }

    // 5. Hits.
    const sizes: SizeResult[] = []
    for (const { key, label, bytes, connections, image, path } of hitImages) {
      console.log(`wrk ${label}: ${ROUNDS} rounds of ${SECONDS} s per server (+${WARMUP_SECONDS} s warm-up each)`)
      const node = nodeServers[hitImages.findIndex((h) => h.key === key)]
      sizes.push(
        await benchSize(
          children,
          label,
          bytes,
          connections,
          { proxy: hitUrl(image, path), nginx: `http://127.0.0.1:${nginxPort}/${key}.bin`, node: `http://127.0.0.1:${nodePorts[key]}/` },
          { proxy: [proxyPid], nginx: [nginx.master.pid ?? -1, ...nginx.workerPids], node: [node?.pid ?? -1] },
        ),
      )
    }
    if (registry.counts.blob !== blobsAfterWarm) throw new Error(`cache hits went to the registry: ${registry.counts.blob - blobsAfterWarm} layer GETs`)
    await Promise.all([children.stop(nginx.master), ...nodeServers.map((c) => children.stop(c))])
    const requestLog = await requestLogCounts(join(tmp, 'proxy.log'))
    console.log(`request log: ${requestLog.lines} /package lines, ${requestLog.dropped} counted as dropped`)
    const logNote = `\nRequest log during the hit runs (through a pipe, as in a pod): ${fmt(requestLog.lines)} \`/package\` lines written, ${fmt(requestLog.dropped)} counted as dropped.\n`
    if (HITS_ONLY) {
      machine.loadAfter = loadavg()
      const md = report(machine, sizes, undefined, undefined, startedAt) + logNote
      writeResults(md, { startedAt, machine, seconds: SECONDS, rounds: ROUNDS, sizes }, startedAt)
      failed = false
      return
    }

    // 6. Coalescing.
    console.log(`${COLD_CLIENTS} concurrent cold requests for one 8 MiB package`)
    const coldResult = await coldRequests(registry, proxyBase, cold, 'pkg/cold')
    console.log(`  upstream layer GETs: ${coldResult.upstreamBlobGets}, X-Cache ${countsText(coldResult.xCache)}, verified: ${coldResult.allVerified}`)

    // 7. Memory.
    console.log(`peak RSS during ${RSS_DOWNLOADS} concurrent cold 8 MiB downloads`)
    const rssResult = await peakRss(proxyPid, proxyBase, rssImages, startRssMiB)
    console.log(
      `  peak ${fmt(rssResult.peakMiB, 1)} MiB (max sample ${fmt(rssResult.maxSampleMiB, 1)} MiB, VmHWM after ${fmt(rssResult.hwmAfterMiB, 1)} MiB), verified: ${rssResult.allVerified}`,
    )

    // 8. Report.
    machine.loadAfter = loadavg()
    const md = report(machine, sizes, coldResult, rssResult, startedAt) + logNote
    writeResults(md, { startedAt, machine, seconds: SECONDS, rounds: ROUNDS, sizes, cold: coldResult, rss: rssResult, requestLog }, startedAt)
    failed = false
  } finally {
    // 9. Nothing outlives the run; a failed run keeps its logs for a look.
    await children.stopAll()
    await registry?.close()
    if (failed) console.error(`scratch directory kept for its logs (proxy.log, nginx-*/error.log): ${tmp}`)
    else rmSync(tmp, { recursive: true, force: true })
  }
}

main().catch((err: unknown) => {
  console.error(`bench failed: ${(err as Error).stack ?? String(err)}`)
  process.exitCode = 1
})

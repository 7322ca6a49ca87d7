/**
 * Shared pieces of the benchmark (`bench/run.ts`), the profiler (`bench/profile.ts`) and the
 * other bench scripts: deterministic layers, the real proxy binary and nginx as child processes,
 * wrk runs and their parsed output, /proc readings, `--name N` options. Everything talks to
 * 127.0.0.1 only.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process'
import { createCipheriv, createHash } from 'node:crypto'
import { chmodSync, mkdirSync, openSync, closeSync, createWriteStream, readFileSync, readdirSync, writeFileSync } from 'node:fs'
import { Agent, request } from 'node:http'
import { join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'

/** The repository root (this file runs as `dist/bench/lib.js`). */
export const ROOT = resolve(fileURLToPath(import.meta.url), '../../..')

export const KiB = 1024
export const MiB = 1024 * 1024

/** Incompressible but reproducible bytes: an AES-CTR keystream under a key derived from `seed`. */
export function pseudoRandom(size: number, seed: string): Buffer {
  const key = createHash('sha256').update(seed).digest().subarray(0, 16)
  return createCipheriv('aes-128-ctr', key, Buffer.alloc(16, 0)).update(Buffer.alloc(size))
}

export function sha256(data: Buffer): string {
  return `sha256:${createHash('sha256').update(data).digest('hex')}`
}

/** The median of `xs` (the mean of the middle two for an even count); NaN for none. */
export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b)
  const mid = Math.floor(s.length / 2)
  return s.length % 2 ? (s[mid] ?? NaN) : ((s[mid - 1] ?? NaN) + (s[mid] ?? NaN)) / 2
}

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms))

/** The positive number after `--<name>` on the command line, else `fallback`. */
/** The text after `--name` on the command line, or `fallback`. */
export function textOption(name: string, fallback: string): string {
  const i = process.argv.indexOf(`--${name}`)
  return i === -1 ? fallback : (process.argv[i + 1] ?? fallback)
}

export function option(name: string, fallback: number): number {
  const i = process.argv.indexOf(`--${name}`)
  const value = i === -1 ? undefined : Number(process.argv[i + 1])
  return value !== undefined && Number.isFinite(value) && value > 0 ? value : fallback
}

export interface Fetched {
  status: number
  headers: Record<string, string | string[] | undefined>
  /** `sha256:<hex>` of the body, hashed as it streamed (bodies are never held in memory). */
  digest: string
  bytes: number
  ms: number
}

/** GET `url`, hashing the body as it arrives. */
export function fetchHashed(url: string, agent?: Agent): Promise<Fetched> {
  const started = performance.now()
  return new Promise((resolveFetch, reject) => {
    const req = request(url, agent ? { agent } : {}, (res) => {
      const hash = createHash('sha256')
      let bytes = 0
      res.on('data', (chunk: Buffer) => {
        hash.update(chunk)
        bytes += chunk.length
      })
      res.on('end', () =>
        resolveFetch({
          status: res.statusCode ?? 0,
          headers: res.headers,
          digest: `sha256:${hash.digest('hex')}`,
          bytes,
          ms: performance.now() - started,
        }),
      )
      res.on('error', reject)
      res.on('aborted', () => reject(new Error(`response aborted: ${url}`)))
    })
    req.on('error', reject)
    req.end()
  })
}

/**
 * Child processes this run started. `stopAll` ends them (and nginx's workers) by pid; it also
 * runs synchronously from `process.on('exit')`, so a crash of the benchmark leaves nothing behind.
 */
export class Children {
  readonly #procs = new Set<ChildProcess>()
  /** Extra pids (nginx workers) killed with their master as a last resort. */
  readonly #extraPids = new Set<number>()

  constructor() {
    process.on('exit', () => this.killNow())
  }

  spawn(command: string, args: string[], logFile?: string): ChildProcess {
    const fd = logFile ? openSync(logFile, 'a') : undefined
    const child = spawn(command, args, { stdio: ['ignore', fd ?? 'pipe', fd ?? 'pipe'] })
    if (fd !== undefined) closeSync(fd)
    this.#procs.add(child)
    child.once('exit', () => this.#procs.delete(child))
    return child
  }

  addPid(pid: number): void {
    this.#extraPids.add(pid)
  }

  /** SIGTERM, wait up to `graceMs`, then SIGKILL whatever is left. */
  async stop(child: ChildProcess, graceMs = 10_000): Promise<void> {
    if (child.exitCode !== null || child.signalCode !== null) return
    const exited = new Promise<void>((r) => child.once('exit', () => r()))
    child.kill('SIGTERM')
    const timer = setTimeout(() => child.kill('SIGKILL'), graceMs)
    await exited
    clearTimeout(timer)
  }

  async stopAll(): Promise<void> {
    await Promise.all([...this.#procs].map((c) => this.stop(c)))
    this.killNow()
  }

  killNow(): void {
    for (const child of this.#procs) {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL')
    }
    for (const pid of this.#extraPids) {
      try {
        process.kill(pid, 'SIGKILL')
      } catch {
        // already gone
      }
    }
    this.#extraPids.clear()
  }
}

/** Starts `dist/main.js` (or `o.main`, another build of it) on `port`; resolves once `/readyz` answers 200. */
export async function startProxy(
  children: Children,
  o: { configPath: string; cacheDir: string; port: number; logFile: string; nodeArgs?: string[]; logLevel?: string; args?: string[]; main?: string },
): Promise<ChildProcess> {
  // stdout and stderr through a pipe, read here into the log file, as a container runtime reads
  // a pod's: the request log writes to a pipe in a cluster, not to a file.
  const child = children.spawn(process.execPath, [
    ...(o.nodeArgs ?? []),
    o.main ?? join(ROOT, 'dist/main.js'),
    `--registry-config=${o.configPath}`,
    `--cache-directory=${o.cacheDir}`,
    '--cache-retention-size=2Gi',
    `--listen-address=127.0.0.1:${o.port}`,
    `--log-level=${o.logLevel ?? 'warn'}`,
    ...(o.args ?? []),
  ])
  const log = createWriteStream(o.logFile, { flags: 'a' })
  child.stdout?.pipe(log)
  child.stderr?.pipe(log)
  for (let i = 0; i < 300; i++) {
    if (child.exitCode !== null) throw new Error(`the proxy exited with code ${child.exitCode}; see ${o.logFile}`)
    try {
      if ((await fetchHashed(`http://127.0.0.1:${o.port}/readyz`)).status === 200) return child
    } catch {
      // not listening yet
    }
    await sleep(100)
  }
  throw new Error(`the proxy did not become ready in 30 s; see ${o.logFile}`)
}

/**
 * One of `bench/baselines.ts`'s reference servers (`node-memory` is plain node:http answering
 * `res.end(buffer)`) in its own process on 127.0.0.1:`port`; resolves once it answers.
 */
export async function startBaseline(children: Children, mode: string, port: number, file: string, logFile: string): Promise<ChildProcess> {
  const child = children.spawn(process.execPath, [join(ROOT, 'dist/bench/baselines.js'), '--serve', mode, String(port), file], logFile)
  for (let i = 0; i < 100; i++) {
    if (child.exitCode !== null) throw new Error(`the ${mode} server exited with code ${child.exitCode}; see ${logFile}`)
    try {
      await fetchHashed(`http://127.0.0.1:${port}/`)
      return child
    } catch {
      await sleep(50)
    }
  }
  throw new Error(`the ${mode} server did not start listening; see ${logFile}`)
}

/**
 * A minimal nginx serving `root` on 127.0.0.1:`port`, every path inside `dir` (no /var/lib/nginx).
 * Resolves with the master process once the port answers; `workerPids` are its workers.
 */
export async function startNginx(
  children: Children,
  o: { dir: string; root: string; port: number; workers: '1' | 'auto' },
): Promise<{ master: ChildProcess; workerPids: number[] }> {
  mkdirSync(o.dir, { recursive: true })
  // Workers run as `nobody` when the master is root: the served files must be reachable.
  for (const d of [o.dir, o.root]) chmodSync(d, 0o755)
  const conf = join(o.dir, 'nginx.conf')
  writeFileSync(
    conf,
    `daemon off;
worker_processes ${o.workers};
error_log ${join(o.dir, 'error.log')} warn;
pid ${join(o.dir, 'nginx.pid')};
events { worker_connections 1024; }
http {
  sendfile on;
  tcp_nopush on;
  access_log off;
  keepalive_requests 100000;
  default_type application/octet-stream;
  client_body_temp_path ${join(o.dir, 'client_body')};
  proxy_temp_path ${join(o.dir, 'proxy')};
  fastcgi_temp_path ${join(o.dir, 'fastcgi')};
  uwsgi_temp_path ${join(o.dir, 'uwsgi')};
  scgi_temp_path ${join(o.dir, 'scgi')};
  server {
    listen 127.0.0.1:${o.port};
    root ${o.root};
  }
}
`,
  )
  const master = children.spawn('/usr/sbin/nginx', ['-c', conf, '-p', o.dir], join(o.dir, 'stderr.log'))
  for (let i = 0; i < 100; i++) {
    if (master.exitCode !== null) throw new Error(`nginx exited with code ${master.exitCode}; see ${o.dir}/error.log`)
    try {
      await fetchHashed(`http://127.0.0.1:${o.port}/`)
      const workerPids = childPids(master.pid ?? -1)
      for (const pid of workerPids) children.addPid(pid)
      return { master, workerPids }
    } catch {
      await sleep(50)
    }
  }
  throw new Error(`nginx did not start listening; see ${o.dir}/error.log`)
}

/** Pids whose parent is `pid` (nginx workers), from /proc. */
function childPids(pid: number): number[] {
  const out: number[] = []
  for (const name of readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue
    try {
      const ppid = /^PPid:\s+(\d+)$/m.exec(readFileSync(`/proc/${name}/status`, 'utf8'))?.[1]
      if (Number(ppid) === pid) out.push(Number(name))
    } catch {
      // exited meanwhile
    }
  }
  return out
}

export { memoryOf, resetPeakRss } from '../tools/proc.js'

const CLK_TCK = Number(spawnSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).stdout.trim()) || 100

/** CPU seconds (user + system) used so far by the given pids. */
function cpuSeconds(pids: number[]): number {
  let ticks = 0
  for (const pid of pids) {
    try {
      // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
      const stat = readFileSync(`/proc/${pid}/stat`, 'utf8')
      const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
      ticks += Number(fields[11]) + Number(fields[12])
    } catch {
      // exited
    }
  }
  return ticks / CLK_TCK
}

/** Machine-wide busy and total jiffies from /proc/stat, for "how busy was the box". */
function machineCpu(): { busy: number; total: number } {
  const line = readFileSync('/proc/stat', 'utf8').split('\n')[0] ?? ''
  const v = line.trim().split(/\s+/).slice(1).map(Number)
  const total = v.reduce((a, b) => a + b, 0)
  const idle = (v[3] ?? 0) + (v[4] ?? 0)
  return { busy: total - idle, total }
}

export interface WrkResult {
  requestsPerSec: number
  transferMiBPerSec: number
  requests: number
  latencyAvgMs: number
  latencyMaxMs: number
  p50Ms: number
  p99Ms: number
  non2xx: number
  socketErrors: string | undefined
  /** CPU seconds per wall second used by the server's processes during the run. */
  serverCpu: number
  /** Share of all the machine's CPU time that was busy during the run (0..1). */
  machineBusy: number
  /** Share of the machine's CPU busy in the last 1 s before the run, with nothing of ours running: other load. */
  backgroundBusy: number | undefined
  /** How long the run waited for the machine to quieten down. */
  waitedMs: number
}

function toMs(value: string): number {
  const m = /^([\d.]+)(us|ms|s|m)$/.exec(value)
  if (!m) return NaN
  const n = Number(m[1])
  return m[2] === 'us' ? n / 1000 : m[2] === 'ms' ? n : m[2] === 's' ? n * 1000 : n * 60_000
}

function toMiB(value: string): number {
  const m = /^([\d.]+)(B|KB|MB|GB|TB)$/.exec(value)
  if (!m) return NaN
  const scale: Record<string, number> = { B: 1 / MiB, KB: 1 / 1024, MB: 1, GB: 1024, TB: 1024 * 1024 }
  return Number(m[1]) * (scale[m[2] ?? 'B'] ?? NaN)
}

/** Parses wrk 4.x output (run with `--latency`). */
function parseWrk(out: string): Omit<WrkResult, 'serverCpu' | 'machineBusy' | 'backgroundBusy' | 'waitedMs'> {
  const rps = /^Requests\/sec:\s+([\d.]+)/m.exec(out)?.[1]
  const transfer = /^Transfer\/sec:\s+(\S+)/m.exec(out)?.[1]
  const latency = /^\s+Latency\s+(\S+)\s+(\S+)\s+(\S+)/m.exec(out)
  const requests = /^\s+(\d+) requests in/m.exec(out)?.[1]
  if (rps === undefined || transfer === undefined || latency === null || requests === undefined) {
    throw new Error(`cannot parse wrk output:\n${out}`)
  }
  return {
    requestsPerSec: Number(rps),
    transferMiBPerSec: toMiB(transfer),
    requests: Number(requests),
    latencyAvgMs: toMs(latency[1] ?? ''),
    latencyMaxMs: toMs(latency[3] ?? ''),
    p50Ms: toMs(/^\s+50%\s+(\S+)/m.exec(out)?.[1] ?? ''),
    p99Ms: toMs(/^\s+99%\s+(\S+)/m.exec(out)?.[1] ?? ''),
    non2xx: Number(/^\s+Non-2xx or 3xx responses:\s+(\d+)/m.exec(out)?.[1] ?? 0),
    socketErrors: /^\s+Socket errors:\s+(.*)$/m.exec(out)?.[1],
  }
}

/**
 * Waits, in 1 s windows, until other processes use less than `threshold` of the machine's CPU
 * (our servers are idle meanwhile), or `maxMs` passed. Returns the last window's busy share.
 */
async function waitQuiet(maxMs: number, threshold: number): Promise<{ busy: number; waitedMs: number }> {
  const t0 = performance.now()
  for (;;) {
    const b0 = machineCpu()
    await sleep(1000)
    const b1 = machineCpu()
    const busy = (b1.busy - b0.busy) / Math.max(1, b1.total - b0.total)
    const waitedMs = performance.now() - t0
    if (busy < threshold || waitedMs >= maxMs) return { busy, waitedMs }
  }
}

/**
 * One `wrk --latency` run against `url`, with the server's CPU use over the same interval;
 * with `quiet`, first waits for a quieter machine (see {@link waitQuiet}).
 */
export async function runWrk(
  children: Children,
  o: { url: string; threads: number; connections: number; seconds: number; serverPids: number[]; quiet?: { maxMs: number; threshold: number } },
): Promise<WrkResult> {
  const quiet = o.quiet ? await waitQuiet(o.quiet.maxMs, o.quiet.threshold) : undefined
  const cpu0 = cpuSeconds(o.serverPids)
  const m0 = machineCpu()
  const t0 = performance.now()
  const child = children.spawn('/usr/bin/wrk', [`-t${o.threads}`, `-c${o.connections}`, `-d${o.seconds}s`, '--timeout', '10s', '--latency', o.url])
  let out = ''
  child.stdout?.on('data', (c: Buffer) => (out += c.toString()))
  child.stderr?.on('data', (c: Buffer) => (out += c.toString()))
  const code = await new Promise<number | null>((r) => child.once('close', (c) => r(c)))
  const wall = (performance.now() - t0) / 1000
  const cpu1 = cpuSeconds(o.serverPids)
  const m1 = machineCpu()
  if (code !== 0) throw new Error(`wrk exited with ${code}:\n${out}`)
  return {
    ...parseWrk(out),
    serverCpu: (cpu1 - cpu0) / wall,
    machineBusy: (m1.busy - m0.busy) / Math.max(1, m1.total - m0.total),
    backgroundBusy: quiet?.busy,
    waitedMs: quiet?.waitedMs ?? 0,
  }
}

/** Fetches `url` until it answers with `X-Cache: HIT` (a fill commits just after its last byte). */
export async function waitForHit(url: string, digest: string): Promise<Fetched> {
  for (let i = 0; i < 100; i++) {
    const res = await fetchHashed(url)
    if (res.status !== 200 || res.digest !== digest) throw new Error(`GET ${url}: HTTP ${res.status}, body ${res.digest}, expected ${digest}`)
    if (res.headers['x-cache'] === 'HIT') return res
    await sleep(50)
  }
  throw new Error(`${url} never became a cache hit`)
}

export function fmt(n: number, digits = 0): string {
  return Number.isFinite(n) ? n.toLocaleString('en-US', { minimumFractionDigits: digits, maximumFractionDigits: digits }) : 'n/a'
}

/**
 * How fast this machine runs right now: ms for a fixed mix of JavaScript and hashing (the kinds
 * of work a hit does), the best of three. Only to tell rounds apart: a round that took twice as
 * long here ran on a host twice as busy.
 */
export function hostProbeMs(): number {
  const data = pseudoRandom(4 * MiB, 'probe')
  let best = Infinity
  for (let k = 0; k < 3; k++) {
    const t0 = performance.now()
    let acc = 0
    for (let i = 0; i < 200_000; i++) acc += JSON.stringify({ i, s: 'x'.repeat(i % 16) }).length
    sha256(data)
    if (acc === 0) throw new Error('unreachable')
    best = Math.min(best, performance.now() - t0)
  }
  return best
}

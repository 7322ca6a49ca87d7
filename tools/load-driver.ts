/**
 * The load driver shared by the CI load test (test/integration/load.test.ts) and the longer
 * soak (bench/soak.ts): the real binary as a child process, keep-alive clients that hash what
 * they receive, and /proc readings of the child. 127.0.0.1 only; every loop is bounded.
 */
import { spawn, type ChildProcess } from 'node:child_process'
import { createHash } from 'node:crypto'
import { closeSync, existsSync, openSync, readFileSync, readdirSync, rmSync } from 'node:fs'
import { Agent, request } from 'node:http'
import type { Socket } from 'node:net'
import { freePort } from './net.js'

export const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms))

/** Open descriptors and resident memory of a process, from /proc. */
export interface ProcReading {
  fds: number
  rssBytes: number
}

export function readProc(pid: number): ProcReading {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8')
  const rssKiB = Number(/^VmRSS:\s+(\d+) kB$/m.exec(status)?.[1] ?? NaN)
  return { fds: readdirSync(`/proc/${pid}/fd`).length, rssBytes: rssKiB * 1024 }
}

export interface Fetched {
  status: number
  /** `sha256:<hex>` of the body, hashed as it arrived. */
  digest: string
  bytes: number
  ms: number
  socket: Socket | undefined
  error?: string
}

/** One GET through `agent`, hashing the body; never rejects (a failure is in `error`). */
export function fetchHashed(url: string, agent: Agent | false): Promise<Fetched> {
  const started = performance.now()
  return new Promise((resolve) => {
    let socket: Socket | undefined
    const fail = (error: string): void => resolve({ status: 0, digest: '', bytes: 0, ms: performance.now() - started, socket, error })
    const req = request(url, { agent }, (res) => {
      const hash = createHash('sha256')
      let bytes = 0
      res.on('data', (chunk: Buffer) => {
        hash.update(chunk)
        bytes += chunk.length
      })
      res.on('end', () => resolve({ status: res.statusCode ?? 0, digest: `sha256:${hash.digest('hex')}`, bytes, ms: performance.now() - started, socket }))
      res.on('error', (err) => fail(err.message))
      res.on('aborted', () => fail('aborted'))
    })
    req.on('socket', (s: Socket) => {
      socket = s
    })
    req.on('error', (err) => fail(err.message))
    req.end()
  })
}

/** A running `dist/main.js`. */
export interface Binary {
  child: ChildProcess
  pid: number
  port: number
  base: string
  /** SIGTERM, then SIGKILL after `graceMs`; resolves when it exited. */
  stop(graceMs?: number): Promise<void>
  /** With `memoryProbe`: a full GC in the child, then its `process.memoryUsage()`. */
  memory(): Promise<NodeJS.MemoryUsage>
}

/**
 * Test instrumentation loaded into the child with `--import` (the product is unchanged): on
 * SIGUSR2, a full GC, then `process.memoryUsage()` written to the file named by
 * `MEMORY_PROBE_FILE`. What is still held after a full GC is what a leak would hold.
 */
const MEMORY_PROBE =
  'data:text/javascript,import { writeFileSync } from "node:fs"; process.on("SIGUSR2", () => { globalThis.gc(); globalThis.gc(); ' +
  'writeFileSync(process.env.MEMORY_PROBE_FILE, JSON.stringify(process.memoryUsage())) })'

/** Starts the real binary over `configPath` and waits until `/readyz` answers 200. */
export async function startBinary(o: {
  main: string
  configPath: string
  cacheDir: string
  limit: string
  logFile?: string
  memoryProbe?: string
}): Promise<Binary> {
  const port = await freePort()
  const out = o.logFile ? openSync(o.logFile, 'a') : 'ignore'
  const probe = o.memoryProbe
  const child = spawn(
    process.execPath,
    [
      ...(probe ? ['--expose-gc', `--import=${MEMORY_PROBE}`] : []),
      o.main,
      `--listen-address=127.0.0.1:${port}`,
      `--cache-directory=${o.cacheDir}`,
      `--cache-retention-size=${o.limit}`,
      `--registry-config=${o.configPath}`,
      '--log-level=warn',
    ],
    {
      stdio: ['ignore', out, out],
      // Never in-cluster mode or an inherited flag, even when the tests themselves run in a pod.
      env: {
        ...Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('KUBERNETES_') && !k.startsWith('RPP_') && !/_proxy$/i.test(k))),
        ...(probe ? { MEMORY_PROBE_FILE: probe } : {}),
      },
    },
  )
  if (typeof out === 'number') closeSync(out)
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()))
  const stop = async (graceMs = 10_000): Promise<void> => {
    if (child.exitCode !== null || child.signalCode !== null) return
    child.kill('SIGTERM')
    const timer = setTimeout(() => child.kill('SIGKILL'), graceMs)
    await exited
    clearTimeout(timer)
  }
  const memory = async (): Promise<NodeJS.MemoryUsage> => {
    if (!probe) throw new Error('started without memoryProbe')
    rmSync(probe, { force: true })
    child.kill('SIGUSR2')
    for (let i = 0; i < 200 && !existsSync(probe); i++) await sleep(25)
    // The file is written in one call; a reader may still catch it half-written.
    for (let i = 0; ; i++) {
      try {
        return JSON.parse(readFileSync(probe, 'utf8')) as NodeJS.MemoryUsage
      } catch (err) {
        if (i >= 20) throw err
        await sleep(25)
      }
    }
  }
  const base = `http://127.0.0.1:${port}`
  for (let i = 0; i < 600; i++) {
    if (child.exitCode !== null) throw new Error(`the proxy exited with code ${child.exitCode}`)
    const r = await fetchHashed(`${base}/readyz`, false)
    if (r.status === 200) return { child, pid: child.pid ?? -1, port, base, stop, memory }
    await sleep(50)
  }
  await stop(0)
  throw new Error('the proxy did not become ready in 30 s')
}

/** Samples a process's descriptors and memory every `everyMs` until stopped; keeps the peaks. */
export class ProcSampler {
  peakFds = 0
  peakRss = 0
  readonly #timer: NodeJS.Timeout

  constructor(pid: number, everyMs = 50) {
    this.#timer = setInterval(() => {
      try {
        const r = readProc(pid)
        this.peakFds = Math.max(this.peakFds, r.fds)
        this.peakRss = Math.max(this.peakRss, r.rssBytes)
      } catch {
        // exited meanwhile
      }
    }, everyMs)
  }

  stop(): void {
    clearInterval(this.#timer)
  }
}

/** Waits until the child's descriptors are back to at most `target`; returns the last count. */
export async function settleFds(pid: number, target: number, timeoutMs: number): Promise<number> {
  const deadline = Date.now() + timeoutMs
  let fds = readProc(pid).fds
  while (fds > target && Date.now() < deadline) {
    await sleep(100)
    fds = readProc(pid).fds
  }
  return fds
}

/**
 * Waits until the child's resident memory is back to at most `target` bytes; returns the last
 * reading. V8 gives memory back once the process is idle for a moment (its memory reducer), so
 * after a burst this is "how much is still held", not "how much was ever used".
 */
export async function settleRss(pid: number, target: number, timeoutMs: number): Promise<number> {
  const deadline = Date.now() + timeoutMs
  let rss = readProc(pid).rssBytes
  while (rss > target && Date.now() < deadline) {
    await sleep(250)
    rss = readProc(pid).rssBytes
  }
  return rss
}

/** Percentile of a list of numbers (nearest rank). */
export function percentile(values: number[], p: number): number {
  if (values.length === 0) return NaN
  const sorted = [...values].sort((a, b) => a - b)
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1))] ?? NaN
}

export interface LoadResult {
  requests: number
  ok: number
  wrong: number
  failed: number
  sockets: number
  latencies: number[]
  errors: string[]
}

/**
 * `connections` keep-alive connections, opened at once, each making `perConnection` requests
 * in turn (every round is `connections` concurrent requests). A response is counted ok only if
 * it is a 200 whose body hashes to what `expect` says for its URL.
 */
export async function keepAliveLoad(o: { urls: string[]; expect: (url: string) => string; connections: number; perConnection: number }): Promise<LoadResult> {
  const agent = new Agent({ keepAlive: true, maxSockets: o.connections, maxFreeSockets: o.connections, timeout: 60_000 })
  const sockets = new Set<Socket>()
  const result: LoadResult = { requests: 0, ok: 0, wrong: 0, failed: 0, sockets: 0, latencies: [], errors: [] }
  try {
    for (let round = 0; round < o.perConnection; round++) {
      const replies = await Promise.all(
        Array.from({ length: o.connections }, (_, i) => {
          const url = o.urls[(i + round) % o.urls.length] ?? ''
          return fetchHashed(url, agent).then((r) => ({ url, r }))
        }),
      )
      for (const { url, r } of replies) {
        result.requests++
        if (r.socket) sockets.add(r.socket)
        result.latencies.push(r.ms)
        if (r.error !== undefined || r.status === 0) {
          result.failed++
          if (result.errors.length < 5) result.errors.push(r.error ?? 'no status')
        } else if (r.status === 200 && r.digest === o.expect(url)) result.ok++
        else {
          result.wrong++
          if (result.errors.length < 5) result.errors.push(`${r.status} ${url}`)
        }
      }
    }
  } finally {
    result.sockets = sockets.size
    agent.destroy()
  }
  return result
}

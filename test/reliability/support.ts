/**
 * Helpers for the reliability suite: an in-process proxy with every server option reachable
 * (the shared harness fixes some), a canary that proves no outbound connection was made, and
 * /proc readings of sockets, descriptors and memory. Linux only, 127.0.0.1 only.
 */
import { existsSync, readFileSync, readdirSync, statSync, writeFileSync } from 'node:fs'
import { connect as connectTcp, createServer as createNetServer, type Server as NetServer, type Socket } from 'node:net'
import { join, relative } from 'node:path'
import { pino, type Logger } from 'pino'
import { createServer, type ProxyServer, type ServerOptions } from '../../server.js'
import { FakeRegistry, type FakeAuth } from '../fixtures/fake-registry.js'
import { DEFAULT_PREFIX, MODULE_PREFIX, dockerConfig, type HarnessCredentials, type HarnessTest } from '../fixtures/proxy-harness.js'

export interface ProxyOptions extends Partial<Omit<ServerOptions, 'cacheDirectory' | 'registryConfig' | 'logger'>> {
  auth?: FakeAuth
  now?: () => number
  registry?: FakeRegistry
  logger?: Logger
  /** Credentials written into both sources' docker configs. */
  credentials?: HarnessCredentials
  /** The registry address the sources name (default the fake registry's own host). */
  address?: string
}

export interface Proxy {
  registry: FakeRegistry
  proxy: ProxyServer
  dir: string
  cacheDirectory: string
  defaultRepository: string
  moduleRepository: string
}

/**
 * A fake registry and a proxy over it (`default` = `<host>/deckhouse/ce`, a module source at
 * `<host>/modules/example`), like the shared harness, but taking any {@link ServerOptions}.
 */
export async function startProxy(t: HarnessTest, o: ProxyOptions = {}): Promise<Proxy> {
  const { auth, now, registry: given, logger, credentials, address, ...server } = o
  const registry = given ?? (await FakeRegistry.start({ ...(auth ? { auth } : {}), ...(now ? { now } : {}) }))
  if (!given) t.teardown(() => registry.close())
  const host = address ?? registry.host
  const dir = t.testdir()
  const cacheDirectory = join(dir, 'cache')
  const configPath = join(dir, 'registry.json')
  writeFileSync(
    configPath,
    JSON.stringify({
      default: {
        address: host,
        path: `/${DEFAULT_PREFIX}`,
        scheme: 'http',
        ...(credentials ? { dockerConfigJson: dockerConfig(host, credentials) } : {}),
      },
      moduleSources: [
        {
          name: 'example',
          repo: `${host}/${MODULE_PREFIX}`,
          scheme: 'http',
          ...(credentials ? { dockerCfg: Buffer.from(dockerConfig(host, credentials)).toString('base64') } : {}),
        },
      ],
    }),
  )
  const proxy = await createServer({
    limitBytes: 64 * 1024 * 1024,
    env: {},
    collectDefaultMetrics: false,
    flushIntervalMs: 60_000,
    ...server,
    timeouts: { connectMs: 2000, headersMs: 5000, idleMs: 5000, ...server.timeouts },
    cacheDirectory,
    registryConfig: configPath,
    logger: logger ?? pino({ level: 'silent' }),
  })
  t.teardown(() => proxy.server.stop({ timeout: 2000 }))
  return {
    registry,
    proxy,
    dir,
    cacheDirectory,
    defaultRepository: `${host}/${DEFAULT_PREFIX}`,
    moduleRepository: `${host}/${MODULE_PREFIX}`,
  }
}

/**
 * A TCP server that counts every connection made to it and closes it at once. Set as
 * `HTTP_PROXY`/`HTTPS_PROXY` of the proxy under test (with the fake registry in `NO_PROXY`),
 * it receives any outbound connection to anything but the configured registry: to another
 * host, another port, a metadata address. Its count must stay 0.
 */
export class Canary {
  connections = 0
  readonly #server: NetServer
  readonly #sockets = new Set<Socket>()

  private constructor() {
    this.#server = createNetServer((socket) => {
      this.connections++
      this.#sockets.add(socket)
      socket.on('error', () => undefined)
      socket.on('close', () => this.#sockets.delete(socket))
      socket.destroy()
    })
  }

  static async start(): Promise<Canary> {
    const canary = new Canary()
    await new Promise<void>((resolve) => canary.#server.listen(0, '127.0.0.1', resolve))
    return canary
  }

  get port(): number {
    const address = this.#server.address()
    return typeof address === 'object' && address ? address.port : 0
  }

  get url(): string {
    return `http://127.0.0.1:${this.port}`
  }

  /** An environment that routes every registry connection except `allowedHost` to the canary. */
  env(allowedHost: string): NodeJS.ProcessEnv {
    return { HTTP_PROXY: this.url, HTTPS_PROXY: this.url, NO_PROXY: allowedHost }
  }

  async close(): Promise<void> {
    for (const s of this.#sockets) s.destroy()
    await new Promise<void>((resolve) => this.#server.close(() => resolve()))
  }
}

/** TCP states (from include/net/tcp_states.h) in which a socket still holds a descriptor. */
const LIVE_STATES = new Set(['01', '02', '03', '04', '05', '07', '08', '09', '0B'])

/**
 * Live client-side TCP connections to 127.0.0.1:`port` in this network namespace (from
 * /proc/net/tcp): the proxy's sockets to a registry, whatever state they are in, except the
 * descriptor-less TIME_WAIT. A socket the proxy forgot to destroy shows here as ESTABLISHED or
 * CLOSE_WAIT for as long as it leaks.
 */
export function connectionsTo(port: number): number {
  const hexPort = port.toString(16).toUpperCase().padStart(4, '0')
  let n = 0
  for (const line of readFileSync('/proc/net/tcp', 'utf8').split('\n').slice(1)) {
    const fields = line.trim().split(/\s+/)
    const remote = fields[2]
    const state = fields[3]
    if (remote === `0100007F:${hexPort}` && state !== undefined && LIVE_STATES.has(state)) n++
  }
  return n
}

/** Open file descriptors of a process (default this one). */
export function fdCount(pid: number | 'self' = 'self'): number {
  return readdirSync(`/proc/${pid}/fd`).length
}

/** Resident set size of a process in bytes. */
export function rssBytes(pid: number | 'self' = 'self'): number {
  const kib = /^VmRSS:\s+(\d+) kB$/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1]
  return Number(kib ?? NaN) * 1024
}

/** The soft limit on open files of this process (children inherit it). */
export function openFilesLimit(): number {
  const m = /^Max open files\s+(\d+|unlimited)/m.exec(readFileSync('/proc/self/limits', 'utf8'))
  return m?.[1] === 'unlimited' || m?.[1] === undefined ? Number.MAX_SAFE_INTEGER : Number(m[1])
}

/** Every file under `dir`, relative, with its size: a snapshot to diff. */
export function tree(dir: string): Map<string, number> {
  const out = new Map<string, number>()
  const walk = (d: string): void => {
    if (!existsSync(d)) return
    for (const name of readdirSync(d)) {
      const path = join(d, name)
      const st = statSync(path, { throwIfNoEntry: false })
      if (!st) continue
      if (st.isDirectory()) walk(path)
      else out.set(relative(dir, path), st.size)
    }
  }
  walk(dir)
  return out
}

/** Polls `check` until it holds, or throws naming `what` after `timeoutMs`. */
export async function eventually(check: () => boolean | Promise<boolean>, what: string, timeoutMs = 10_000, everyMs = 50): Promise<void> {
  const deadline = Date.now() + timeoutMs
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting until ${what}`)
    await new Promise((resolve) => setTimeout(resolve, everyMs))
  }
}

/** A fixed fast-check seed (override with `FC_SEED`), so a failure reproduces exactly. */
export function fuzzSeed(): number {
  const fromEnv = Number(process.env.FC_SEED)
  return Number.isInteger(fromEnv) && process.env.FC_SEED !== undefined ? fromEnv : 20_250_601
}

/** The reliability tests take the harness's never-rejecting request (agent and first-byte hook included) from here. */
export { fetchRaw } from '../fixtures/proxy-harness.js'

/**
 * A TCP forwarder to 127.0.0.1:`target` that resets every connection on which a second request
 * begins: to the client, a keep-alive connection the server closed just as it was reused (the
 * race every pooled HTTP client meets), made deterministic.
 */
export class ReuseKiller {
  killed = 0
  readonly #server: NetServer
  readonly #sockets = new Set<Socket>()

  private constructor(target: number) {
    this.#server = createNetServer((client) => {
      const upstream = connectTcp(target, '127.0.0.1')
      for (const s of [client, upstream]) {
        this.#sockets.add(s)
        s.on('error', () => undefined)
        s.on('close', () => this.#sockets.delete(s))
      }
      let requests = 0
      client.on('data', (chunk: Buffer) => {
        // The proxy writes each request head in one piece, so a request starts a chunk.
        if (/^[A-Z]+ \S+ HTTP\/1\.1\r\n/.test(chunk.toString('latin1'))) requests++
        if (requests >= 2) {
          this.killed++
          upstream.destroy()
          client.resetAndDestroy()
          return
        }
        upstream.write(chunk)
      })
      upstream.on('data', (d: Buffer) => client.write(d))
      upstream.on('end', () => client.end())
      client.on('close', () => upstream.destroy())
    })
  }

  static async start(target: number): Promise<ReuseKiller> {
    const killer = new ReuseKiller(target)
    await new Promise<void>((resolve) => killer.#server.listen(0, '127.0.0.1', resolve))
    return killer
  }

  get host(): string {
    const address = this.#server.address()
    return `127.0.0.1:${typeof address === 'object' && address ? address.port : 0}`
  }

  async close(): Promise<void> {
    for (const s of this.#sockets) s.destroy()
    await new Promise<void>((resolve) => this.#server.close(() => resolve()))
  }
}

import http from 'node:http'
import https from 'node:https'
import type { Duplex } from 'node:stream'
import { checkServerIdentity, rootCertificates, type PeerCertificate } from 'node:tls'
import { HttpsProxyAgent } from 'https-proxy-agent'
import { TimeoutError } from '../../../errors.js'

/** How long the proxy waits on a registry; each expiry becomes a 504. */
export interface RegistryTimeouts {
  /** TCP connection established. */
  connectMs: number
  /** Response headers received after the request was sent (includes connecting). */
  headersMs: number
  /** Longest gap between two chunks of a body. */
  idleMs: number
}

export const DEFAULT_TIMEOUTS: RegistryTimeouts = { connectMs: 10_000, headersMs: 30_000, idleMs: 60_000 }

type CreateConnection = (options: object, cb: (err: Error | null, socket: Duplex) => void) => Duplex

/**
 * Arms a connect timer on every socket the agent creates. Node has no connect timeout of its
 * own; a registry behind a black-holing firewall would otherwise hold a fill until the OS
 * gives up minutes later.
 */
function withConnectTimeout<A extends http.Agent>(agent: A, ms: number): A {
  const original = (agent as unknown as { createConnection: CreateConnection }).createConnection.bind(agent)
  ;(agent as unknown as { createConnection: CreateConnection }).createConnection = (options, cb) => {
    const socket = original(options, cb)
    const timer = setTimeout(() => socket.destroy(new TimeoutError('connect', ms)), ms)
    timer.unref()
    const clear = (): void => clearTimeout(timer)
    socket.once('connect', clear)
    socket.once('close', clear)
    return socket
  }
  return agent
}

/**
 * An HTTPS agent through a CONNECT proxy that verifies the registry with the source's CA.
 * https-proxy-agent's constructor options are for the connection to the proxy itself; the TLS
 * session with the registry inside the tunnel takes the request's options, which carry no CA
 * from axios. So the CA is added to those here (found from outside: a private-CA registry
 * behind HTTPS_PROXY failed with UNABLE_TO_VERIFY_LEAF_SIGNATURE).
 */
class TunnelAgent extends HttpsProxyAgent<string> {
  readonly #ca: string[] | undefined

  constructor(proxy: string, ca: string[] | undefined) {
    super(proxy, { keepAlive: true })
    this.#ca = ca
  }

  override connect(req: http.ClientRequest, opts: Parameters<HttpsProxyAgent<string>['connect']>[1]): ReturnType<HttpsProxyAgent<string>['connect']> {
    if (!opts.secureEndpoint) return super.connect(req, opts)
    // The tunnel's TLS options drop `host`, so Node would check the certificate against
    // "localhost"; check it against the registry's own host (an IP address included).
    const host = opts.host ?? ''
    return super.connect(req, {
      ...opts,
      ...(this.#ca ? { ca: this.#ca } : {}),
      checkServerIdentity: (_name: string, cert: PeerCertificate) => checkServerIdentity(host, cert),
    })
  }
}

/** The axios transport options for one URL: agents, and a forward proxy for plain HTTP. */
export interface TransportOptions {
  httpAgent?: http.Agent
  httpsAgent?: https.Agent
  proxy: false | { protocol: string; host: string; port: number }
}

/**
 * Keeps one keep-alive agent pair per trust configuration (system roots, or system roots plus
 * a source's CA) and decides per URL whether `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY` apply.
 * Agents are reused so connections to a registry stay warm across requests.
 */
export class Transport {
  readonly #timeouts: RegistryTimeouts
  readonly #env: NodeJS.ProcessEnv
  readonly #agents = new Map<string, { http: http.Agent; https: https.Agent }>()
  readonly #proxyAgents = new Map<string, https.Agent>()

  constructor(timeouts: RegistryTimeouts, env: NodeJS.ProcessEnv = process.env) {
    this.#timeouts = timeouts
    this.#env = env
  }

  #caList(ca: string | undefined): string[] | undefined {
    return ca ? [...rootCertificates, ca] : undefined
  }

  #direct(ca: string | undefined): { http: http.Agent; https: https.Agent } {
    const key = ca ?? ''
    let pair = this.#agents.get(key)
    if (!pair) {
      const caList = this.#caList(ca)
      pair = {
        http: withConnectTimeout(new http.Agent({ keepAlive: true, maxSockets: 64 }), this.#timeouts.connectMs),
        https: withConnectTimeout(new https.Agent({ keepAlive: true, maxSockets: 64, ...(caList ? { ca: caList } : {}) }), this.#timeouts.connectMs),
      }
      this.#agents.set(key, pair)
    }
    return pair
  }

  #proxyFor(url: string): string | undefined {
    return proxyForUrl(url, this.#env)
  }

  /** Options for one request to `url`, trusting `ca` in addition to the system roots. */
  optionsFor(url: string, ca: string | undefined): TransportOptions {
    const proxy = this.#proxyFor(url)
    const direct = this.#direct(ca)
    if (!proxy) return { httpAgent: direct.http, httpsAgent: direct.https, proxy: false }
    const target = new URL(url)
    if (target.protocol === 'https:') {
      // HTTPS goes through the proxy with CONNECT, so TLS (and the source's CA) is end to end.
      const key = `${proxy}\n${ca ?? ''}`
      let agent = this.#proxyAgents.get(key)
      if (!agent) {
        agent = new TunnelAgent(proxy, this.#caList(ca))
        this.#proxyAgents.set(key, agent)
      }
      return { httpsAgent: agent, proxy: false }
    }
    const p = new URL(proxy)
    return {
      httpAgent: direct.http,
      proxy: { protocol: p.protocol.replace(/:$/, ''), host: p.hostname, port: Number(p.port || (p.protocol === 'https:' ? 443 : 80)) },
    }
  }

  /** Closes pooled sockets so the process can exit promptly. */
  close(): void {
    for (const pair of this.#agents.values()) {
      pair.http.destroy()
      pair.https.destroy()
    }
    for (const agent of this.#proxyAgents.values()) agent.destroy()
    this.#agents.clear()
    this.#proxyAgents.clear()
  }
}

/**
 * The proxy URL for `url` under `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY` (either case), with the
 * matching rules curl uses: `*` disables proxying; an entry matches the host exactly or as a
 * domain suffix (`example.com`, `.example.com`, `*.example.com`); `host:port` also checks the
 * port. Read per request so a changed environment in tests needs no restart.
 */
export function proxyForUrl(url: string, env: NodeJS.ProcessEnv): string | undefined {
  const target = new URL(url)
  const https = target.protocol === 'https:'
  const proxy = https ? (env.HTTPS_PROXY ?? env.https_proxy) : (env.HTTP_PROXY ?? env.http_proxy)
  if (!proxy) return undefined
  const host = target.hostname.replace(/^\[|\]$/g, '').toLowerCase()
  const port = target.port || (https ? '443' : '80')
  const noProxy = (env.NO_PROXY ?? env.no_proxy ?? '').toLowerCase()
  for (const raw of noProxy.split(/[\s,]+/)) {
    if (!raw) continue
    if (raw === '*') return undefined
    // Entries: host, .domain, *.domain, host:port, [v6]:port, or a bare v6 address (no port).
    const entry = raw.replace(/^\*?\./, '.')
    const bracketed = /^\[([^\]]+)\](?::(\d+))?$/.exec(entry)
    const bareV6 = !bracketed && (entry.match(/:/g) ?? []).length > 1
    const m = bracketed ?? (bareV6 ? [entry, entry, undefined] : /^(.*?)(?::(\d+))?$/.exec(entry))
    const entryHost = m?.[1] ?? ''
    const entryPort = m?.[2]
    if (entryPort && entryPort !== port) continue
    const bare = entryHost.replace(/^\./, '')
    if (host === bare || host.endsWith(`.${bare}`)) return undefined
  }
  return proxy.includes('://') ? proxy : `http://${proxy}`
}

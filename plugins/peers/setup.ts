import { networkInterfaces, type NetworkInterfaceInfo } from 'node:os'
import { join } from 'node:path'
import type { Logger } from 'pino'
import { loadKubeConfig, SERVICE_ACCOUNT_DIR } from '../credentials/kube-config.js'
import type { InformerTiming } from '../credentials/restarting-informer.js'
import type { Metrics } from '../metrics/metrics.js'
import { peerMetrics } from '../metrics/peer-metrics.js'
import { CaFile } from './ca-file.js'
import { Membership } from './membership.js'
import { PEER_RESULTS, PeerClient, type PeerTimeouts } from './peer-client.js'
import { Peers } from './peers.js'
import { TokenFile } from './token-file.js'

/** `--peers`: a fixed list of `host:port`, plain HTTP to each listener. */
export interface StaticPeersConfig {
  members: string[]
  /** How the others name this replica (default: the server's `host:port`). */
  self?: string
  timeouts?: Partial<PeerTimeouts>
  downMs?: number
}

/**
 * In a pod: the ready pods of this Deployment, from the Kubernetes API, reached through their
 * kube-rbac-proxy over HTTPS with this pod's service-account token.
 */
export interface KubePeersConfig {
  /** `--peer-ca-file`: the CA that signs the proxies' serving certificates (re-read when it changes). */
  caFile: string
  /** How often the CA file is looked at (default 5 s). */
  caCheckMs?: number
  /** `--peer-server-name`: the DNS name those certificates carry (default: the pod IP). */
  serverName?: string
  /** Default: the in-cluster service-account token. */
  tokenFile?: string
  tokenRefreshMs?: number
  /** kube-rbac-proxy's port (default 4219; tests use others). */
  port?: number
  timing?: Partial<InformerTiming>
  timeouts?: Partial<PeerTimeouts>
  downMs?: number
}

/** What the peers plugin runs: the port the package core uses, its client, and a watch if any. */
export interface PeerFill {
  peers: Peers
  client: PeerClient
  watch?: { start(): void; stop(): Promise<void> }
}

function build(membership: Membership, client: PeerClient, metrics: Metrics, log: Logger): Peers {
  const m = peerMetrics(metrics, PEER_RESULTS, () => membership.live().length)
  return new Peers({
    membership,
    client,
    log,
    onResult: (result) => m.requests.inc({ result }),
    onFillBytes: (bytes) => m.fillBytes.inc(bytes),
  })
}

/** `host` without the brackets of an IPv6 address. */
function hostOf(member: string): { host: string; port: number } {
  const colon = member.lastIndexOf(':')
  return { host: member.slice(0, colon).replace(/^\[|\]$/g, ''), port: Number(member.slice(colon + 1)) }
}

/**
 * This replica among `members`, listening on `host:port`. A named host is itself. On every
 * interface (0.0.0.0, ::) the others name it by one of its addresses: the first member with
 * this port and an address of `interfaces` is itself, and any other such member is the same
 * replica under another name and is dropped (else it would be a peer that is this replica,
 * asked and waited on). With none, the listen address stands for it, as before.
 */
export function selfAmong(
  members: readonly string[],
  host: string,
  port: number,
  interfaces: NodeJS.Dict<NetworkInterfaceInfo[]> = networkInterfaces(),
): { self: string; members: string[] } {
  const listen = host.includes(':') ? `[${host}]:${port}` : `${host}:${port}`
  if (host !== '0.0.0.0' && host !== '::') return { self: listen, members: [...members] }
  const local = new Set(Object.values(interfaces).flatMap((list) => (list ?? []).map((i) => i.address)))
  const aliases = members.filter((m) => {
    const a = hostOf(m)
    return a.port === port && local.has(a.host)
  })
  const self = aliases[0]
  if (self === undefined) return { self: listen, members: [...members] }
  return { self, members: members.filter((m) => m === self || !aliases.includes(m)) }
}

/** Peer fill among the replicas of `--peers`; `listen` is this server's `host:port`. */
export function staticPeers(config: StaticPeersConfig, listen: string, metrics: Metrics, log: Logger): PeerFill {
  const { host, port } = hostOf(listen)
  const found = config.self !== undefined ? { self: config.self, members: config.members } : selfAmong(config.members, host, port)
  const membership = new Membership({ self: found.self, members: found.members, ...(config.downMs !== undefined ? { downMs: config.downMs } : {}) })
  const client = new PeerClient(config.timeouts)
  return { peers: build(membership, client, metrics, log), client }
}

export interface KubePeersContext {
  kubeconfig?: string
  env: NodeJS.ProcessEnv
  serviceAccountDir?: string
  metrics: Metrics
  log: Logger
}

/**
 * Peer fill among the pods of this Deployment, or undefined (logged) when this process is not
 * in Kubernetes or lacks `POD_NAMESPACE` and `POD_IP` (the downward API sets both): without
 * them it cannot tell its namespace or which pod is itself.
 */
export async function kubePeers(config: KubePeersConfig, o: KubePeersContext): Promise<PeerFill | undefined> {
  const namespace = o.env.POD_NAMESPACE ?? ''
  const podIp = o.env.POD_IP ?? ''
  const kubeConfig = await loadKubeConfig({
    ...(o.kubeconfig ? { kubeconfig: o.kubeconfig } : {}),
    env: o.env,
    ...(o.serviceAccountDir ? { serviceAccountDir: o.serviceAccountDir } : {}),
  })
  if (!kubeConfig || namespace === '' || podIp === '') {
    o.log.warn(
      { kubernetes: kubeConfig !== undefined, POD_NAMESPACE: namespace || undefined, POD_IP: podIp || undefined },
      'peer fill off: it needs the Kubernetes API, POD_NAMESPACE and POD_IP',
    )
    return undefined
  }
  // A missing or bad file fails start-up here; later changes are picked up as they come.
  const ca = new CaFile({
    path: config.caFile,
    log: o.log.child({ component: 'peers' }),
    ...(config.caCheckMs !== undefined ? { checkMs: config.caCheckMs } : {}),
  })
  // Loaded only here: client-node is not imported outside Kubernetes.
  const { KubeMembers, memberAddress } = await import('./kube-members.js')
  const membership = new Membership({ self: memberAddress(podIp, config.port), members: [], ...(config.downMs !== undefined ? { downMs: config.downMs } : {}) })
  const token = new TokenFile({
    path: config.tokenFile ?? join(o.serviceAccountDir ?? SERVICE_ACCOUNT_DIR, 'token'),
    ...(config.tokenRefreshMs !== undefined ? { refreshMs: config.tokenRefreshMs } : {}),
  })
  const client = new PeerClient(config.timeouts, { ca, token, ...(config.serverName ? { serverName: config.serverName } : {}) })
  const watch = new KubeMembers({
    kubeConfig,
    namespace,
    membership,
    log: o.log.child({ component: 'peers' }),
    metrics: o.metrics,
    ...(config.port !== undefined ? { port: config.port } : {}),
    ...(config.timing ? { timing: config.timing } : {}),
  })
  return { peers: build(membership, client, o.metrics, o.log), client, watch }
}

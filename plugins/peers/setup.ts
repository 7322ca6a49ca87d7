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

/** Peer fill among the replicas of `--peers`. */
export function staticPeers(config: StaticPeersConfig, self: string, metrics: Metrics, log: Logger): PeerFill {
  const membership = new Membership({ self: config.self ?? self, members: config.members, ...(config.downMs !== undefined ? { downMs: config.downMs } : {}) })
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
  const kubeConfig = await loadKubeConfig({ ...(o.kubeconfig ? { kubeconfig: o.kubeconfig } : {}), env: o.env, ...(o.serviceAccountDir ? { serviceAccountDir: o.serviceAccountDir } : {}) })
  if (!kubeConfig || namespace === '' || podIp === '') {
    o.log.warn({ kubernetes: kubeConfig !== undefined, POD_NAMESPACE: namespace || undefined, POD_IP: podIp || undefined }, 'peer fill off: it needs the Kubernetes API, POD_NAMESPACE and POD_IP')
    return undefined
  }
  // A missing or bad file fails start-up here; later changes are picked up as they come.
  const ca = new CaFile({ path: config.caFile, log: o.log.child({ component: 'peers' }), ...(config.caCheckMs !== undefined ? { checkMs: config.caCheckMs } : {}) })
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

import { isIPv6 } from 'node:net'
import { CoreV1Api, type KubeConfig, type V1Pod } from '@kubernetes/client-node'
import type { Logger } from 'pino'
import { withSignal } from '../credentials/kubernetes-source.js'
import { RestartingInformer, type InformerTiming } from '../credentials/restarting-informer.js'
import type { Metrics } from '../metrics/metrics.js'
import type { Membership } from './membership.js'

/** The label every proxy pod carries (infra/deployment.yaml). */
const PEER_LABEL_SELECTOR = 'app=registry-packages-proxy'

/** kube-rbac-proxy's port on every pod: peers are reached through it, never on loopback 5080. */
const PEER_PORT = 4219

/** `ip:port`, with brackets around an IPv6 address, as the rest of the peer code names members. */
export function memberAddress(ip: string, port = PEER_PORT): string {
  return isIPv6(ip) ? `[${ip}]:${port}` : `${ip}:${port}`
}

/**
 * The pods that may serve peers now: Running, Ready, with an IP, and not being deleted (a
 * terminating pod is draining; asking it would only cost a fallback). Sorted, so an unchanged
 * set compares equal.
 */
export function readyMembers(pods: readonly V1Pod[], port = PEER_PORT): string[] {
  const members = new Set<string>()
  for (const pod of pods) {
    const ip = pod.status?.podIP
    if (!ip || pod.status?.phase !== 'Running' || pod.metadata?.deletionTimestamp) continue
    if (!pod.status.conditions?.some((c) => c.type === 'Ready' && c.status === 'True')) continue
    members.add(memberAddress(ip, port))
  }
  return [...members].sort()
}

export interface KubeMembersOptions {
  kubeConfig: KubeConfig
  /** The pod's own namespace (`POD_NAMESPACE`, from the downward API). */
  namespace: string
  membership: Membership
  log: Logger
  metrics: Metrics
  port?: number
  timing?: Partial<InformerTiming>
}

/**
 * Peer membership from the Kubernetes API: the ready proxy pods of this namespace, watched by
 * the same restarting informer as the registry sources (client-node's own stops for good on
 * the first dropped connection). Each change replaces the {@link Membership}'s list; while the
 * API server is unreachable the last known list stays, and a peer that went away meanwhile
 * costs one fallback to the registry before it is marked down.
 */
export class KubeMembers {
  readonly #o: KubeMembersOptions
  readonly #informer: RestartingInformer<V1Pod>
  #last: string[] = []

  constructor(o: KubeMembersOptions) {
    this.#o = o
    const core = o.kubeConfig.makeApiClient(CoreV1Api)
    this.#informer = new RestartingInformer<V1Pod>({
      provider: 'pods',
      kubeConfig: o.kubeConfig,
      path: `/api/v1/namespaces/${encodeURIComponent(o.namespace)}/pods`,
      labelSelector: PEER_LABEL_SELECTOR,
      list: (signal) => core.listNamespacedPod({ namespace: o.namespace, labelSelector: PEER_LABEL_SELECTOR }, withSignal(signal)),
      onChange: (pods) => this.#apply(pods),
      log: o.log,
      metrics: o.metrics,
      ...(o.timing ? { timing: o.timing } : {}),
    })
  }

  /** True once the pods were listed (until then this replica knows no peer and asks none). */
  get synced(): boolean {
    return this.#informer.listed
  }

  start(): void {
    this.#informer.start()
  }

  async stop(): Promise<void> {
    await this.#informer.stop()
  }

  #apply(pods: readonly V1Pod[]): void {
    const next = readyMembers(pods, this.#o.port)
    if (JSON.stringify(next) === JSON.stringify(this.#last)) return
    const added = next.filter((m) => !this.#last.includes(m))
    const removed = this.#last.filter((m) => !next.includes(m))
    this.#last = next
    this.#o.membership.set(next)
    this.#o.log.info({ peers: next, added, removed }, 'peer members changed')
  }
}

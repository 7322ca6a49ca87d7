import client from 'prom-client'
import type { Metrics } from './metrics.js'

export interface PeerMetrics {
  requests: client.Counter<'result'>
  fillBytes: client.Counter
}

/**
 * The peer fill series, beside `Metrics` so the peers plugin owns them:
 * `peer_requests_total{result}` (every exchange with another replica, by how it ended; each
 * result starts at 0 so a rate of failures is there before the first one),
 * `peer_fill_bytes_total` (verified layer bytes taken from peers instead of the registry) and
 * `peer_members` (live replicas this one chooses owners among, itself included).
 */
export function peerMetrics(metrics: Metrics, results: readonly string[], members: () => number): PeerMetrics {
  const registers = [metrics.registry]
  const requests = new client.Counter({
    name: 'registry_packages_proxy_peer_requests_total',
    help: 'Requests to other replicas (peer fill) by result: ok, not-found, refused, unreachable, timeout, busy, mismatch, error.',
    labelNames: ['result'],
    registers,
  })
  for (const result of results) requests.inc({ result }, 0)
  const fillBytes = new client.Counter({
    name: 'registry_packages_proxy_peer_fill_bytes_total',
    help: 'Layer bytes taken from other replicas, verified against their digest, instead of from the registry.',
    registers,
  })
  new client.Gauge({
    name: 'registry_packages_proxy_peer_members',
    help: 'Live replicas that layer owners are chosen among, this one included (1 without --peers).',
    registers,
    collect() {
      this.set(members())
    },
  })
  return { requests, fillBytes }
}

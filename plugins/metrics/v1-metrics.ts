import client from 'prom-client'
import type { Metrics } from './metrics.js'

const NAME = 'registry_packages_proxy_v1_results_total'

/**
 * `registry_packages_proxy_v1_results_total{route,result}`: how the v1 endpoints (CLI images,
 * package icons, the bootstrap rpp-get) answered, by route pattern. Kept beside `Metrics`
 * rather than in it so the v1 plugins own their series; registered once per registry, so the
 * three plugins share it.
 */
export function v1Results(metrics: Metrics): client.Counter<'route' | 'result'> {
  const existing = metrics.registry.getSingleMetric(NAME)
  if (existing) return existing as client.Counter<'route' | 'result'>
  return new client.Counter({
    name: NAME,
    help: 'v1 requests (CLI images, package icons, bootstrap rpp-get) by route pattern and result: hit, miss, coalesced, bypass, head, not-modified, tags, manifest, extracted, memory, not-found, error.',
    labelNames: ['route', 'result'],
    registers: [metrics.registry],
  })
}

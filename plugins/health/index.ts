import type { Plugin } from '@hapi/hapi'
import type { Metrics } from '../metrics/metrics.js'

/** A readiness condition: undefined when satisfied, else a reason for the JSON body. */
export type ReadinessCheck = () => string | undefined

export interface HealthOptions {
  checks: ReadinessCheck[]
  /** Given, `registry_packages_proxy_ready` reports the same checks at every scrape. */
  metrics?: Pick<Metrics, 'readiness'>
}

/**
 * `/healthz`: the event loop answers. `/readyz`: every check passes (cache index open, every
 * credential provider synced), else 503 with the reasons, so a pod takes traffic only when it
 * can serve it.
 */
export const healthPlugin: Plugin<HealthOptions> = {
  name: 'health',
  register(server, { checks, metrics }) {
    const reasons = (): string[] => checks.map((c) => c()).filter((r): r is string => r !== undefined)
    metrics?.readiness(() => reasons().length === 0)
    server.route({
      method: 'GET',
      path: '/healthz',
      handler: (_request, h) => h.response('ok').type('text/plain'),
    })
    server.route({
      method: 'GET',
      path: '/readyz',
      handler: (_request, h) => {
        const pending = reasons()
        if (pending.length === 0) return h.response({ ready: true }).code(200)
        return h.response({ ready: false, reasons: pending }).code(503)
      },
    })
  },
}

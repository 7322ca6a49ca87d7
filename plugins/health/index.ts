import type { Plugin } from '@hapi/hapi'

/** A readiness condition: undefined when satisfied, else a reason for the JSON body. */
export type ReadinessCheck = () => string | undefined

/**
 * `/healthz`: the event loop answers. `/readyz`: every check passes (cache index open, every
 * credential provider synced), else 503 with the reasons, so a pod takes traffic only when it
 * can serve it.
 */
export const healthPlugin: Plugin<{ checks: ReadinessCheck[] }> = {
  name: 'health',
  register(server, { checks }) {
    server.route({
      method: 'GET',
      path: '/healthz',
      handler: (_request, h) => h.response('ok').type('text/plain'),
    })
    server.route({
      method: 'GET',
      path: '/readyz',
      handler: (_request, h) => {
        const reasons = checks.map((c) => c()).filter((r): r is string => r !== undefined)
        if (reasons.length === 0) return h.response({ ready: true }).code(200)
        return h.response({ ready: false, reasons }).code(503)
      },
    })
  },
}

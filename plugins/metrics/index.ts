import type { Plugin } from '@hapi/hapi'
import type { Metrics } from './metrics.js'

/** `GET /metrics` in the Prometheus text format, and a request counter for every route. */
export const metricsPlugin: Plugin<{ metrics: Metrics }> = {
  name: 'metrics',
  register(server, { metrics }) {
    server.route({
      method: 'GET',
      path: '/metrics',
      options: { auth: false },
      handler: async (_request, h) => h.response(await metrics.registry.metrics()).type(metrics.registry.contentType),
    })
    server.events.on('response', (request) => {
      const status = request.response && 'statusCode' in request.response ? request.response.statusCode : 0
      // The route pattern, never the raw path: a client cannot mint label values.
      metrics.requests.inc({ route: request.route.path, method: request.method, code: String(status) })
    })
  },
}

import Boom from '@hapi/boom'
import type { Plugin, Request } from '@hapi/hapi'
import type { Metrics } from './metrics.js'
import { delivered } from '../../handlers/response-end.js'

/**
 * The status a request ended with. A response whose body broke off after the headers went out
 * is replaced by hapi with a Boom error: 500 when the body stream failed (the registry broke off,
 * the layer did not match its digest), 499 when the client went away. Those are the codes
 * counted, not the 200 of the headers, so failures mid-body show up as failures.
 */
export function finalStatus(request: Request): number {
  const response = request.response
  if (!response) return 0
  const status = Boom.isBoom(response) ? response.output.statusCode : 'statusCode' in response ? response.statusCode : 0
  // The head of a success went out and the body did not arrive whole (hapi saw it finish, but
  // Node dropped what it still held for a destroyed connection): the client went away, 499.
  const raw = request.raw.res
  return status < 400 && raw.headersSent && !delivered(raw) ? 499 : status
}

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
      // The route pattern, never the raw path: a client cannot mint label values.
      metrics.requests.inc({ route: request.route.path, method: request.method, code: String(finalStatus(request)) })
    })
  },
}

import { createServer, type Server } from 'node:http'
import type { AddressInfo, Socket } from 'node:net'
import type { Duplex } from 'node:stream'
import type { Plugin } from '@hapi/hapi'
import type { Logger } from 'pino'
import { ConnectionDrain } from '../../connection-drain.js'
import { bootstrapHandler, RPP_GET_ROUTE } from '../../handlers/bootstrap.js'
import { answerClientError, clientErrorFacts, clientErrorStatus } from '../../handlers/client-error.js'
import type { SourceSet } from '../credentials/source-set.js'
import type { Metrics } from '../metrics/metrics.js'
import { v1Results } from '../metrics/v1-metrics.js'
import { describe } from '../packages/log.js'
import type { PackageService } from '../packages/package-service.js'
import { RppGetFiles } from './rpp-get.js'

export interface BootstrapOptions {
  host: string
  port: number
  clusterUuid: string
  /** How long a stop waits for responses in progress before closing what is left (default 25 s). */
  drainMs?: number
  sources: SourceSet
  packages: PackageService
  metrics: Metrics
  log: Logger
}

/** What the plugin exposes: where the bootstrap listener listens, once started. */
export interface BootstrapApi {
  address(): AddressInfo | undefined
}

// hapi's own typing for `server.plugins.bootstrap.api`, as hapijs/inert's lib/index.d.ts types its plugin.
declare module '@hapi/hapi' {
  interface PluginProperties {
    bootstrap?: { api: BootstrapApi }
  }
}

/**
 * `--bootstrap-listen-address`: a second plain-HTTP listener, outside hapi, that serves
 * `/<cluster UUID>/rpp-get` and nothing else, with the current module's limits: 5 s to send
 * the request head, 4 KiB of it, 300 s without progress. It opens and closes with the server.
 */
export const bootstrapPlugin: Plugin<BootstrapOptions> = {
  name: 'bootstrap',
  register(server, o) {
    const results = v1Results(o.metrics)
    const handler = bootstrapHandler({
      clusterUuid: o.clusterUuid,
      sources: o.sources,
      files: new RppGetFiles(o.packages),
      onDone: (info) => {
        o.metrics.requests.inc({ route: info.route, method: info.method.toLowerCase(), code: String(info.status) })
        results.inc({ route: info.route, result: info.result })
        const line = {
          listener: 'bootstrap',
          method: info.method,
          route: info.route,
          status: info.status,
          ...(info.aborted ? { aborted: true, sentStatus: 200 } : { bytes: info.bytes }),
          ms: info.ms,
          result: info.result,
          ...(info.err ? { err: describe(info.err) } : {}),
        }
        if (info.status >= 500 || info.aborted) o.log.warn(line, 'request')
        else o.log.info(line, 'request')
      },
    })
    results.inc({ route: RPP_GET_ROUTE, result: 'error' }, 0)
    const listener: Server = createServer(
      {
        maxHeaderSize: 4096,
        headersTimeout: 5_000,
        requestTimeout: 30_000,
        keepAliveTimeout: 5_000,
        connectionsCheckingInterval: 1_000,
      },
      handler,
    )
    // Writes to a node that stopped reading end after 300 s of no progress.
    listener.setTimeout(300_000)
    // A stop must not wait those 300 s: what is in progress gets the stop's budget, as on the main listener.
    const connections = new ConnectionDrain(listener)
    // A request Node could not parse (a head over 4 KiB, a bad header, one not finished in 5 s)
    // is answered as Node would (431, 400, 408) and, as on the main listener, has its line: Node
    // answered these itself with no line at all (found from outside).
    let clientErrors = 0
    listener.on('clientError', (err: NodeJS.ErrnoException, socket: Duplex) => {
      // Bytes after a request that said `Connection: close`: that request is still answered.
      if (err.code === 'HPE_CLOSED_CONNECTION' && connections.busy(socket as Socket)) return
      const status = clientErrorStatus(err)
      // A connection ending, or an answer already under way: Node would only close it.
      if (status === undefined || !socket.writable || (socket as Socket).bytesWritten > 0) return void socket.destroy()
      o.log.info(
        {
          listener: 'bootstrap',
          req: `client-error:${Date.now()}:${++clientErrors}`,
          method: '',
          route: '',
          status,
          bytes: 0,
          result: 'error',
          err: clientErrorFacts(err),
        },
        'request',
      )
      answerClientError(socket, status)
    })
    server.ext('onPreStart', async () => {
      await new Promise<void>((resolve, reject) => {
        listener.once('error', reject)
        listener.listen(o.port, o.host, () => {
          listener.off('error', reject)
          resolve()
        })
      })
      o.log.info({ listen: `${o.host}:${(listener.address() as AddressInfo).port}` }, 'bootstrap listener (rpp-get) listening')
    })
    server.ext('onPreStop', () => connections.stop(o.drainMs ?? 25_000))
    server.expose('api', {
      address: () => (listener.listening ? (listener.address() as AddressInfo) : undefined),
    } satisfies BootstrapApi)
  },
}

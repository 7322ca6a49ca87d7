import type { Plugin, Request, ResponseToolkit } from '@hapi/hapi'
import { BusyError, DigestError, MethodNotAllowedError, NotFoundError, RangeNotSatisfiableError, toBoom } from '../../errors.js'
import { cliDownloadHandler, cliManifestHandler, cliTagsHandler, type V1ImagesDeps } from '../../handlers/v1-images.js'
import type { SourceSet } from '../credentials/source-set.js'
import type { Metrics } from '../metrics/metrics.js'
import { v1Results } from '../metrics/v1-metrics.js'
import { describe } from '../packages/log.js'
import type { PackageService } from '../packages/package-service.js'
import type { RegistryClient } from '../packages/registry/registry-client.js'
import type { ManifestResolver } from './manifest-resolver.js'

export interface ImagesOptions {
  sources: SourceSet
  metrics: Metrics
  packages: PackageService
  client: RegistryClient
  /** Shared with the icons: one tag question in flight per repository and tag. */
  manifests: ManifestResolver
}

const PREFIXES = ['/v1/images/deckhouse-cli', '/v1/images/deckhouse-cli/plugins/{plugin}']
/** The paths the routes above serve, for the 405-or-404 decision of the catch-all. */
const SHAPE = /^\/v1\/images\/deckhouse-cli(?:\/plugins\/[^/]+)?\/(?:tags|images\/[^/]+|manifests\/[^/]+)$/

/**
 * `/v1/images/`: the Deckhouse CLI and its plugins from the default registry (tags, manifests,
 * downloads). One route per shape, so `route` in the request metrics tells them apart.
 */
export const imagesPlugin: Plugin<ImagesOptions> = {
  name: 'images',
  register(server, o) {
    const results = v1Results(o.metrics)
    const deps: V1ImagesDeps = {
      sources: o.sources,
      packages: o.packages,
      client: o.client,
      manifests: o.manifests,
      onResult: (request, result) => {
        results.inc({ route: request.route.path, result })
        request.app.result = result
      },
      onStreamError: (request, err) => {
        request.app.err = describe(err)
        if (err instanceof DigestError) o.metrics.digestMismatches.inc({ what: err.what })
      },
    }
    const guarded =
      (handler: (request: Request, h: ResponseToolkit) => Promise<unknown>) =>
      async (request: Request, h: ResponseToolkit): Promise<unknown> => {
        try {
          return await handler(request, h)
        } catch (err) {
          // A Range past the end was counted as `unsatisfiable` already: not a failure.
          if (err instanceof RangeNotSatisfiableError) throw toBoom(err)
          results.inc({ route: request.route.path, result: 'error' })
          request.app.err = describe(err)
          if (err instanceof DigestError) o.metrics.digestMismatches.inc({ what: err.what })
          if (err instanceof BusyError) o.metrics.downloadsRefused.inc({ kind: err.kind })
          throw toBoom(err)
        }
      }
    for (const prefix of PREFIXES) {
      // Error series exist from the start, so a rate over them sees the first failure.
      for (const route of ['tags', 'manifests/{ref}', 'images/{version}']) results.inc({ route: `${prefix}/${route}`, result: 'error' }, 0)
      server.route([
        { method: 'GET', path: `${prefix}/tags`, handler: guarded(cliTagsHandler(deps)) },
        { method: 'GET', path: `${prefix}/manifests/{ref}`, handler: guarded(cliManifestHandler(deps)) },
        {
          method: 'GET',
          path: `${prefix}/images/{version}`,
          // Ranges are ours (parseRange), as on /package: hapi must not slice the body again.
          options: { response: { ranges: false, emptyStatusCode: 200 } },
          handler: guarded(cliDownloadHandler(deps)),
        },
      ])
    }
    server.route({
      method: '*',
      path: '/v1/images/{path*}',
      // Never read a refused request's body.
      options: { payload: { parse: false, output: 'stream' } },
      handler: (request) => {
        const known = SHAPE.test(request.path)
        if (known && request.method !== 'get' && request.method !== 'head') {
          return toBoom(new MethodNotAllowedError('only GET and HEAD are allowed here'))
        }
        return toBoom(new NotFoundError('no such image: only deckhouse-cli and deckhouse-cli/plugins/<name> are served'))
      },
    })
  },
}

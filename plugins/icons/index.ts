import type { Plugin, Request, ResponseToolkit } from '@hapi/hapi'
import { DigestError, MethodNotAllowedError, NotFoundError, toBoom } from '../../errors.js'
import { iconHandler } from '../../handlers/v1-icons.js'
import type { SourceSet } from '../credentials/source-set.js'
import type { ManifestResolver } from '../images/manifest-resolver.js'
import type { Metrics } from '../metrics/metrics.js'
import { v1Results } from '../metrics/v1-metrics.js'
import { describe } from '../packages/log.js'
import type { RegistryClient } from '../packages/registry/registry-client.js'
import { IconService } from './icon-service.js'

export interface IconsOptions {
  sources: SourceSet
  metrics: Metrics
  client: RegistryClient
  manifests: ManifestResolver
  /** False until PackageRepositories were listed once. */
  synced: () => boolean
}

const ICON = '/v1/packages/{repository}/{package}/metadata/icon'

/** `/v1/packages/…/metadata/icon[/[<version>]]`: package icons from PackageRepositories. */
export const iconsPlugin: Plugin<IconsOptions> = {
  name: 'icons',
  register(server, o) {
    const results = v1Results(o.metrics)
    const icons = new IconService({ client: o.client, manifests: o.manifests })
    const handler = iconHandler({
      sources: o.sources,
      icons,
      synced: o.synced,
      onResult: (request, result) => {
        results.inc({ route: request.route.path, result })
        request.app.result = result
      },
    })
    const guarded = async (request: Request, h: ResponseToolkit): Promise<unknown> => {
      try {
        return await handler(request, h)
      } catch (err) {
        const boom = toBoom(err)
        results.inc({ route: request.route.path, result: boom.output.statusCode === 404 ? 'not-found' : 'error' })
        request.app.err = describe(err)
        if (err instanceof DigestError) o.metrics.digestMismatches.inc({ what: err.what })
        throw boom
      }
    }
    // The error series exists from the start, so a rate over it sees the first failure.
    results.inc({ route: `${ICON}/{version?}`, result: 'error' }, 0)
    // One route for `icon`, `icon/` (both "the latest version") and `icon/<version>`.
    server.route([
      { method: 'GET', path: `${ICON}/{version?}`, handler: guarded },
      {
        method: '*',
        path: '/v1/packages/{path*}',
        options: { payload: { parse: false, output: 'stream' } },
        handler: (request) =>
          /^\/v1\/packages\/[^/]+\/[^/]+\/metadata\/icon(?:\/[^/]*)?$/.test(request.path) && request.method !== 'get' && request.method !== 'head'
            ? toBoom(new MethodNotAllowedError('only GET and HEAD are allowed here'))
            : toBoom(new NotFoundError('not found')),
      },
    ])
  },
}

import type { Request, ResponseObject, ResponseToolkit } from '@hapi/hapi'
import semver from 'semver'
import { BadRequestError, NotFoundError, NotSyncedError } from '../errors.js'
import type { SourceSet } from '../plugins/credentials/source-set.js'
import type { IconService } from '../plugins/icons/icon-service.js'
import { matchesIfNoneMatch } from './package-request.js'
import { header, type V1ResultHook } from './v1-common.js'

/** One OCI repository-name component: what a package name must be to become part of a repository. */
const COMPONENT = /^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$/

/** Scripts, plugins, frames and forms are all off; inline styles are what icons use. */
const SVG_CSP = "default-src 'none'; style-src 'unsafe-inline'; sandbox"

export interface V1IconsDeps {
  sources: SourceSet
  icons: IconService
  /** False until PackageRepositories were listed once: an unknown name may be one not seen yet. */
  synced: () => boolean
  onResult?: V1ResultHook
}

/**
 * `GET|HEAD /v1/packages/<repository>/<package>/metadata/icon[/[<version>]]`: the package's icon
 * from the image `<PackageRepository repo>/<package>/version:<tag>`, the highest semantic-version
 * tag when no version is given. An unknown repository is a 404 before any connection.
 */
export function iconHandler(deps: V1IconsDeps) {
  return async (request: Request, h: ResponseToolkit): Promise<ResponseObject> => {
    const params = request.params as { repository: string; package: string; version?: string }
    const version = params.version === undefined || params.version === '' ? undefined : params.version
    if (version !== undefined && semver.valid(version) === null) throw new BadRequestError('the version must be a semantic version (1.2.3 or v1.2.3)')
    if (!COMPONENT.test(params.package)) throw new BadRequestError('the package name must be a lowercase OCI name component')
    const source = deps.sources.packageRepository(params.repository)
    if (!source) {
      if (!deps.synced()) throw new NotSyncedError('package repositories are not known yet: the PackageRepository watch has not synced')
      throw new NotFoundError(`no PackageRepository ${params.repository}`)
    }
    const name = [source.namePrefix, params.package, 'version'].filter(Boolean).join('/')
    const tag = version ?? (await deps.icons.latestVersion(source, name))
    const { digest, icon } = await deps.icons.icon(source, name, tag)
    if (!icon) throw new NotFoundError('the package has no icon (docs/icon.svg, .png, .jpg or .jpeg up to 4 MiB)')
    const etag = `"${digest}"`
    const common = (response: ResponseObject): ResponseObject =>
      response.header('ETag', etag).header('Cache-Control', version ? 'public, max-age=31536000, immutable' : 'no-cache')
    // `*` matches too: the icon was found, as /package answers `*` once the digest was found.
    if (matchesIfNoneMatch(header(request, 'if-none-match'), etag, true)) {
      deps.onResult?.(request, 'not-modified')
      return common(h.response().code(304))
    }
    deps.onResult?.(request, 'icon')
    const response = common(h.response(icon.data))
      .type(icon.contentType)
      .header('Content-Disposition', `attachment; filename="${params.package}.${icon.ext}"`)
      .header('Content-Length', String(icon.data.length))
      .header('X-Content-Type-Options', 'nosniff')
    // An SVG is a document that can run scripts when opened directly: forbid them.
    if (icon.ext === 'svg') response.header('Content-Security-Policy', SVG_CSP)
    return response
  }
}

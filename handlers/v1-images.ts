import type { Request, ResponseObject, ResponseToolkit } from '@hapi/hapi'
import { NotFoundError } from '../errors.js'
import type { SourceSet } from '../plugins/credentials/source-set.js'
import type { RegistrySource } from '../plugins/credentials/source.js'
import { allowedImage, imageNames, parsePlatform, parseReference, parseTag } from '../plugins/images/image-ref.js'
import type { FetchedManifest, ManifestResolver } from '../plugins/images/manifest-resolver.js'
import { isIndex, platformDigest } from '../plugins/images/platform.js'
import type { PackageService } from '../plugins/packages/package-service.js'
import type { RegistryClient } from '../plugins/packages/registry/registry-client.js'
import { matchesIfNoneMatch, parseRange } from './package-request.js'
import { defaultSource, firstFound, header, type V1ResultHook } from './v1-common.js'

export interface V1ImagesDeps {
  sources: SourceSet
  packages: PackageService
  manifests: ManifestResolver
  client: RegistryClient
  onResult?: V1ResultHook
  /** Told when a body fails after the headers went out (the connection is then aborted). */
  onStreamError?: (request: Request, err: Error) => void
}

/**
 * The image a route names: `deckhouse-cli`, or `deckhouse-cli/plugins/{plugin}`. Anything else
 * is a 404 before any connection: only these images are public.
 */
function imageOf(request: Request): string {
  const plugin = (request.params as { plugin?: string }).plugin
  const image = allowedImage(plugin === undefined ? 'deckhouse-cli' : `deckhouse-cli/plugins/${plugin}`)
  if (image === undefined) throw new NotFoundError('no such image: only deckhouse-cli and deckhouse-cli/plugins/<name> are served')
  return image
}

/** The image's repository names in the default source, the edition-root fallback second. */
function candidates(source: RegistrySource, image: string): string[] {
  return imageNames(source.namePrefix, image)
}

/** `GET /v1/images/<image>/tags`: every tag, all pages followed. */
export function cliTagsHandler(deps: V1ImagesDeps) {
  return async (request: Request, h: ResponseToolkit): Promise<ResponseObject> => {
    const image = imageOf(request)
    const source = defaultSource(deps.sources)
    const { value: tags } = await firstFound(candidates(source, image), (name) => deps.client.listTags(source, name))
    deps.onResult?.(request, 'tags')
    return h.response({ name: image, tags }).type('application/json').header('Cache-Control', 'no-cache')
  }
}

/** `GET /v1/images/<image>/manifests/<ref>`: the manifest bytes as stored. */
export function cliManifestHandler(deps: V1ImagesDeps) {
  return async (request: Request, h: ResponseToolkit): Promise<ResponseObject> => {
    const image = imageOf(request)
    const reference = parseReference((request.params as { ref: string }).ref)
    const source = defaultSource(deps.sources)
    const { value: manifest } = await firstFound(candidates(source, image), (name) => deps.manifests.fetch(source, name, reference))
    const etag = `"${manifest.digest}"`
    const cache = reference.startsWith('sha256:') ? 'public, max-age=31536000, immutable' : 'no-cache'
    if (matchesIfNoneMatch(header(request, 'if-none-match'), etag)) {
      deps.onResult?.(request, 'not-modified')
      return h.response().code(304).header('ETag', etag).header('Cache-Control', cache)
    }
    deps.onResult?.(request, 'manifest')
    return h
      .response(manifest.body)
      .type(manifest.mediaType || 'application/octet-stream')
      .header('Docker-Content-Digest', manifest.digest)
      .header('ETag', etag)
      .header('Cache-Control', cache)
  }
}

/** The image manifest digest a tag serves for a platform: the tag's own, or its index entry's. */
function servedDigest(manifest: FetchedManifest, request: Request): string {
  const platform = parsePlatform((request.query as Record<string, unknown>).platform)
  return isIndex(manifest.body, manifest.mediaType) ? platformDigest(manifest.body, platform) : manifest.digest
}

/**
 * `GET|HEAD /v1/images/<image>/images/<version>[?platform=]`: the image's last layer, served by
 * the very path `/package` uses (verified, cached by layer digest, one download per layer,
 * Range, HEAD without the layer) once the tag is resolved to a manifest digest. A tag moves,
 * so: `no-cache`, and a 304 only after the tag was resolved again.
 */
export function cliDownloadHandler(deps: V1ImagesDeps) {
  return async (request: Request, h: ResponseToolkit): Promise<ResponseObject> => {
    const image = imageOf(request)
    const version = parseTag((request.params as { version: string }).version, 'the version')
    // Checked before any connection: a malformed platform is the client's mistake.
    parsePlatform((request.query as Record<string, unknown>).platform)
    const source = defaultSource(deps.sources)
    const found = await firstFound(candidates(source, image), (name) => deps.manifests.fetch(source, name, version))
    const digest = servedDigest(found.value, request)
    const etag = `"${digest}"`
    const common = (response: ResponseObject): ResponseObject =>
      response.header('ETag', etag).header('Docker-Content-Digest', digest).header('Cache-Control', 'no-cache').header('Accept-Ranges', 'bytes')
    if (matchesIfNoneMatch(header(request, 'if-none-match'), etag)) {
      deps.onResult?.(request, 'not-modified')
      return common(h.response().code(304))
    }
    const pkg = await deps.packages.resolve(source, found.name, digest)
    const size = pkg.layer.size
    const ifRange = header(request, 'if-range')
    const range = ifRange && ifRange !== etag ? undefined : parseRange(header(request, 'range'), size)
    if (range === 'unsatisfiable') {
      deps.onResult?.(request, 'unsatisfiable')
      return common(h.response({ statusCode: 416, error: 'Range Not Satisfiable', message: `the image has ${size} bytes` }).code(416)).header(
        'Content-Range',
        `bytes */${size}`,
      )
    }
    const start = range?.start ?? 0
    const end = range?.end ?? size - 1
    const last = image.slice(image.lastIndexOf('/') + 1)
    const withHeaders = (response: ResponseObject): ResponseObject => {
      common(response)
        .type('application/x-gzip')
        .header('Content-Disposition', `attachment; filename="${last}-${version}.tar.gz"`)
        .header('Content-Length', String(end - start + 1))
      if (range) response.code(206).header('Content-Range', `bytes ${start}-${end}/${size}`)
      return response
    }
    // HEAD needs only the manifest: never start a layer download for it.
    if (request.method === 'head' || size === 0) {
      deps.onResult?.(request, 'head')
      return withHeaders(h.response(size === 0 ? '' : undefined))
        .code(range ? 206 : 200)
        .header('X-Cache', pkg.cached ? 'HIT' : 'MISS')
    }
    const body = await deps.packages.open(source, found.name, pkg, start, end)
    deps.onResult?.(request, body.result)
    if (body.buffer) return withHeaders(h.response(body.buffer)).header('X-Cache', body.result.toUpperCase())
    body.stream.once('error', (err: Error) => deps.onStreamError?.(request, err))
    return withHeaders(h.response(body.stream)).header('X-Cache', body.result.toUpperCase())
  }
}

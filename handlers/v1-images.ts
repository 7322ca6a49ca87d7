import type { Request, ResponseObject, ResponseToolkit } from '@hapi/hapi'
import { NotFoundError, RangeNotSatisfiableError } from '../errors.js'
import type { SourceSet } from '../plugins/credentials/source-set.js'
import type { RegistrySource } from '../plugins/credentials/source.js'
import { allowedImage, imageNames, parsePlatform, parseReference, parseTag } from '../plugins/images/image-ref.js'
import type { FetchedManifest, ManifestResolver } from '../plugins/images/manifest-resolver.js'
import type { PackageService } from '../plugins/packages/package-service.js'
import type { RegistryClient } from '../plugins/packages/registry/registry-client.js'
import { matchesIfNoneMatch, parseRange } from './package-request.js'
import { whenClosed } from './response-end.js'
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

/**
 * Whether repository `name` is unknown to the registry: its tag list is a 404 (NAME_UNKNOWN).
 * Asked only after a manifest 404, to tell "no such repository" (try the edition root) from
 * "no such tag" (a 404): the code in a manifest 404's body is not reliable across registries
 * (some send none, some say MANIFEST_UNKNOWN for both), the tag list of an existing repository
 * is never a 404. Shared and briefly reused like every tag listing.
 */
function repositoryMissing(deps: V1ImagesDeps, source: RegistrySource) {
  return async (name: string): Promise<boolean> => {
    try {
      await deps.manifests.tags(source, name)
      return false
    } catch (err) {
      if (err instanceof NotFoundError) return true
      throw err
    }
  }
}

/** Headers for manifest bytes served as the registry typed them: never sniffed, never run. */
const MANIFEST_CSP = "default-src 'none'; sandbox"

/** `GET /v1/images/<image>/tags`: every tag, all pages followed. */
export function cliTagsHandler(deps: V1ImagesDeps) {
  return async (request: Request, h: ResponseToolkit): Promise<ResponseObject> => {
    const image = imageOf(request)
    const source = defaultSource(deps.sources)
    const { value: tags } = await firstFound(candidates(source, image), (name) => deps.manifests.tags(source, name))
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
    const { value: manifest } = await firstFound(
      candidates(source, image),
      (name) => deps.manifests.fetch(source, name, reference),
      repositoryMissing(deps, source),
    )
    const etag = `"${manifest.digest}"`
    const cache = reference.startsWith('sha256:') ? 'public, max-age=31536000, immutable' : 'no-cache'
    if (matchesIfNoneMatch(header(request, 'if-none-match'), etag)) {
      deps.onResult?.(request, 'not-modified')
      return h.response().code(304).header('ETag', etag).header('Cache-Control', cache)
    }
    deps.onResult?.(request, 'manifest')
    return (
      h
        .response(manifest.body)
        .type(manifest.mediaType || 'application/octet-stream')
        .header('Docker-Content-Digest', manifest.digest)
        .header('ETag', etag)
        .header('Cache-Control', cache)
        // The Content-Type is the registry's (the CONTRACT): whatever it says, a browser must
        // neither sniff these bytes into HTML nor run anything in them.
        .header('X-Content-Type-Options', 'nosniff')
        .header('Content-Security-Policy', MANIFEST_CSP)
    )
  }
}

/** The image manifest digest a tag serves for a platform: the tag's own, or its index entry's (one nested index followed). */
async function servedDigest(deps: V1ImagesDeps, source: RegistrySource, name: string, manifest: FetchedManifest, request: Request): Promise<string> {
  const platform = parsePlatform((request.query as Record<string, unknown>).platform)
  return (await deps.manifests.image(source, name, manifest, platform)).digest
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
    const found = await firstFound(candidates(source, image), (name) => deps.manifests.fetch(source, name, version), repositoryMissing(deps, source))
    const digest = await servedDigest(deps, source, found.name, found.value, request)
    const etag = `"${digest}"`
    const common = (response: ResponseObject): ResponseObject =>
      response.header('ETag', etag).header('Docker-Content-Digest', digest).header('Cache-Control', 'no-cache').header('Accept-Ranges', 'bytes')
    const ifNoneMatch = header(request, 'if-none-match')
    if (matchesIfNoneMatch(ifNoneMatch, etag)) {
      deps.onResult?.(request, 'not-modified')
      return common(h.response().code(304))
    }
    const pkg = await deps.packages.resolve(source, found.name, digest)
    // `*` only now, as on /package: it means "you have it", known once the image was found.
    if (matchesIfNoneMatch(ifNoneMatch, etag, true)) {
      deps.onResult?.(request, 'not-modified')
      return common(h.response().code(304))
    }
    const size = pkg.layer.size
    const ifRange = header(request, 'if-range')
    const range = ifRange && ifRange !== etag ? undefined : parseRange(header(request, 'range'), size)
    if (range === 'unsatisfiable') {
      deps.onResult?.(request, 'unsatisfiable')
      throw new RangeNotSatisfiableError(size, 'image')
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
    if (body.release) whenClosed(request.raw.req, request.raw.res, body.release)
    if (body.buffer) return withHeaders(h.response(body.buffer)).header('X-Cache', body.result.toUpperCase())
    body.stream.once('error', (err: Error) => deps.onStreamError?.(request, err))
    return withHeaders(h.response(body.stream)).header('X-Cache', body.result.toUpperCase())
  }
}

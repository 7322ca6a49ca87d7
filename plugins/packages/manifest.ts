import { createHash } from 'node:crypto'
import { DigestError, ManifestError } from '../../errors.js'

/** The layer a package is: the last layer of the image. */
export interface LayerRef {
  digest: string
  size: number
  mediaType: string
}

/** The manifest media types a registry may answer with, OCI and Docker schema 2. */
export const MEDIA_TYPES = {
  ociManifest: 'application/vnd.oci.image.manifest.v1+json',
  ociIndex: 'application/vnd.oci.image.index.v1+json',
  dockerManifest: 'application/vnd.docker.distribution.manifest.v2+json',
  dockerList: 'application/vnd.docker.distribution.manifest.list.v2+json',
} as const
/** Media types of one image's manifest. */
export const IMAGE_TYPES: ReadonlySet<string> = new Set([MEDIA_TYPES.ociManifest, MEDIA_TYPES.dockerManifest])
/** Media types of an image index (a list of per-platform manifests). */
export const INDEX_TYPES: ReadonlySet<string> = new Set([MEDIA_TYPES.ociIndex, MEDIA_TYPES.dockerList])
/** A content digest as the API accepts it: sha256 only, lowercase hex. */
export const DIGEST = /^sha256:[a-f0-9]{64}$/

export function sha256Digest(bytes: Buffer): string {
  return `sha256:${createHash('sha256').update(bytes).digest('hex')}`
}

/** Throws a {@link DigestError} unless `bytes` hash to `expected`. */
export function verifyDigest(what: 'manifest' | 'layer', bytes: Buffer, expected: string): void {
  const found = sha256Digest(bytes)
  if (found !== expected) throw new DigestError(what, expected, found)
}

export type ParsedManifest = { kind: 'image'; layer: LayerRef } | { kind: 'index'; platformDigest: string }

function isDescriptor(d: unknown): d is { digest: string; size: number; mediaType?: string; platform?: { os?: unknown; architecture?: unknown } } {
  if (typeof d !== 'object' || d === null) return false
  const x = d as { digest?: unknown; size?: unknown }
  return typeof x.digest === 'string' && DIGEST.test(x.digest) && typeof x.size === 'number' && Number.isSafeInteger(x.size) && x.size >= 0
}

/**
 * Reads an image manifest or index. The media type comes from the document itself when it
 * says, else from the Content-Type header (OCI manifests may omit it), else from its shape.
 * An image yields its last layer; an index yields its linux/amd64 entry.
 */
export function parseManifest(body: Buffer, contentType: string): ParsedManifest {
  let doc: { schemaVersion?: unknown; mediaType?: unknown; layers?: unknown; manifests?: unknown }
  try {
    doc = JSON.parse(body.toString('utf8')) as typeof doc
  } catch {
    throw new ManifestError('registry sent a manifest that is not JSON')
  }
  if (typeof doc !== 'object' || doc === null) throw new ManifestError('registry sent a manifest that is not a JSON object')
  if (doc.schemaVersion !== 2) throw new ManifestError('manifest is not schema version 2 (schema 1 is not supported)')
  const declared = typeof doc.mediaType === 'string' ? doc.mediaType : contentType
  const isIndex = INDEX_TYPES.has(declared) || (!IMAGE_TYPES.has(declared) && Array.isArray(doc.manifests) && !Array.isArray(doc.layers))
  if (isIndex) {
    if (!Array.isArray(doc.manifests)) throw new ManifestError('image index has no manifests')
    const entry = (doc.manifests as unknown[]).filter(isDescriptor).find((m) => m.platform?.os === 'linux' && m.platform.architecture === 'amd64')
    if (!entry) throw new ManifestError('image index has no linux/amd64 manifest')
    return { kind: 'index', platformDigest: entry.digest }
  }
  if (!Array.isArray(doc.layers)) throw new ManifestError(`manifest of type ${declared || 'unknown'} has no layers`)
  const layers = doc.layers as unknown[]
  const last = layers[layers.length - 1]
  if (last === undefined) throw new ManifestError('image has no layers')
  if (!isDescriptor(last)) throw new ManifestError('last layer has no valid sha256 digest and size')
  return { kind: 'image', layer: { digest: last.digest, size: last.size, mediaType: last.mediaType ?? '' } }
}

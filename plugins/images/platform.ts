import { ManifestError, NotFoundError } from '../../errors.js'
import { DIGEST, IMAGE_TYPES, INDEX_TYPES } from '../packages/manifest.js'
import type { Platform } from './image-ref.js'

interface IndexEntry {
  digest?: unknown
  platform?: { os?: unknown; architecture?: unknown; variant?: unknown }
}

/** Whether manifest bytes are an image index (by their own mediaType, the header, or shape). */
export function isIndex(body: Buffer, contentType: string): boolean {
  const doc = parse(body)
  const declared = typeof doc.mediaType === 'string' ? doc.mediaType : contentType
  return INDEX_TYPES.has(declared) || (!IMAGE_TYPES.has(declared) && Array.isArray(doc.manifests) && !Array.isArray(doc.layers))
}

/**
 * The digest of the image for `platform` in an index. A request without a variant takes the
 * first entry for its os and architecture; one with a variant needs that variant exactly.
 * No such entry is a 404: the image exists, but not for that platform.
 */
export function platformDigest(body: Buffer, platform: Platform): string {
  const doc = parse(body)
  if (!Array.isArray(doc.manifests)) throw new ManifestError('image index has no manifests')
  const entry = (doc.manifests as IndexEntry[]).find(
    (m) =>
      typeof m === 'object' &&
      m !== null &&
      m.platform?.os === platform.os &&
      m.platform.architecture === platform.architecture &&
      (platform.variant === undefined || m.platform.variant === platform.variant),
  )
  const name = [platform.os, platform.architecture, platform.variant].filter(Boolean).join('-')
  if (!entry) throw new NotFoundError(`the image has no ${name} build`)
  if (typeof entry.digest !== 'string' || !DIGEST.test(entry.digest)) throw new ManifestError(`the ${name} entry of the index has no valid sha256 digest`)
  return entry.digest
}

/** Every layer descriptor of an image manifest, in order (bottom layer first). */
export function imageLayers(body: Buffer): Array<{ digest: string; size: number; mediaType: string }> {
  const doc = parse(body)
  if (!Array.isArray(doc.layers)) throw new ManifestError('image manifest has no layers')
  return (doc.layers as unknown[]).map((l) => {
    const d = l as { digest?: unknown; size?: unknown; mediaType?: unknown }
    if (typeof d.digest !== 'string' || !DIGEST.test(d.digest) || typeof d.size !== 'number' || !Number.isSafeInteger(d.size) || d.size < 0) {
      throw new ManifestError('a layer has no valid sha256 digest and size')
    }
    return { digest: d.digest, size: d.size, mediaType: typeof d.mediaType === 'string' ? d.mediaType : '' }
  })
}

function parse(body: Buffer): { mediaType?: unknown; manifests?: unknown; layers?: unknown } {
  let doc: unknown
  try {
    doc = JSON.parse(body.toString('utf8'))
  } catch {
    throw new ManifestError('registry sent a manifest that is not JSON')
  }
  if (typeof doc !== 'object' || doc === null) throw new ManifestError('registry sent a manifest that is not a JSON object')
  return doc
}

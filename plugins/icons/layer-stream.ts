import { createHash } from 'node:crypto'
import { Transform, type TransformCallback } from 'node:stream'
import { createGunzip } from 'node:zlib'
import { DigestError, LayerContentError, ManifestError, ProxyError } from '../../errors.js'
import type { LayerRef } from '../packages/manifest.js'

/**
 * Inflated bytes one extraction may read, across all the layers it reads: a 4 MB gzip bomb
 * inflates to 4 GiB for ~14 s of CPU, and every layer of an image is read for an icon. Shared
 * by the layers of one request (a per-request object, never module state).
 */
export interface InflateBudget {
  /** The bound, for messages. */
  readonly limit: number
  /** What is left of it. */
  left: number
}

export function inflateBudget(limit: number): InflateBudget {
  return { limit, left: limit }
}

/** Hashes and counts bytes as they pass; fails at the end unless they are exactly `layer`. */
export function verifier(layer: LayerRef): Transform {
  const hash = createHash('sha256')
  let size = 0
  return new Transform({
    transform(chunk: Buffer, _encoding, callback: TransformCallback) {
      hash.update(chunk)
      size += chunk.length
      if (size > layer.size) callback(new ManifestError(`layer ${layer.digest} is larger than its manifest says`))
      else callback(null, chunk)
    },
    flush(callback: TransformCallback) {
      const found = `sha256:${hash.digest('hex')}`
      if (size !== layer.size || found !== layer.digest) callback(new DigestError('layer', layer.digest, found))
      else callback()
    },
  })
}

/** Counts the tar bytes a layer yields against the request's budget; fails once it is spent. */
export function inflateLimiter(layer: LayerRef, budget: InflateBudget): Transform {
  return new Transform({
    transform(chunk: Buffer, _encoding, callback: TransformCallback) {
      budget.left -= chunk.length
      if (budget.left < 0) {
        callback(new LayerContentError(`layer ${layer.digest} inflates past ${budget.limit} bytes for this request: refused (a bound on the work per request)`))
      } else callback(null, chunk)
    },
  })
}

/**
 * The decompressor a layer's media type calls for: gunzip for `…tar+gzip` / `…tar.gzip` (and
 * for a missing type, as Docker v2 schema 2 layers are gzip), none for an uncompressed `…tar`.
 * zstd is refused with a clear error: node:zlib on Node 20 has no zstd.
 */
export function layerDecoder(layer: LayerRef): Transform | undefined {
  const type = layer.mediaType
  if (/zstd/i.test(type)) throw new LayerContentError(`layer ${layer.digest} is zstd-compressed (${type}), which this proxy cannot read`)
  if (type.endsWith('tar')) return undefined
  return createGunzip()
}

/**
 * Gives a failure while reading a layer a class and a message that say the cause: the
 * registry's content (not gzip, truncated, a tar header tar-stream refuses) is a 502, not a bare
 * 500 logged as `{"type":"Error","message":"Error"}`. Errors that already are ours pass as they
 * are (a digest mismatch, an upstream failure, the inflate bound); so do aborts.
 */
export function layerReadError(err: unknown, layer: LayerRef): unknown {
  if (err instanceof ProxyError || !(err instanceof Error) || err.name === 'AbortError') return err
  const code = (err as NodeJS.ErrnoException).code
  if (typeof code === 'string' && code.startsWith('Z_')) {
    return new LayerContentError(`layer ${layer.digest} is not valid gzip (${err.message})`, { cause: err })
  }
  if (code === 'ERR_STREAM_PREMATURE_CLOSE') return new LayerContentError(`layer ${layer.digest} ended early`, { cause: err })
  // tar-stream's errors: "Invalid tar header…", "Header exceeds max size", "Unexpected end of data".
  return new LayerContentError(`layer ${layer.digest} is not a readable tar (${err.message.slice(0, 200)})`, { cause: err })
}

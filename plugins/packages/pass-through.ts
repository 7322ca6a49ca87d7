import { createHash } from 'node:crypto'
import { Readable, Transform, type TransformCallback } from 'node:stream'
import { DigestError, UpstreamError } from '../../errors.js'
import type { RegistrySource } from '../credentials/source.js'
import type { LayerRef } from './manifest.js'
import type { BlobResponse, RegistryClient } from './registry-client.js'
import { openLayer, resumableDownload } from './resumable-download.js'

/**
 * Hashes a whole layer as it passes and emits bytes `start..end` of it (inclusive), withholding
 * the byte at `end` until the layer has hashed to its digest and had exactly its size. A wrong
 * or short layer therefore errors the stream before the response is complete.
 */
export class VerifyingSlice extends Transform {
  readonly #hash = createHash('sha256')
  readonly #layer: LayerRef
  readonly #start: number
  readonly #end: number
  #pos = 0
  #held: Buffer | undefined

  constructor(layer: LayerRef, start: number, end: number) {
    super()
    this.#layer = layer
    this.#start = start
    this.#end = end
  }

  override _transform(chunk: Buffer, _enc: BufferEncoding, cb: TransformCallback): void {
    const from = this.#pos
    this.#pos += chunk.length
    if (this.#pos > this.#layer.size) {
      cb(new UpstreamError('registry sent more bytes than the manifest says'))
      return
    }
    this.#hash.update(chunk)
    const lo = Math.max(this.#start, from)
    const hi = Math.min(this.#end + 1, this.#pos)
    if (lo < hi) {
      let part = chunk.subarray(lo - from, hi - from)
      if (hi === this.#end + 1) {
        this.#held = Buffer.from(part.subarray(part.length - 1))
        part = part.subarray(0, part.length - 1)
      }
      if (part.length > 0) this.push(part)
    }
    cb()
  }

  override _flush(cb: TransformCallback): void {
    if (this.#pos !== this.#layer.size) {
      cb(new UpstreamError('registry ended the layer early'))
      return
    }
    const found = `sha256:${this.#hash.digest('hex')}`
    if (found !== this.#layer.digest) {
      cb(new DigestError('layer', this.#layer.digest, found))
      return
    }
    if (this.#held) this.push(this.#held)
    cb()
  }
}

/**
 * Streams a layer from the registry to one client without touching the disk (cache disabled,
 * or the layer cannot be cached), verified on the way. Resolves once the registry answered.
 * Like a fill, a connection that breaks or stalls mid-layer is resumed with a Range request
 * from the byte reached ({@link resumableDownload}), and the hash runs on over the stitched
 * bytes; `onResume` hears of each resume.
 */
export async function verifiedPassThrough(
  client: RegistryClient,
  source: RegistrySource,
  name: string,
  layer: LayerRef,
  start: number,
  end: number,
  onResume?: (err: unknown, offset: number) => void,
): Promise<Readable> {
  const controller = new AbortController()
  // A body is read only once the client pulls: until then an error is kept in the stream's
  // state (and thrown to the reader) instead of being emitted unheard.
  const open = async (offset: number): Promise<BlobResponse> => {
    const res = await client.openBlob(source, name, layer.digest, { offset, signal: controller.signal })
    res.body.on('error', () => undefined)
    return res
  }
  const first = await openLayer(open, layer.size)
  const bytes = Readable.from(resumableDownload(first, layer.size, open, { canResume: () => !controller.signal.aborted, ...(onResume ? { onResume } : {}) }), { objectMode: false })
  const slice = new VerifyingSlice(layer, start, end)
  bytes.on('error', (err) => slice.destroy(err))
  // A client that goes away stops the download: nobody else is waiting for these bytes.
  slice.on('close', () => {
    if (!bytes.readableEnded) controller.abort()
    bytes.destroy()
  })
  return bytes.pipe(slice)
}

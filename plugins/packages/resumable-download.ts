import { TimeoutError, UpstreamError } from '../../errors.js'
import type { BlobResponse } from './registry/registry-client.js'

/** How often one download resumes a broken connection before giving up. */
export const MAX_RESUMES = 3

/** A broken or stalled connection can be resumed; a refusal, bad size or bad digest cannot. */
function isResumable(err: unknown): boolean {
  if (err instanceof TimeoutError) return err.phase === 'idle'
  return err instanceof UpstreamError && err.upstreamStatus === undefined && /mid-body|ended the layer early/.test(err.message)
}

export interface ResumeOptions {
  /** Asked before each resume; false passes the break on (a fill whose disk failed). */
  canResume?: () => boolean
  /** Told of each resume, with the byte it resumes from. */
  onResume?: (err: unknown, offset: number) => void
}

/**
 * Opens a layer of `size` bytes from byte 0: the first request of a download. A registry whose
 * blob has another size than the manifest says is refused before a byte is passed on.
 */
export async function openLayer(open: (offset: number) => Promise<BlobResponse>, size: number): Promise<BlobResponse> {
  const res = await open(0)
  if (res.length !== size) {
    res.body.destroy()
    throw new UpstreamError(`registry blob is ${res.length} bytes, the manifest says ${size}`)
  }
  return res
}

/**
 * The bytes of one layer of `size` bytes, from the registry's answer `first` (from byte 0) on.
 * A connection that breaks or stalls mid-layer is reopened with `reopen(offset)` (a Range
 * request from the byte reached), up to {@link MAX_RESUMES} times; a registry that ignores the
 * Range and answers from byte 0 has what was already yielded skipped. Throws when the registry
 * sends more than `size` bytes or a resume answer of another size. The caller hashes what it
 * gets: the stitched bytes are verified whole. Every response body is destroyed when the
 * iteration ends, however it ends.
 */
export async function* resumableDownload(
  first: BlobResponse,
  size: number,
  reopen: (offset: number) => Promise<BlobResponse>,
  options: ResumeOptions = {},
): AsyncGenerator<Buffer> {
  let res = first
  let received = 0
  try {
    for (let resumes = 0; ; resumes++) {
      let skip = received - res.offset
      try {
        for await (const raw of res.body as AsyncIterable<Buffer>) {
          let chunk = raw
          if (skip > 0) {
            const drop = Math.min(skip, chunk.length)
            skip -= drop
            chunk = chunk.subarray(drop)
            if (chunk.length === 0) continue
          }
          if (received + chunk.length > size) throw new UpstreamError('registry sent more bytes than the manifest says')
          received += chunk.length
          yield chunk
        }
        if (received !== size) throw new UpstreamError('registry ended the layer early')
        return
      } catch (err) {
        if (!isResumable(err) || resumes >= MAX_RESUMES || options.canResume?.() === false) throw err
        options.onResume?.(err, received)
        res.body.destroy()
        res = await reopen(received)
        if (res.offset + res.length !== size) throw new UpstreamError('registry answered the resume request with a different size')
      }
    }
  } finally {
    res.body.destroy()
  }
}

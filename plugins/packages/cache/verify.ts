import { createHash } from 'node:crypto'
import { open } from 'node:fs/promises'
import { setTimeout as sleep } from 'node:timers/promises'
import type { PackageLogger } from '../log.js'
import type { BlobCache } from './blob-cache.js'
import { fileStamp } from './blob-store.js'

const CHUNK = 1024 * 1024

export interface VerifyOptions {
  log: PackageLogger
  /** Bytes per second to read at (the scrubber's rate); unpaced when absent. */
  bytesPerSecond?: number
  /** Stops the check (shutdown); an aborted check counts as intact. */
  signal?: AbortSignal
}

/** What one check found: nothing to check (not cached), intact, or corrupt (and removed). */
export type Verdict = 'absent' | 'intact' | 'corrupt'

/**
 * Re-hashes one cached file under a lease (so it is not evicted meanwhile), one 1 MiB read at
 * a time, and removes the entry when its bytes no longer match its digest or cannot be read.
 * An intact file is marked verified for the rest of this process's life.
 */
export async function verifyEntry(cache: BlobCache, digest: string, o: VerifyOptions): Promise<{ verdict: Verdict; bytes: number }> {
  const lease = cache.acquire(digest)
  if (!lease) return { verdict: 'absent', bytes: 0 }
  const hash = createHash('sha256')
  let read = 0
  let stamp: string | undefined
  try {
    const handle = await open(lease.path, 'r')
    try {
      stamp = fileStamp(await handle.stat())
      const buffer = Buffer.allocUnsafe(CHUNK)
      for (;;) {
        const began = Date.now()
        const { bytesRead } = await handle.read(buffer, 0, CHUNK, read)
        if (bytesRead === 0) break
        hash.update(buffer.subarray(0, bytesRead))
        read += bytesRead
        if (o.bytesPerSecond) {
          // Paced: a chunk of 1 MiB at 4 MiB/s is followed by about 250 ms of rest.
          const rest = (bytesRead / o.bytesPerSecond) * 1000 - (Date.now() - began)
          if (rest > 0) await sleep(rest, undefined, { ...(o.signal ? { signal: o.signal } : {}), ref: false })
        }
      }
    } finally {
      await handle.close().catch(() => undefined)
    }
  } catch (err) {
    if (o.signal?.aborted) {
      lease.release()
      return { verdict: 'intact', bytes: read }
    }
    o.log.error({ err: { code: (err as NodeJS.ErrnoException).code }, layer: digest }, 'a cached file could not be read; removing it')
    return corrupt(cache, digest, lease.size, () => lease.release())
  }
  const found = `sha256:${hash.digest('hex')}`
  if (read === lease.size && found === digest) {
    lease.markVerified(stamp)
    lease.release()
    return { verdict: 'intact', bytes: read }
  }
  o.log.error({ layer: digest, found, bytes: read, expectedBytes: lease.size }, 'a cached file does not match its digest; removing it')
  return corrupt(cache, digest, lease.size, () => lease.release())
}

async function corrupt(cache: BlobCache, digest: string, size: number, release: () => void): Promise<{ verdict: Verdict; bytes: number }> {
  const removing = cache.remove(digest, 'corrupt')
  release()
  await removing
  return { verdict: 'corrupt', bytes: size }
}

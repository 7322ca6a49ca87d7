import { createHash } from 'node:crypto'
import { open } from 'node:fs/promises'
import { setTimeout as sleep } from 'node:timers/promises'
import type { PackageLogger } from '../log.js'
import type { BlobCache } from './blob-cache.js'

export interface ScrubberOptions {
  /** Bytes re-hashed per second; 0 turns the scrubber off. */
  bytesPerSecond: number
  log: PackageLogger
  /** Told of each entry checked, and whether it was intact. */
  onChecked?: (bytes: number, intact: boolean) => void
  /** Pause before each round, the first included (default 60 s). */
  idleMs?: number
}

const CHUNK = 1024 * 1024

/**
 * Re-hashes cached files in the background, one at a time, at a bounded rate, and removes any
 * that no longer match their name. Files are verified once before they are committed; this
 * catches what happens to them afterwards (a bad disk, a torn write the fsync did not cover,
 * a stray hand in the folder), which hits from disk would otherwise serve as verified forever.
 * Each file is read under a lease, so it is not evicted while it is being checked.
 */
export class Scrubber {
  readonly #o: ScrubberOptions
  readonly #cache: BlobCache
  readonly #stop = new AbortController()
  #loop: Promise<void> | undefined

  constructor(cache: BlobCache, options: ScrubberOptions) {
    this.#cache = cache
    this.#o = options
  }

  start(): void {
    if (this.#o.bytesPerSecond <= 0 || this.#loop) return
    this.#loop = this.#run().catch((err: unknown) => {
      if (!this.#stop.signal.aborted) this.#o.log.error({ err: { code: (err as NodeJS.ErrnoException).code } }, 'cache scrubber stopped')
    })
  }

  async stop(): Promise<void> {
    this.#stop.abort()
    await this.#loop
  }

  async #run(): Promise<void> {
    const signal = this.#stop.signal
    for (;;) {
      // Rest first: right after a start the disk and the CPU belong to the nodes that are
      // waiting for packages (a bootstrap herd), not to a check that can wait a minute.
      await sleep(this.#o.idleMs ?? 60_000, undefined, { signal, ref: false }).catch(() => undefined)
      if (signal.aborted) return
      // One round over the entries as they were when it began; entries added meanwhile were
      // verified when committed, and are checked in the next round.
      const round = this.#cache.digests().sort()
      for (const digest of round) {
        if (signal.aborted) return
        await this.check(digest, signal)
      }
    }
  }

  /** Re-hashes one entry; false if it did not match and was removed. */
  async check(digest: string, signal?: AbortSignal): Promise<boolean> {
    const lease = this.#cache.acquire(digest)
    if (!lease) return true
    const hash = createHash('sha256')
    let read = 0
    try {
      const handle = await open(lease.path, 'r')
      try {
        const buffer = Buffer.allocUnsafe(CHUNK)
        for (;;) {
          const began = Date.now()
          const { bytesRead } = await handle.read(buffer, 0, CHUNK, read)
          if (bytesRead === 0) break
          hash.update(buffer.subarray(0, bytesRead))
          read += bytesRead
          // Pace to the rate: a chunk of 1 MiB at 4 MiB/s is followed by about 250 ms of rest.
          const rest = (bytesRead / this.#o.bytesPerSecond) * 1000 - (Date.now() - began)
          if (rest > 0) await sleep(rest, undefined, { ...(signal ? { signal } : {}), ref: false })
        }
      } finally {
        await handle.close().catch(() => undefined)
      }
    } catch (err) {
      if (signal?.aborted) return true
      this.#o.log.error({ err: { code: (err as NodeJS.ErrnoException).code }, layer: digest }, 'a cached file could not be read by the scrubber; removing it')
      return this.#corrupt(digest, lease.size, () => lease.release())
    }
    const found = `sha256:${hash.digest('hex')}`
    if (read === lease.size && found === digest) {
      lease.markVerified()
      lease.release()
      this.#o.onChecked?.(read, true)
      return true
    }
    this.#o.log.error({ layer: digest, found, bytes: read, expectedBytes: lease.size }, 'a cached file does not match its digest; removing it')
    return this.#corrupt(digest, lease.size, () => lease.release())
  }

  #corrupt(digest: string, size: number, release: () => void): false {
    void this.#cache.remove(digest, 'corrupt')
    release()
    this.#o.onChecked?.(size, false)
    return false
  }
}

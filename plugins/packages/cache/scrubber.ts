import { setTimeout as sleep } from 'node:timers/promises'
import type { PackageLogger } from '../log.js'
import type { BlobCache } from './blob-cache.js'
import { verifyEntry } from './verify.js'

export interface ScrubberOptions {
  /** Bytes re-hashed per second; 0 turns the scrubber off. */
  bytesPerSecond: number
  log: PackageLogger
  /** Told of each entry checked, and whether it was intact. */
  onChecked?: (bytes: number, intact: boolean) => void
  /** Pause before each round, the first included (default 60 s). */
  idleMs?: number
}

/**
 * Re-hashes cached files in the background, one at a time, at a bounded rate, and removes any
 * that no longer match their name. Files are verified before they are committed, and files
 * from before a start on their first read; this catches what happens to them afterwards (a
 * bad disk, a stray hand in the folder), which hits would otherwise serve for as long as the
 * process runs.
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
      for (const digest of this.#cache.digests().sort()) {
        if (signal.aborted) return
        const { verdict, bytes } = await verifyEntry(this.#cache, digest, { log: this.#o.log, bytesPerSecond: this.#o.bytesPerSecond, signal })
        if (verdict !== 'absent' && !signal.aborted) this.#o.onChecked?.(bytes, verdict === 'intact')
      }
    }
  }
}

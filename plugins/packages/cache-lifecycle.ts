import { constants } from 'node:fs'
import { access } from 'node:fs/promises'
import type { RemovalReason } from './cache/blob-cache.js'
import type { CacheIndex } from './cache/cache-index.js'
import { openCache, storageErrorCode } from './cache/open-cache.js'
import { Scrubber } from './cache/scrubber.js'
import type { CacheParts } from './downloads.js'
import { describe, type PackageLogger } from './log.js'

export interface CacheLifecycleOptions {
  directory: string
  limitBytes: number
  log: PackageLogger
  /** Given the cache once it is open (at start, or later by the retry). */
  attach: (parts: CacheParts) => void
  onRemoved?: (reason: RemovalReason, bytes: number, digest: string) => void
  onScrubbed?: (bytes: number, intact: boolean) => void
  /** Bytes per second the scrubber re-hashes; 0 turns it off. */
  scrubBytesPerSecond: number
  /** How often a cache directory that was unusable at start is tried again (default 30 s). */
  retryMs?: number
  /** How often batched access times are written to SQLite (default 5 s). */
  flushIntervalMs?: number
  /** The token `DELETE /cache` requires, written into the directory when the cache opens. */
  adminToken?: string
}

/**
 * The cache's life in the process: opened at start or, when the directory is unusable then,
 * tried again until it opens (serving uncached meanwhile); access times flushed in batches;
 * the directory's writability watched for readiness; the scrubber run; all of it closed on stop.
 */
export class CacheLifecycle {
  readonly #o: CacheLifecycleOptions
  #parts: CacheParts | undefined
  #scrubber: Scrubber | undefined
  /** Why the cache could not be opened; packages are served uncached meanwhile. */
  #unavailable: string | undefined
  #dirProblem: string | undefined
  #timers: NodeJS.Timeout[] = []
  #retrying = false
  #stopped = false

  constructor(options: CacheLifecycleOptions) {
    this.#o = options
  }

  get index(): CacheIndex | undefined {
    return this.#parts?.index
  }

  get unavailable(): string | undefined {
    return this.#unavailable
  }

  /** Why the cache cannot serve right now (index closed, directory not writable), or undefined. */
  notReady(): string | undefined {
    return this.#unavailable ?? (this.#parts?.index.closed ? 'cache index is closed' : this.#dirProblem)
  }

  async start(): Promise<void> {
    try {
      this.#attach(await this.#open())
    } catch (err) {
      // A cache volume that is read-only, full, failing or not ours must not stop the proxy:
      // during bootstrap nothing else hands out packages, and a crash-looping pod would not
      // do it either. It serves every package straight from the registry instead, says so
      // where on-call looks (the log, /readyz, the NotReady alert), and tries the directory
      // again every 30 s. Anything else is a bug.
      const code = storageErrorCode(err)
      if (code === undefined) throw err
      this.#unavailable = this.#unusable(code)
      this.#o.log.error({ err: describe(err), cacheDirectory: this.#o.directory }, 'cannot open the cache; serving packages uncached')
      this.#every(this.#o.retryMs ?? 30_000, () => void this.#retry())
    }
    await this.#checkDirectory()
    this.#every(this.#o.flushIntervalMs ?? 5000, () => {
      this.#parts?.index.flush().catch((err: unknown) => this.#o.log.warn({ err: describe(err) }, 'cannot write access times'))
      void this.#checkDirectory()
    })
  }

  async stop(): Promise<void> {
    this.#stopped = true
    for (const t of this.#timers) clearInterval(t)
    await this.#scrubber?.stop()
    await this.#parts?.cache.settled()
    await this.#parts?.index.close()
  }

  #open(): Promise<CacheParts> {
    return openCache({
      directory: this.#o.directory,
      limitBytes: this.#o.limitBytes,
      log: this.#o.log,
      ...(this.#o.onRemoved ? { onRemoved: this.#o.onRemoved } : {}),
      ...(this.#o.adminToken !== undefined ? { adminToken: this.#o.adminToken } : {}),
    })
  }

  #attach(parts: CacheParts): void {
    this.#parts = parts
    this.#o.attach(parts)
    this.#scrubber = new Scrubber(parts.cache, {
      bytesPerSecond: this.#o.scrubBytesPerSecond,
      log: this.#o.log,
      ...(this.#o.onScrubbed ? { onChecked: this.#o.onScrubbed } : {}),
    })
    this.#scrubber.start()
  }

  /** A volume that was mounted late, or a disk that was full and got space, heals by itself. */
  async #retry(): Promise<void> {
    if (this.#retrying || this.#parts) return
    this.#retrying = true
    try {
      const parts = await this.#open()
      if (this.#stopped) {
        await parts.index.close()
        return
      }
      this.#attach(parts)
      this.#unavailable = undefined
      this.#o.log.info({ cacheDirectory: this.#o.directory, entries: parts.index.blobCount }, 'cache directory usable again: caching resumed')
      await this.#checkDirectory()
    } catch (err) {
      // Said once per kind of failure, not every 30 s: /readyz carries the reason.
      const now = this.#unusable(storageErrorCode(err))
      if (now !== this.#unavailable) this.#o.log.warn({ err: describe(err), cacheDirectory: this.#o.directory }, 'cache directory still unusable')
      this.#unavailable = now
    } finally {
      this.#retrying = false
    }
  }

  #unusable(code: string | undefined): string {
    return `cache directory unusable (${code ?? 'error'}): serving packages uncached, trying again every ${Math.round((this.#o.retryMs ?? 30_000) / 1000)} s`
  }

  /**
   * The directory check uses access(W_OK), not a test write: a full disk still serves (fills
   * fall back to uncached downloads), so it must not take the pod out of rotation.
   */
  async #checkDirectory(): Promise<void> {
    const store = this.#parts?.store
    if (!store) return
    this.#dirProblem = await access(store.tmpDir, constants.W_OK).then(
      () => undefined,
      (err: NodeJS.ErrnoException) => `cache directory is not writable (${err.code ?? 'error'})`,
    )
  }

  #every(ms: number, fn: () => void): void {
    const timer = setInterval(fn, ms)
    timer.unref()
    this.#timers.push(timer)
  }
}

import { BusyError } from '../../errors.js'

export interface DownloadSlotsOptions {
  /** Downloads that may run at once (fills and pass-throughs together). */
  max: number
  /** Downloads that may wait for a slot; one more is refused at once. */
  maxQueued: number
  /** The longest a download waits for a slot before its requests are refused. */
  queueTimeoutMs: number
  /** What a refused client is told to wait before retrying. */
  retryAfterSeconds: number
}

/** What one set of slots bounds: layer downloads, or manifest lookups before them. */
export type DownloadKind = 'layer' | 'manifest'

/** How refusals name what was full. */
const NOUNS: Record<DownloadKind, { many: string; one: string }> = {
  layer: { many: 'layer downloads', one: 'download' },
  manifest: { many: 'manifest lookups', one: 'manifest lookup' },
}

export const DEFAULT_DOWNLOAD_SLOTS: DownloadSlotsOptions = Object.freeze({
  // The registry client's agents keep at most 64 sockets per host: more would only queue there,
  // unseen, with their header timers already running.
  max: 64,
  maxQueued: 256,
  queueTimeoutMs: 30_000,
  // The bootstrap scripts retry every 5 s anyway.
  retryAfterSeconds: 5,
})

/**
 * Manifest lookups (one per distinct cold digest; coalesced like fills) take a slot of their
 * own before the layer download: a flood of digests that miss, or that the registry does not
 * have, then costs at most 32 registry requests at once and a bounded queue, not one pending
 * request per client. Lookups are small and quick, so fewer run at once, and more may wait.
 */
export const DEFAULT_LOOKUP_SLOTS: DownloadSlotsOptions = Object.freeze({
  max: 32,
  maxQueued: 1024,
  queueTimeoutMs: 30_000,
  retryAfterSeconds: 5,
})

/** A place in line for one download; {@link release} it exactly when the download is over. */
export interface DownloadTicket {
  /** Resolves when the download may start; rejects with a {@link BusyError} after the queue timeout. */
  readonly ready: Promise<void>
  /** Frees the slot (or the place in the queue). Idempotent. */
  release(): void
}

interface Waiter {
  grant(): void
  fail(err: Error): void
}

/**
 * A counting semaphore with a bounded, time-limited queue for upstream layer downloads. A flood
 * of cold requests for distinct layers then costs at most `max` registry connections and temp
 * files; the next `maxQueued` wait their turn, and beyond that clients get a 503 at once instead
 * of piling up sockets, memory and timers until something else gives way.
 * All bookkeeping is synchronous, so a slot is never granted twice.
 */
export class DownloadSlots {
  readonly #o: DownloadSlotsOptions
  readonly #kind: DownloadKind
  readonly #queue: Waiter[] = []
  #running = 0

  constructor(options: Partial<DownloadSlotsOptions> = {}, signal?: AbortSignal, kind: DownloadKind = 'layer') {
    this.#kind = kind
    this.#o = { ...(kind === 'layer' ? DEFAULT_DOWNLOAD_SLOTS : DEFAULT_LOOKUP_SLOTS), ...options }
    // Shutdown: nobody waiting will get a slot any more.
    signal?.addEventListener(
      'abort',
      () => {
        const reason = signal.reason instanceof Error ? signal.reason : new Error('shutting down')
        for (const w of this.#queue.splice(0)) w.fail(reason)
      },
      { once: true },
    )
  }

  get running(): number {
    return this.#running
  }

  get queued(): number {
    return this.#queue.length
  }

  /** Takes a slot, or a place in the queue; throws a {@link BusyError} when the queue is full. */
  enter(): DownloadTicket {
    if (this.#running < this.#o.max) {
      this.#running++
      return this.#holding()
    }
    if (this.#queue.length >= this.#o.maxQueued) {
      throw new BusyError(
        `${this.#running} ${NOUNS[this.#kind].many} are running and ${this.#queue.length} waiting; retry later`,
        this.#o.retryAfterSeconds,
        this.#kind,
      )
    }
    let state: 'waiting' | 'holding' | 'done' = 'waiting'
    let timer: NodeJS.Timeout | undefined
    const waiter: Waiter = { grant: () => undefined, fail: () => undefined }
    const leaveQueue = (): void => {
      const i = this.#queue.indexOf(waiter)
      if (i !== -1) this.#queue.splice(i, 1)
      clearTimeout(timer)
    }
    const ready = new Promise<void>((resolve, reject) => {
      waiter.grant = () => {
        clearTimeout(timer)
        state = 'holding'
        resolve()
      }
      waiter.fail = (err) => {
        clearTimeout(timer)
        state = 'done'
        reject(err)
      }
      timer = setTimeout(() => {
        if (state !== 'waiting') return
        state = 'done'
        leaveQueue()
        reject(
          new BusyError(`no ${NOUNS[this.#kind].one} slot became free within ${this.#o.queueTimeoutMs} ms; retry later`, this.#o.retryAfterSeconds, this.#kind),
        )
      }, this.#o.queueTimeoutMs)
    })
    // Whoever holds the ticket observes `ready`; this keeps an abandoned one from being "unhandled".
    ready.catch(() => undefined)
    this.#queue.push(waiter)
    return {
      ready,
      release: () => {
        if (state === 'waiting') {
          state = 'done'
          leaveQueue()
        } else if (state === 'holding') {
          state = 'done'
          this.#free()
        }
      },
    }
  }

  #holding(): DownloadTicket {
    let held = true
    return {
      ready: Promise.resolve(),
      release: () => {
        if (!held) return
        held = false
        this.#free()
      },
    }
  }

  #free(): void {
    this.#running--
    // The freed slot goes to the longest waiter; it counts as running from this moment.
    const next = this.#queue.shift()
    if (next) {
      this.#running++
      next.grant()
    }
  }
}

import { BusyError } from '../../errors.js'

export interface ExtractionSlotsOptions {
  /** Extractions that may run at once: each holds at most one file's bytes plus stream buffers. */
  max: number
  /** Extractions that may wait for a slot; one more is refused at once with a 503. */
  maxQueued: number
  /** What a refused client is told to wait before retrying. */
  retryAfterSeconds?: number
}

/**
 * A counting semaphore with a bounded queue for extractions of files from layers (icons,
 * rpp-get). Without it, memory and CPU grew with the number of concurrent requests for
 * distinct images, on routes that need no credentials: N requests held N files in memory and
 * inflated N layers at once. With it, at most `max` run, `maxQueued` wait in order, and the
 * rest are refused at once (BusyError: 503 with Retry-After) rather than piling up.
 */
export class ExtractionSlots {
  readonly #o: Required<ExtractionSlotsOptions>
  readonly #queue: Array<() => void> = []
  #running = 0

  constructor(o: ExtractionSlotsOptions) {
    this.#o = { retryAfterSeconds: 5, ...o }
  }

  /** Runs `work` once a slot is free; rejects with a BusyError when the queue is full. */
  async run<T>(work: () => Promise<T>): Promise<T> {
    if (this.#running >= this.#o.max) {
      if (this.#queue.length >= this.#o.maxQueued) {
        throw new BusyError(`too many file extractions running (${this.#o.max}) and waiting (${this.#o.maxQueued}); try again`, this.#o.retryAfterSeconds)
      }
      // The slot is handed over by release() without being freed in between: never granted twice.
      await new Promise<void>((resolve) => this.#queue.push(resolve))
    } else {
      this.#running++
    }
    try {
      return await work()
    } finally {
      const next = this.#queue.shift()
      if (next) next()
      else this.#running--
    }
  }

  /** Running and waiting extractions (tests, metrics). */
  get state(): { running: number; queued: number } {
    return { running: this.#running, queued: this.#queue.length }
  }
}

/** Space promised to one fill; `ready` settles when the bytes may be written. */
export interface Reservation {
  readonly size: number
  readonly ready: Promise<void>
  /** Returns the space. Call it once the temp file is closed and gone, not before. */
  release(): void
}

interface Waiting {
  size: number
  grant(): void
}

/**
 * The reservations of one cache: waiting ones in a queue (granted in order, each when it fits
 * beside every byte on disk, so a big one is never overtaken for ever by small ones), granted
 * ones counted until they are committed or released. Pure bookkeeping, no I/O.
 */
export class Reservations {
  /** Bytes of granted reservations (fills writing). */
  granted = 0
  /** Bytes of reservations waiting for the unlinks of their victims. */
  waiting = 0
  readonly #queue: Waiting[] = []
  readonly #consume = new WeakMap<Reservation, () => boolean>()

  /** `changed` is told whenever space comes back (the owner then grants what fits). */
  constructor(private readonly changed: () => void) {}

  create(size: number): Reservation {
    this.waiting += size
    let state: 'waiting' | 'granted' | 'committed' | 'released' = 'waiting'
    let waiting!: Waiting
    const ready = new Promise<void>((resolve) => {
      waiting = {
        size,
        grant: () => {
          state = 'granted'
          this.waiting -= size
          this.granted += size
          resolve()
        },
      }
    })
    this.#queue.push(waiting)
    const reservation: Reservation = {
      size,
      ready,
      release: () => {
        if (state === 'released' || state === 'committed') return
        if (state === 'waiting') {
          this.waiting -= size
          this.#queue.splice(this.#queue.indexOf(waiting), 1)
        } else this.granted -= size
        state = 'released'
        this.changed()
      },
    }
    this.#consume.set(reservation, () => {
      if (state !== 'granted') return false
      state = 'committed'
      this.granted -= size
      return true
    })
    return reservation
  }

  /** Grants waiting reservations, in order, while `fits` says the next one fits. */
  grant(fits: (size: number) => boolean): void {
    for (;;) {
      const head = this.#queue[0]
      if (!head || !fits(head.size)) return
      this.#queue.shift()
      head.grant()
    }
  }

  /**
   * Turns a granted reservation into nothing (its bytes become an entry's, counted by the
   * caller in the same synchronous step). False if it is not a granted reservation of ours.
   */
  consume(reservation: Reservation): boolean {
    return this.#consume.get(reservation)?.() ?? false
  }
}

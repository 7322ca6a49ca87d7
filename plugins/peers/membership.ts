/** How long a peer that failed (refused a connection, stalled, lied) is left out of owner choice. */
export const DEFAULT_DOWN_MS = 30_000

export interface MembershipOptions {
  /** This replica, as the others name it (its `--listen-address`). */
  self: string
  /** Every replica, `host:port`; `self` may be among them. */
  members: readonly string[]
  downMs?: number
  now?: () => number
}

/**
 * The replicas a layer's owner is chosen among: a fixed list (`--peers`) minus the peers that
 * failed in the last {@link DEFAULT_DOWN_MS}. Leaving a failed peer out for a while spares every
 * following request its timeout; it rejoins on its own, and a request that finds it still
 * failing falls back to the registry at once, as the first one did.
 */
export class Membership {
  readonly self: string
  readonly #members: readonly string[]
  readonly #downUntil = new Map<string, number>()
  readonly #downMs: number
  readonly #now: () => number

  constructor(o: MembershipOptions) {
    this.self = o.self
    this.#members = [...new Set([o.self, ...o.members])]
    this.#downMs = o.downMs ?? DEFAULT_DOWN_MS
    this.#now = o.now ?? Date.now
  }

  /** The members a layer's owner is chosen among now: this replica and the peers not down. */
  live(): string[] {
    const now = this.#now()
    return this.#members.filter((m) => m === this.self || (this.#downUntil.get(m) ?? 0) <= now)
  }

  /** The live members other than this replica. */
  others(): string[] {
    return this.live().filter((m) => m !== this.self)
  }

  /** Leaves `member` out of owner choice for a while. */
  markDown(member: string): void {
    if (member !== this.self) this.#downUntil.set(member, this.#now() + this.#downMs)
  }
}

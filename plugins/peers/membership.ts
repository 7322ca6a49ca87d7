/** How long a peer that failed (refused a connection, stalled, lied) is left out of owner choice. */
const DEFAULT_DOWN_MS = 30_000

export interface MembershipOptions {
  /** This replica, as the others name it (its `--listen-address`). */
  self: string
  /** Every replica, `host:port`; `self` may be among them. Replaced later by {@link Membership.set}. */
  members: readonly string[]
  downMs?: number
  now?: () => number
}

/**
 * The replicas a layer's owner is chosen among: a list (`--peers`, or the ready pods as the
 * Kubernetes API reports them) minus the peers that failed in the last {@link DEFAULT_DOWN_MS}. Leaving a failed peer out for a while spares every
 * following request its timeout; it rejoins on its own, and a request that finds it still
 * failing falls back to the registry at once, as the first one did.
 */
export class Membership {
  readonly self: string
  #members: readonly string[]
  readonly #downUntil = new Map<string, number>()
  readonly #downMs: number
  readonly #now: () => number

  constructor(o: MembershipOptions) {
    this.self = o.self
    this.#members = this.#withSelf(o.members)
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

  /**
   * Replaces the member list (the pods of the Deployment changed). A peer that is still a
   * member keeps its down time; one that left is forgotten, so an address that comes back
   * (a new pod on the same node) starts clean.
   */
  set(members: readonly string[]): void {
    this.#members = this.#withSelf(members)
    for (const m of this.#downUntil.keys()) if (!this.#members.includes(m)) this.#downUntil.delete(m)
  }

  /** Every member, down or not (this replica first). */
  all(): string[] {
    return [...this.#members]
  }

  /** Leaves `member` out of owner choice for a while. */
  markDown(member: string): void {
    if (member !== this.self) this.#downUntil.set(member, this.#now() + this.#downMs)
  }

  #withSelf(members: readonly string[]): string[] {
    // Self first, so a list that does not name this replica still includes it, once.
    return [...new Set([this.self, ...members])]
  }
}

/**
 * Bearer tokens per (source, realm, service, scope), kept until shortly before they expire so
 * a burst of cold requests costs one token fetch, not one each. Concurrent misses for the same
 * key share one fetch. Tokens live only in this map: never logged, never in an error.
 */
export class TokenCache {
  readonly #tokens = new Map<string, { token: string; refreshAt: number }>()
  readonly #pending = new Map<string, Promise<string>>()
  readonly #now: () => number

  constructor(now: () => number = Date.now) {
    this.#now = now
  }

  /** A cached token still comfortably valid, or undefined. */
  peek(key: string): string | undefined {
    const hit = this.#tokens.get(key)
    if (hit && hit.refreshAt > this.#now()) return hit.token
    if (hit) this.#tokens.delete(key)
    return undefined
  }

  /** Forgets a token the registry refused (a 401 with it), so the retry fetches a new one. */
  drop(key: string, token: string): void {
    if (this.#tokens.get(key)?.token === token) this.#tokens.delete(key)
  }

  /**
   * Returns the cached token or runs `fetch` once for all concurrent callers.
   * `fetch` reports the lifetime in seconds (the spec's default is 60 when absent).
   */
  async get(key: string, fetch: () => Promise<{ token: string; expiresIn: number }>): Promise<string> {
    const cached = this.peek(key)
    if (cached !== undefined) return cached
    let pending = this.#pending.get(key)
    if (!pending) {
      pending = (async () => {
        try {
          const { token, expiresIn } = await fetch()
          const lifetimeMs = Math.max(0, expiresIn) * 1000
          // Refresh 10% (at least 1 s, at most 30 s) early, so a token never expires mid-request.
          const margin = Math.min(30_000, Math.max(1_000, lifetimeMs / 10))
          this.#tokens.set(key, { token, refreshAt: this.#now() + lifetimeMs - margin })
          return token
        } finally {
          this.#pending.delete(key)
        }
      })()
      this.#pending.set(key, pending)
    }
    return pending
  }

  clear(): void {
    this.#tokens.clear()
  }
}

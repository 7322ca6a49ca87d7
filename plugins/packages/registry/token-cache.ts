/** How many tokens are kept at most; beyond that the least recently used go first. */
export const MAX_TOKENS = 1024
/** Expired tokens are swept at most this often (on a store, no timer of its own). */
const SWEEP_EVERY_MS = 60_000

/**
 * Bearer tokens per (source, realm, service, repository scope), kept until shortly before they
 * expire so a burst of cold requests costs one token fetch, not one each. A registry grants a
 * token for the repositories in its scope, so the scope is the repository pulled, never
 * anything else from the request. Because a client's `path` names a repository under its
 * source, the number of keys is the clients' choice: the cache is bounded ({@link MAX_TOKENS},
 * least recently used first) and expired tokens are swept, so distinct paths cannot grow it
 * without end. Concurrent misses for one key share one fetch. Tokens live only in this map:
 * never logged, never in an error.
 */
export class TokenCache {
  readonly #tokens = new Map<string, { token: string; refreshAt: number }>()
  readonly #pending = new Map<string, Promise<string>>()
  readonly #now: () => number
  readonly #max: number
  #lastSweep: number

  constructor(now: () => number = Date.now, maxEntries = MAX_TOKENS) {
    this.#now = now
    this.#max = Math.max(1, maxEntries)
    this.#lastSweep = now()
  }

  /** Tokens held now (expired ones not yet swept included). */
  get size(): number {
    return this.#tokens.size
  }

  /** A cached token still comfortably valid, or undefined. */
  peek(key: string): string | undefined {
    const hit = this.#tokens.get(key)
    if (hit && hit.refreshAt > this.#now()) {
      // Most recently used last: the bound drops from the front.
      this.#tokens.delete(key)
      this.#tokens.set(key, hit)
      return hit.token
    }
    if (hit) this.#tokens.delete(key)
    return undefined
  }

  /** Forgets a token the registry refused (a 401 with it), so the retry fetches a new one. */
  drop(key: string, token: string): void {
    if (this.#tokens.get(key)?.token === token) this.#tokens.delete(key)
  }

  /**
   * Returns the cached token or runs `fetch` once for all concurrent callers. `fetch` reports
   * the lifetime in seconds (the spec's default is 60 when absent).
   *
   * The shared fetch belongs to no caller: `signal` only ends this caller's wait. One client
   * that goes away (a pass-through whose reader disconnected) must not fail the token fetch
   * that other requests are waiting on; the fetch is bounded by its own timeouts instead.
   */
  async get(key: string, fetch: () => Promise<{ token: string; expiresIn: number }>, signal?: AbortSignal): Promise<string> {
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
          this.#store(key, token, this.#now() + lifetimeMs - margin)
          return token
        } finally {
          this.#pending.delete(key)
        }
      })()
      // Nobody may be waiting any more when it fails (every caller gave up): not unhandled.
      pending.catch(() => undefined)
      this.#pending.set(key, pending)
    }
    return signal ? abandonable(pending, signal) : pending
  }

  clear(): void {
    this.#tokens.clear()
  }

  #store(key: string, token: string, refreshAt: number): void {
    const now = this.#now()
    this.#tokens.delete(key)
    this.#tokens.set(key, { token, refreshAt })
    if (this.#tokens.size > this.#max || now - this.#lastSweep >= SWEEP_EVERY_MS) {
      this.#lastSweep = now
      for (const [k, v] of this.#tokens) if (v.refreshAt <= now) this.#tokens.delete(k)
    }
    // Still over: the least recently used go (Map order is use order, see peek).
    for (const k of this.#tokens.keys()) {
      if (this.#tokens.size <= this.#max) break
      this.#tokens.delete(k)
    }
  }
}

/** `promise`, or the abort reason of `signal` as soon as it aborts (the promise runs on). */
function abandonable<T>(promise: Promise<T>, signal: AbortSignal): Promise<T> {
  if (signal.aborted) return Promise.reject(reasonOf(signal))
  return new Promise<T>((resolve, reject) => {
    const onAbort = (): void => reject(reasonOf(signal))
    signal.addEventListener('abort', onAbort, { once: true })
    promise.then(
      (value) => {
        signal.removeEventListener('abort', onAbort)
        resolve(value)
      },
      (err: unknown) => {
        signal.removeEventListener('abort', onAbort)
        reject(err instanceof Error ? err : new Error(String(err)))
      },
    )
  })
}

function reasonOf(signal: AbortSignal): Error {
  return signal.reason instanceof Error ? signal.reason : new Error('aborted')
}

import { readFile } from 'node:fs/promises'

/** How long a token read from the file is reused: projected tokens rotate well before an hour. */
const DEFAULT_TOKEN_REFRESH_MS = 60_000

export interface TokenFileOptions {
  /** The pod's service-account token (`/var/run/secrets/kubernetes.io/serviceaccount/token`). */
  path: string
  refreshMs?: number
  now?: () => number
}

/**
 * A bearer token read from a file and read again once it is {@link DEFAULT_TOKEN_REFRESH_MS}
 * old, or at once after a peer refused it ({@link stale}): the kubelet rewrites a projected
 * service-account token as it rotates, and an old one stops authenticating. Reading on demand
 * needs no timer, so nothing outlives the server.
 */
export class TokenFile {
  readonly #o: TokenFileOptions
  #token: string | undefined
  #readAt = -Infinity
  #reading: Promise<string | undefined> | undefined

  constructor(o: TokenFileOptions) {
    this.#o = o
  }

  /** The token, or undefined when the file cannot be read (the peer then answers 401). */
  async get(): Promise<string | undefined> {
    const now = (this.#o.now ?? Date.now)()
    if (this.#token !== undefined && now - this.#readAt < (this.#o.refreshMs ?? DEFAULT_TOKEN_REFRESH_MS)) return this.#token
    // Concurrent requests share one read.
    this.#reading ??= readFile(this.#o.path, 'utf8')
      .then(
        (text) => {
          this.#token = text.trim() || undefined
          this.#readAt = now
          return this.#token
        },
        () => {
          this.#token = undefined
          return undefined
        },
      )
      .finally(() => (this.#reading = undefined))
    return this.#reading
  }

  /** The token was refused: read the file again on the next request. */
  stale(): void {
    this.#readAt = -Infinity
  }
}

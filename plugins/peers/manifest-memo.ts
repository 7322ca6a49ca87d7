import type { ManifestBytes } from '../packages/peer-port.js'
import { getRecent } from '../packages/cache/recent-map.js'

/** Manifests are a few KiB; this holds thousands of them in bounded memory. */
const DEFAULT_MEMO_BYTES = 16 * 1024 * 1024

/**
 * Verified manifests by digest, least recently used first out, so this replica can hand them
 * to a peer that cannot reach the registry. Only bytes that hashed to their digest are put
 * here, and the peer verifies them again: the memo can be stale, never wrong.
 */
export class ManifestMemo {
  readonly #entries = new Map<string, ManifestBytes>()
  readonly #limit: number
  #bytes = 0

  constructor(limitBytes = DEFAULT_MEMO_BYTES) {
    this.#limit = limitBytes
  }

  get(digest: string): ManifestBytes | undefined {
    return getRecent(this.#entries, digest)
  }

  put(digest: string, m: ManifestBytes): void {
    if (m.body.length > this.#limit) return
    const old = this.#entries.get(digest)
    if (old) {
      this.#bytes -= old.body.length
      this.#entries.delete(digest)
    }
    this.#entries.set(digest, m)
    this.#bytes += m.body.length
    for (const [key, value] of this.#entries) {
      if (this.#bytes <= this.#limit) break
      this.#entries.delete(key)
      this.#bytes -= value.body.length
    }
  }
}

import type { RegistrySource } from '../credentials/source.js'
import { sha256Digest, verifyDigest } from '../packages/manifest.js'
import type { RegistryClient } from '../packages/registry/registry-client.js'

/** A manifest (or index) as the registry stored it, with the digest of exactly these bytes. */
export interface FetchedManifest {
  digest: string
  body: Buffer
  mediaType: string
}

export interface ManifestResolverOptions {
  /**
   * How long a tag's answer is reused (default 5 s). Tags move, so this stays short: it only
   * spares the registry the same question from a burst of clients (a rollout fetching the CLI
   * on every node), which the current module asks once per request.
   */
  tagTtlMs?: number
  /** Remembered answers at most (oldest dropped first). */
  maxEntries?: number
  now?: () => number
}

/**
 * Resolves manifest references (tags or digests) to the bytes the registry holds. Concurrent
 * resolutions of one reference share one registry request; a tag's answer is then reused for
 * a few seconds. A digest reference is verified against the bytes; a tag's digest is computed
 * from the bytes received, so it names exactly what was served.
 */
export class ManifestResolver {
  readonly #client: RegistryClient
  readonly #pending = new Map<string, Promise<FetchedManifest>>()
  readonly #recent = new Map<string, { at: number; manifest: FetchedManifest }>()
  readonly #ttlMs: number
  readonly #max: number
  readonly #now: () => number

  constructor(client: RegistryClient, o: ManifestResolverOptions = {}) {
    this.#client = client
    this.#ttlMs = o.tagTtlMs ?? 5_000
    this.#max = o.maxEntries ?? 256
    this.#now = o.now ?? Date.now
  }

  /** The manifest `reference` names in repository `name` of `source`. */
  async fetch(source: RegistrySource, name: string, reference: string): Promise<FetchedManifest> {
    const key = `${source.scheme}://${source.registry}/${name}\n${reference}`
    const recent = this.#recent.get(key)
    if (recent && this.#now() - recent.at < this.#ttlMs) return recent.manifest
    let pending = this.#pending.get(key)
    if (!pending) {
      pending = this.#fetch(source, name, reference).finally(() => this.#pending.delete(key))
      this.#pending.set(key, pending)
      // Remember only what this very request fetched (a failure is never remembered).
      pending.then(
        (manifest) => this.#remember(key, manifest),
        () => undefined,
      )
    }
    return pending
  }

  async #fetch(source: RegistrySource, name: string, reference: string): Promise<FetchedManifest> {
    const { body, mediaType } = await this.#client.fetchManifest(source, name, reference)
    if (reference.startsWith('sha256:')) verifyDigest('manifest', body, reference)
    return { digest: sha256Digest(body), body, mediaType }
  }

  #remember(key: string, manifest: FetchedManifest): void {
    if (this.#ttlMs <= 0) return
    this.#recent.delete(key)
    this.#recent.set(key, { at: this.#now(), manifest })
    // Map order is insertion order: the first key is the oldest answer.
    while (this.#recent.size > this.#max) {
      const oldest = this.#recent.keys().next().value
      if (oldest === undefined) break
      this.#recent.delete(oldest)
    }
  }
}

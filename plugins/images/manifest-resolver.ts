import { ManifestError, ProxyError, UpstreamError } from '../../errors.js'
import type { RegistrySource } from '../credentials/source.js'
import { sha256Digest, verifyDigest } from '../packages/manifest.js'
import type { RegistryClient } from '../packages/registry/registry-client.js'
import type { Platform } from './image-ref.js'
import { isIndex, platformDigest } from './platform.js'

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
}

/** Remembered answers at most (oldest dropped first). */
const MAX_ENTRIES = 256

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
  readonly #tagLists = new Map<string, Promise<string[]>>()
  readonly #recentTags = new Map<string, { at: number; tags: string[] }>()
  readonly #ttlMs: number

  constructor(client: RegistryClient, o: ManifestResolverOptions = {}) {
    this.#client = client
    this.#ttlMs = o.tagTtlMs ?? 5_000
  }

  /** The manifest `reference` names in repository `name` of `source`. */
  async fetch(source: RegistrySource, name: string, reference: string): Promise<FetchedManifest> {
    const key = `${source.scheme}://${source.registry}/${name}\n${reference}`
    const recent = this.#recent.get(key)
    if (recent && Date.now() - recent.at < this.#ttlMs) return recent.manifest
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

  /**
   * The image manifest `top` stands for on `platform`: `top` itself, or its index entry, or the
   * entry of an index nested one level (the ETag must name the image served, not an index).
   * Deeper nesting is refused (502) rather than followed without end.
   */
  async image(source: RegistrySource, name: string, top: FetchedManifest, platform: Platform): Promise<FetchedManifest> {
    let manifest = top
    for (let depth = 0; isIndex(manifest.body, manifest.mediaType); depth++) {
      if (depth === 2) throw new ManifestError('the image index is nested more than one level deep')
      manifest = await this.fetch(source, name, platformDigest(manifest.body, platform))
    }
    return manifest
  }

  /**
   * Every tag of repository `name`, all pages (bounded by the client). Concurrent listings of one
   * repository share one walk through the pages, and its answer is reused for the tag TTL: 50
   * clients asking for a repository of 200 pages cost 200 registry requests, not 10,000.
   */
  async tags(source: RegistrySource, name: string): Promise<string[]> {
    const key = `${source.scheme}://${source.registry}/${name}`
    const recent = this.#recentTags.get(key)
    if (recent && Date.now() - recent.at < this.#ttlMs) return recent.tags
    let pending = this.#tagLists.get(key)
    if (!pending) {
      pending = this.#listTags(source, name).finally(() => this.#tagLists.delete(key))
      this.#tagLists.set(key, pending)
      pending.then(
        (tags) => this.#rememberTags(key, tags),
        () => undefined,
      )
    }
    return pending
  }

  async #listTags(source: RegistrySource, name: string): Promise<string[]> {
    try {
      return await this.#client.listTags(source, name)
    } catch (err) {
      // A Link that is no URL (`<http://[::1>`) fails in the URL parser: the registry's fault, a
      // 502 that says so, not a bare 500.
      if (err instanceof ProxyError || !(err instanceof Error) || err.name === 'AbortError' || err.name === 'TimeoutError') throw err
      const code = (err as NodeJS.ErrnoException).code
      throw new UpstreamError(
        code === 'ERR_INVALID_URL' ? 'registry sent a tag list Link that is not a valid URL' : `registry tag list could not be read (${code ?? err.name})`,
        undefined,
        { cause: err },
      )
    }
  }

  #rememberTags(key: string, tags: string[]): void {
    if (this.#ttlMs <= 0) return
    this.#recentTags.delete(key)
    this.#recentTags.set(key, { at: Date.now(), tags })
    while (this.#recentTags.size > 64) {
      const oldest = this.#recentTags.keys().next().value
      if (oldest === undefined) break
      this.#recentTags.delete(oldest)
    }
  }

  async #fetch(source: RegistrySource, name: string, reference: string): Promise<FetchedManifest> {
    const { body, mediaType } = await this.#client.fetchManifest(source, name, reference)
    if (reference.startsWith('sha256:')) verifyDigest('manifest', body, reference)
    return { digest: sha256Digest(body), body, mediaType }
  }

  #remember(key: string, manifest: FetchedManifest): void {
    if (this.#ttlMs <= 0) return
    this.#recent.delete(key)
    this.#recent.set(key, { at: Date.now(), manifest })
    // Map order is insertion order: the first key is the oldest answer.
    while (this.#recent.size > MAX_ENTRIES) {
      const oldest = this.#recent.keys().next().value
      if (oldest === undefined) break
      this.#recent.delete(oldest)
    }
  }
}

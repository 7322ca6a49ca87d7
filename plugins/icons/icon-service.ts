import semver from 'semver'
import { NotFoundError } from '../../errors.js'
import type { RegistrySource } from '../credentials/source.js'
import type { ManifestResolver } from '../images/manifest-resolver.js'
import { imageLayers, isIndex, platformDigest } from '../images/platform.js'
import type { RegistryClient } from '../packages/registry/registry-client.js'
import { flattenedFiles } from './layer-files.js'

/** The icon files looked for, best first, with what they are served as. */
export const ICON_FILES: ReadonlyArray<{ path: string; ext: string; contentType: string }> = [
  { path: 'docs/icon.svg', ext: 'svg', contentType: 'image/svg+xml' },
  { path: 'docs/icon.png', ext: 'png', contentType: 'image/png' },
  { path: 'docs/icon.jpg', ext: 'jpg', contentType: 'image/jpeg' },
  { path: 'docs/icon.jpeg', ext: 'jpeg', contentType: 'image/jpeg' },
]

/** The CONTRACT's limit: a bigger icon is not served (404). */
export const MAX_ICON_BYTES = 4 * 1024 * 1024

export interface Icon {
  data: Buffer
  ext: string
  contentType: string
}

export interface IconServiceOptions {
  client: RegistryClient
  manifests: ManifestResolver
  /** Memory for extracted icons, by manifest digest (default 32 MiB; least recently used go first). */
  cacheBytes?: number
}

/**
 * Package icons: `<repo>/<package>/version:<tag>` → the icon in the image's flattened
 * filesystem. Extracted icons (and "this image has none") are kept in memory by manifest digest,
 * which never changes meaning, bounded in bytes; concurrent requests for one digest share one
 * extraction. Memory rather than the disk cache: icons are small and the disk cache belongs to
 * the package service, whose internals this must not reach into.
 */
export class IconService {
  readonly #o: IconServiceOptions
  readonly #cache = new Map<string, Icon | null>()
  #cachedBytes = 0
  readonly #extracting = new Map<string, Promise<Icon | null>>()

  constructor(o: IconServiceOptions) {
    this.#o = o
  }

  /** The highest semantic-version tag of `<repo>/<package>/version`; 404 when there is none. */
  async latestVersion(source: RegistrySource, name: string): Promise<string> {
    const tags = await this.#o.client.listTags(source, name)
    const versions = tags.filter((t) => semver.valid(t) !== null)
    const best = versions.sort((a, b) => semver.rcompare(a, b))[0]
    if (best === undefined) throw new NotFoundError('the package has no semantic-version tag')
    return best
  }

  /** The manifest digest `tag` names, and the icon of that image (null when it has none). */
  async icon(source: RegistrySource, name: string, tag: string): Promise<{ digest: string; icon: Icon | null }> {
    const top = await this.#o.manifests.fetch(source, name, tag)
    const digest = top.digest
    const cached = this.#cache.get(digest)
    if (cached !== undefined) {
      // Refreshes its place: Map order is the LRU order.
      this.#cache.delete(digest)
      this.#cache.set(digest, cached)
      return { digest, icon: cached }
    }
    let pending = this.#extracting.get(digest)
    if (!pending) {
      pending = this.#extract(source, name, top.body, top.mediaType).finally(() => this.#extracting.delete(digest))
      this.#extracting.set(digest, pending)
      pending.then(
        (icon) => this.#remember(digest, icon),
        () => undefined,
      )
    }
    return { digest, icon: await pending }
  }

  async #extract(source: RegistrySource, name: string, body: Buffer, mediaType: string): Promise<Icon | null> {
    let image = body
    if (isIndex(body, mediaType)) {
      image = (await this.#o.manifests.fetch(source, name, platformDigest(body, { os: 'linux', architecture: 'amd64' }))).body
    }
    const files = await flattenedFiles(
      imageLayers(image),
      async (layer) => (await this.#o.client.openBlob(source, name, layer.digest)).body,
      ICON_FILES.map((f) => f.path),
      MAX_ICON_BYTES,
    )
    // The first one present is the icon; one over the limit is not served, not skipped.
    const choice = ICON_FILES.find((f) => files.has(f.path))
    const data = choice ? files.get(choice.path)?.data : undefined
    return choice && data ? { data, ext: choice.ext, contentType: choice.contentType } : null
  }

  #remember(digest: string, icon: Icon | null): void {
    const limit = this.#o.cacheBytes ?? 32 * 1024 * 1024
    const size = icon?.data.length ?? 0
    if (size > limit || this.#cache.has(digest)) return
    this.#cache.set(digest, icon)
    this.#cachedBytes += size
    for (const [key, value] of this.#cache) {
      if (this.#cachedBytes <= limit && this.#cache.size <= 4096) break
      this.#cache.delete(key)
      this.#cachedBytes -= value?.data.length ?? 0
    }
  }
}

import { createHash } from 'node:crypto'
import semver from 'semver'
import { NotFoundError } from '../../errors.js'
import type { RegistrySource } from '../credentials/source.js'
import type { ManifestResolver } from '../images/manifest-resolver.js'
import { imageLayers } from '../images/platform.js'
import type { LayerRef } from '../packages/manifest.js'
import type { RegistryClient } from '../packages/registry/registry-client.js'
import { ExtractionSlots, type ExtractionSlotsOptions } from './extraction-slots.js'
import { flattenedBest } from './layer-files.js'

/** The icon files looked for, best first, with what they are served as. */
const ICON_FILES: ReadonlyArray<{ path: string; ext: string; contentType: string }> = [
  { path: 'docs/icon.svg', ext: 'svg', contentType: 'image/svg+xml' },
  { path: 'docs/icon.png', ext: 'png', contentType: 'image/png' },
  { path: 'docs/icon.jpg', ext: 'jpg', contentType: 'image/jpeg' },
  { path: 'docs/icon.jpeg', ext: 'jpeg', contentType: 'image/jpeg' },
]

/** The icon size limit (README, "Package icons"): a bigger icon is not served (404). */
const MAX_ICON_BYTES = 4 * 1024 * 1024

/** Tar bytes one icon extraction may inflate, all layers together (a gzip bomb: 502). */
const MAX_ICON_INFLATED_BYTES = 1024 * 1024 * 1024
/** Memory for extracted icons, by manifest digest (least recently used go first). */
const ICON_CACHE_BYTES = 32 * 1024 * 1024

/** Default extraction bounds: see README ("Memory") for the formula they give. */
const DEFAULT_ICON_SLOTS: ExtractionSlotsOptions = Object.freeze({ max: 4, maxQueued: 64 })

export interface Icon {
  data: Buffer
  ext: string
  contentType: string
}

export interface IconServiceOptions {
  client: RegistryClient
  manifests: ManifestResolver
  /** Extractions at once and waiting (default {@link DEFAULT_ICON_SLOTS}). */
  slots?: ExtractionSlotsOptions
}

/**
 * Package icons: `<repo>/<package>/version:<tag>` → the icon in the image's flattened
 * filesystem. Extracted icons (and "this image has none") are kept in memory by manifest digest
 * and by the image's layer list (what the flattened filesystem depends on), bounded in bytes:
 * versions that share their layers (only the config differs) share one extraction. Concurrent
 * requests share one extraction, and extractions of distinct images run at most `slots.max` at
 * once (`slots.maxQueued` wait, the rest get a 503): memory stays bounded whatever the
 * concurrency on this unauthenticated route. Memory rather than the disk cache: icons are small
 * and the disk cache belongs to the package service, whose internals this must not reach into.
 */
export class IconService {
  readonly #o: IconServiceOptions
  readonly #cache = new Map<string, Icon | null>()
  #cachedBytes = 0
  readonly #extracting = new Map<string, Promise<Icon | null>>()
  readonly #slots: ExtractionSlots

  constructor(o: IconServiceOptions) {
    this.#o = o
    this.#slots = new ExtractionSlots(o.slots ?? DEFAULT_ICON_SLOTS)
  }

  /** The highest semantic-version tag of `<repo>/<package>/version`; 404 when there is none. */
  async latestVersion(source: RegistrySource, name: string): Promise<string> {
    const tags = await this.#o.manifests.tags(source, name)
    const versions = tags.filter((t) => semver.valid(t) !== null)
    const best = versions.sort((a, b) => semver.rcompare(a, b))[0]
    if (best === undefined) throw new NotFoundError('the package has no semantic-version tag')
    return best
  }

  /** The manifest digest `tag` names, and the icon of that image (null when it has none). */
  async icon(source: RegistrySource, name: string, tag: string): Promise<{ digest: string; icon: Icon | null }> {
    const top = await this.#o.manifests.fetch(source, name, tag)
    const digest = top.digest
    const cached = this.#lookup(digest)
    if (cached !== undefined) return { digest, icon: cached }
    const image = await this.#o.manifests.image(source, name, top, { os: 'linux', architecture: 'amd64' })
    const layers = imageLayers(image.body)
    const key = `layers:${createHash('sha256')
      .update(JSON.stringify(layers.map((l) => [l.digest, l.mediaType])))
      .digest('hex')}`
    let icon = this.#lookup(key)
    if (icon === undefined) {
      let pending = this.#extracting.get(key)
      if (!pending) {
        pending = this.#slots.run(() => this.#extract(source, name, layers)).finally(() => this.#extracting.delete(key))
        this.#extracting.set(key, pending)
        pending.then(
          (found) => this.#remember(key, found),
          () => undefined,
        )
      }
      icon = await pending
    }
    this.#remember(digest, icon)
    return { digest, icon }
  }

  /** Extractions running and waiting (tests). */
  get extractions(): { running: number; queued: number } {
    return this.#slots.state
  }

  async #extract(source: RegistrySource, name: string, layers: LayerRef[]): Promise<Icon | null> {
    const found = await flattenedBest(
      layers,
      async (layer) => (await this.#o.client.openBlob(source, name, layer.digest)).body,
      ICON_FILES.map((f) => f.path),
      { maxFileBytes: MAX_ICON_BYTES, maxInflatedBytes: MAX_ICON_INFLATED_BYTES },
    )
    // The first one present is the icon; one over the limit is not served, not skipped.
    const choice = ICON_FILES.find((f) => f.path === found?.path)
    return choice && found?.data ? { data: found.data, ext: choice.ext, contentType: choice.contentType } : null
  }

  /** A remembered answer (refreshing its place: Map order is the LRU order), else undefined. */
  #lookup(key: string): Icon | null | undefined {
    const cached = this.#cache.get(key)
    if (cached === undefined) return undefined
    this.#cache.delete(key)
    this.#cache.set(key, cached)
    return cached
  }

  #remember(key: string, icon: Icon | null): void {
    const limit = ICON_CACHE_BYTES
    const size = icon?.data.length ?? 0
    if (size > limit || this.#cache.has(key)) return
    this.#cache.set(key, icon)
    this.#cachedBytes += size
    for (const [k, value] of this.#cache) {
      if (this.#cachedBytes <= limit && this.#cache.size <= 4096) break
      this.#cache.delete(k)
      this.#cachedBytes -= value?.data.length ?? 0
    }
  }
}

import { NotFoundError } from '../../errors.js'
import type { RegistrySource } from '../credentials/source.js'
import { ExtractionSlots, type ExtractionSlotsOptions } from '../icons/extraction-slots.js'
import { flattenedBest } from '../icons/layer-files.js'
import type { PackageService } from '../packages/package-service.js'

/** The current module's limit on the rpp-get file. */
const MAX_RPP_GET_BYTES = 64 * 1024 * 1024

/** Tar bytes one rpp-get layer may inflate to (a gzip bomb is a 502, not minutes of CPU). */
const MAX_RPP_GET_INFLATED_BYTES = 1024 * 1024 * 1024

/**
 * Extractions at once and waiting. Each holds at most one file of up to 64 MiB, so memory stays
 * under `RPP_GET_CACHE_BYTES + max × 64 MiB` (+ stream buffers) whatever the number of nodes asking.
 */
const DEFAULT_RPP_GET_SLOTS: ExtractionSlotsOptions = Object.freeze({ max: 2, maxQueued: 32 })

export interface RppGetOptions {
  slots?: ExtractionSlotsOptions
}

/** Memory for extracted files (least recently used go first). */
const RPP_GET_CACHE_BYTES = 128 * 1024 * 1024

/**
 * The `rpp-get` file from the last layer of `<default source>@<digest>`. The layer comes from
 * the package service (verified, cached on disk, one download per layer, as for /package) and
 * is streamed through gunzip and a tar reader (hashed again on the way, like every layer read
 * for a file). Extracted files are kept in memory by manifest digest, bounded in bytes, and a
 * burst of nodes asking for one digest shares one extraction: nodes bootstrap together.
 * Extractions of distinct digests run at most `slots.max` at once; more wait, up to
 * `slots.maxQueued`, and beyond that are refused with a 503 and Retry-After.
 */
export class RppGetFiles {
  readonly #packages: PackageService
  readonly #limit: number
  readonly #cache = new Map<string, Buffer>()
  #bytes = 0
  readonly #pending = new Map<string, Promise<Buffer>>()
  readonly #slots: ExtractionSlots
  readonly #maxInflated: number

  constructor(packages: PackageService, o: RppGetOptions = {}) {
    this.#packages = packages
    this.#limit = RPP_GET_CACHE_BYTES
    this.#slots = new ExtractionSlots(o.slots ?? DEFAULT_RPP_GET_SLOTS)
    this.#maxInflated = MAX_RPP_GET_INFLATED_BYTES
  }

  /** The file's bytes; a NotFoundError when the layer has no regular `rpp-get` up to 64 MiB. */
  async get(source: RegistrySource, digest: string): Promise<{ data: Buffer; result: 'memory' | 'extracted' }> {
    const key = `${source.repository}@${digest}`
    const cached = this.#cache.get(key)
    if (cached) {
      this.#cache.delete(key)
      this.#cache.set(key, cached)
      return { data: cached, result: 'memory' }
    }
    let pending = this.#pending.get(key)
    if (!pending) {
      pending = this.#slots.run(() => this.#extract(source, digest)).finally(() => this.#pending.delete(key))
      this.#pending.set(key, pending)
      pending.then(
        (data) => this.#remember(key, data),
        () => undefined,
      )
    }
    return { data: await pending, result: 'extracted' }
  }

  async #extract(source: RegistrySource, digest: string): Promise<Buffer> {
    const name = source.namePrefix
    const pkg = await this.#packages.resolve(source, name, digest)
    const file = await flattenedBest([pkg.layer], async (layer) => (await this.#packages.open(source, name, pkg, 0, layer.size - 1)).stream, ['rpp-get'], {
      maxFileBytes: MAX_RPP_GET_BYTES,
      maxInflatedBytes: this.#maxInflated,
    })
    if (!file) throw new NotFoundError('the layer has no regular file rpp-get')
    if (!file.data) throw new NotFoundError(`rpp-get in the layer is larger than ${MAX_RPP_GET_BYTES} bytes`)
    return file.data
  }

  #remember(key: string, data: Buffer): void {
    if (data.length > this.#limit || this.#cache.has(key)) return
    this.#cache.set(key, data)
    this.#bytes += data.length
    for (const [k, v] of this.#cache) {
      if (this.#bytes <= this.#limit) break
      this.#cache.delete(k)
      this.#bytes -= v.length
    }
  }
}

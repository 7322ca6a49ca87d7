import { NotFoundError } from '../../errors.js'
import type { RegistrySource } from '../credentials/source.js'
import { flattenedFiles } from '../icons/layer-files.js'
import type { PackageService } from '../packages/package-service.js'

/** The current module's limit on the rpp-get file. */
export const MAX_RPP_GET_BYTES = 64 * 1024 * 1024

/**
 * The `rpp-get` file from the last layer of `<default source>@<digest>`. The layer comes from
 * the package service (verified, cached on disk, one download per layer, as for /package) and
 * is streamed through gunzip and a tar reader (hashed again on the way, like every layer read
 * for a file). Extracted files are kept in memory by manifest digest, bounded in bytes, and a
 * burst of nodes asking for one digest shares one extraction: nodes bootstrap together.
 */
export class RppGetFiles {
  readonly #packages: PackageService
  readonly #limit: number
  readonly #cache = new Map<string, Buffer>()
  #bytes = 0
  readonly #pending = new Map<string, Promise<Buffer>>()

  constructor(packages: PackageService, cacheBytes = 128 * 1024 * 1024) {
    this.#packages = packages
    this.#limit = cacheBytes
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
      pending = this.#extract(source, digest).finally(() => this.#pending.delete(key))
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
    const files = await flattenedFiles(
      [pkg.layer],
      async (layer) => (await this.#packages.open(source, name, pkg, 0, layer.size - 1)).stream,
      ['rpp-get'],
      MAX_RPP_GET_BYTES,
    )
    const file = files.get('rpp-get')
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

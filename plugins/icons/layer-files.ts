import { posix } from 'node:path'
import type { Readable } from 'node:stream'
import { pipeline } from 'node:stream/promises'
import { extract, type Header } from 'tar-stream'
import type { LayerRef } from '../packages/manifest.js'
import { inflateBudget, inflateLimiter, layerDecoder, layerReadError, verifier, type InflateBudget } from './layer-stream.js'

/** The file chosen from the flattened filesystem: its bytes, or only its size when too big. */
export interface FoundFile {
  path: string
  size: number
  /** Absent when the file is larger than the limit: it exists, but is not served. */
  data?: Buffer
}

export interface ExtractLimits {
  /** A wanted file larger than this is reported by size only. */
  maxFileBytes: number
  /** Tar bytes (after gunzip) read across all layers of one extraction: bounds a gzip bomb. */
  maxInflatedBytes: number
}

const WHITEOUT = '.wh.'
const OPAQUE = '.wh..wh..opq'

/**
 * A tar member name as a path relative to the image root: `./a/b`, `/a/b` and `a//b/` all
 * become `a/b`. Undefined for the root itself and for names that climb out of it.
 */
export function normalizeName(name: string): string | undefined {
  const n = posix.normalize(`/${name}`).replace(/^\/+|\/+$/g, '')
  return n === '' || n === '.' || n.split('/').includes('..') ? undefined : n
}

/** What one layer says about the paths asked for, applied over the layers below it. */
interface LayerChanges {
  /** Whiteouts and non-directory entries: everything at or below these paths goes. */
  removed: string[]
  /** Opaque directories: everything below them from lower layers goes. */
  opaque: string[]
  /** Wanted paths this layer sets (a regular file, by size) or clears (anything else there). */
  set: Map<string, number | undefined>
}

/**
 * The one file whose bytes an extraction holds: the best-ranked wanted path seen so far. Memory
 * per extraction is then one file (at most `maxFileBytes`), not one per wanted path.
 */
interface Holder {
  // `| undefined`: a holder is emptied by assigning undefined, not by deleting its fields.
  path?: string | undefined
  layer?: number | undefined
  data?: Buffer | undefined
}

function under(path: string, dir: string): boolean {
  return path === dir || path.startsWith(`${dir}/`)
}

/** Reads one layer's tar stream, draining every entry, holding at most the best wanted file. */
async function readLayer(
  body: Readable,
  layer: LayerRef,
  index: number,
  wanted: readonly string[],
  holder: Holder,
  limits: ExtractLimits,
  budget: InflateBudget,
): Promise<LayerChanges> {
  const changes: LayerChanges = { removed: [], opaque: [], set: new Map() }
  const rank = (p: string): number => wanted.indexOf(p)
  const tar = extract()
  tar.on('entry', (header: Header, stream, next) => {
    const path = normalizeName(header.name)
    const regular = header.type === 'file' || header.type === 'contiguous-file'
    const base = path === undefined ? '' : posix.basename(path)
    const dir = path === undefined ? '' : posix.dirname(path)
    // Only what can touch a wanted path is remembered: a big layer's other names are not kept.
    const touches = (prefix: string): boolean => wanted.some((w) => prefix === '' || under(w, prefix))
    if (path !== undefined && base === OPAQUE) {
      const opaque = dir === '.' ? '' : dir
      if (touches(opaque)) changes.opaque.push(opaque)
    } else if (path !== undefined && base.startsWith(WHITEOUT)) {
      const removed = posix.join(dir, base.slice(WHITEOUT.length))
      if (touches(removed)) changes.removed.push(removed)
    } else if (path !== undefined && header.type !== 'directory') {
      // A symlink or a file where a directory was replaces the whole directory below it.
      if (wanted.some((w) => w.startsWith(`${path}/`))) changes.removed.push(`${path}/`)
      // Anything but a regular file at a wanted path hides the file lower layers had there.
      if (wanted.includes(path) && !regular) changes.set.set(path, undefined)
    }
    const keep = path !== undefined && regular && wanted.includes(path)
    // Held only when it outranks what is held: the old bytes go before the new are read.
    const hold = keep && (holder.path === undefined || rank(path) <= rank(holder.path))
    // Allocated once at its final size: no chunk list and no concatenated copy of it.
    const data = hold && header.size <= limits.maxFileBytes ? Buffer.allocUnsafe(header.size) : undefined
    if (hold) Object.assign(holder, { path, layer: index, data: undefined })
    let size = 0
    stream.on('data', (c: unknown) => {
      const chunk = c as Buffer
      if (data && size + chunk.length <= data.length) chunk.copy(data, size)
      size += chunk.length
    })
    stream.once('error', (err: Error) => next(err))
    stream.once('end', () => {
      if (keep) changes.set.set(path, size)
      if (data && holder.path === path && holder.layer === index && size === data.length) holder.data = data
      next()
    })
  })
  const decoder = layerDecoder(layer)
  try {
    if (decoder) await pipeline(body, verifier(layer), decoder, inflateLimiter(layer, budget), tar)
    else await pipeline(body, verifier(layer), inflateLimiter(layer, budget), tar)
  } catch (err) {
    throw layerReadError(err, layer)
  }
  return changes
}

/**
 * The first of `paths` (best first) present in the image's flattened filesystem, by streaming
 * every layer in order through a digest check, the decompressor its media type names and a tar
 * reader: later layers win, `.wh.<name>` whiteouts and `.wh..wh..opq` opaque directories remove
 * what lower layers had, and only regular files count. No layer is held whole, and only one
 * file's bytes at a time (at most `maxFileBytes`; a bigger one is reported by size only). In the
 * rare case the winner's bytes were let go for a better file a later layer then removed, its
 * layer is read once more. Rejects when a layer does not verify: nothing read from an
 * unverified layer is returned.
 */
export async function flattenedBest(
  layers: readonly LayerRef[],
  open: (layer: LayerRef) => Promise<Readable>,
  paths: readonly string[],
  limits: ExtractLimits,
): Promise<FoundFile | undefined> {
  const budget = inflateBudget(limits.maxInflatedBytes)
  const holder: Holder = {}
  const files = new Map<string, { size: number; layer: number }>()
  for (const [index, layer] of layers.entries()) {
    const changes = await readLayer(await open(layer), layer, index, paths, holder, limits, budget)
    for (const [path] of files) {
      const gone =
        changes.removed.some((r) => (r.endsWith('/') ? path.startsWith(r) : under(path, r))) || changes.opaque.some((d) => d === '' || path.startsWith(`${d}/`))
      if (gone) files.delete(path)
    }
    for (const [path, size] of changes.set) {
      if (size === undefined) files.delete(path)
      else files.set(path, { size, layer: index })
    }
    // Bytes of a file that is gone are let go at once, so a later file can be held instead.
    if (holder.path !== undefined && files.get(holder.path)?.layer !== holder.layer) holder.path = holder.layer = holder.data = undefined
  }
  const path = paths.find((p) => files.has(p))
  const found = path === undefined ? undefined : files.get(path)
  if (path === undefined || !found) return undefined
  if (found.size > limits.maxFileBytes) return { path, size: found.size }
  if (holder.path === path && holder.layer === found.layer && holder.data) return { path, size: found.size, data: holder.data }
  const layer = layers[found.layer]
  if (!layer) return undefined
  const again: Holder = {}
  await readLayer(await open(layer), layer, found.layer, [path], again, limits, budget)
  return again.data ? { path, size: found.size, data: again.data } : undefined
}

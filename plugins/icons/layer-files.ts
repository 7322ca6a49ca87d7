import { createHash } from 'node:crypto'
import { posix } from 'node:path'
import { Transform, type Readable, type TransformCallback } from 'node:stream'
import { pipeline } from 'node:stream/promises'
import { createGunzip } from 'node:zlib'
import { extract, type Header } from 'tar-stream'
import { DigestError, ManifestError } from '../../errors.js'
import type { LayerRef } from '../packages/manifest.js'

/** A file looked for in the flattened filesystem: its bytes, or only its size when too big. */
export interface FoundFile {
  size: number
  /** Absent when the file is larger than the limit: it exists, but is not served. */
  data?: Buffer
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

/** Hashes and counts bytes as they pass; fails at the end unless they are exactly `layer`. */
function verifier(layer: LayerRef): Transform {
  const hash = createHash('sha256')
  let size = 0
  return new Transform({
    transform(chunk: Buffer, _encoding, callback: TransformCallback) {
      hash.update(chunk)
      size += chunk.length
      if (size > layer.size) callback(new ManifestError(`layer ${layer.digest} is larger than its manifest says`))
      else callback(null, chunk)
    },
    flush(callback: TransformCallback) {
      const found = `sha256:${hash.digest('hex')}`
      if (size !== layer.size || found !== layer.digest) callback(new DigestError('layer', layer.digest, found))
      else callback()
    },
  })
}

/** What one layer says about the paths asked for, applied over the layers below it. */
interface LayerChanges {
  /** Whiteouts and non-directory entries: everything at or below these paths goes. */
  removed: string[]
  /** Opaque directories: everything below them from lower layers goes. */
  opaque: string[]
  /** Wanted paths this layer sets (a regular file) or clears (anything else there). */
  set: Map<string, FoundFile | undefined>
}

function under(path: string, dir: string): boolean {
  return path === dir || path.startsWith(`${dir}/`)
}

/** Reads one layer's tar stream, draining every entry, keeping only wanted regular files. */
async function readLayer(body: Readable, layer: LayerRef, wanted: ReadonlySet<string>, maxBytes: number): Promise<LayerChanges> {
  const changes: LayerChanges = { removed: [], opaque: [], set: new Map() }
  const tar = extract()
  tar.on('entry', (header: Header, stream, next) => {
    const path = normalizeName(header.name)
    const regular = header.type === 'file' || header.type === 'contiguous-file'
    const base = path === undefined ? '' : posix.basename(path)
    const dir = path === undefined ? '' : posix.dirname(path)
    // Only what can touch a wanted path is remembered: a big layer's other names are not kept.
    const touches = (prefix: string): boolean => [...wanted].some((w) => prefix === '' || under(w, prefix))
    if (path !== undefined && base === OPAQUE) {
      const opaque = dir === '.' ? '' : dir
      if (touches(opaque)) changes.opaque.push(opaque)
    } else if (path !== undefined && base.startsWith(WHITEOUT)) {
      const removed = posix.join(dir, base.slice(WHITEOUT.length))
      if (touches(removed)) changes.removed.push(removed)
    } else if (path !== undefined && header.type !== 'directory') {
      // A symlink or a file where a directory was replaces the whole directory below it.
      if ([...wanted].some((w) => w.startsWith(`${path}/`))) changes.removed.push(`${path}/`)
      // Anything but a regular file at a wanted path hides the file lower layers had there.
      if (wanted.has(path) && !regular) changes.set.set(path, undefined)
    }
    const keep = path !== undefined && regular && wanted.has(path) && base !== OPAQUE && !base.startsWith(WHITEOUT)
    const chunks: Buffer[] = []
    let size = 0
    stream.on('data', (data: unknown) => {
      const chunk = data as Buffer
      size += chunk.length
      // Only wanted files up to the limit are held; everything else is read and dropped.
      if (keep && size <= maxBytes) chunks.push(chunk)
    })
    stream.once('error', (err: Error) => next(err))
    stream.once('end', () => {
      if (keep && path !== undefined) changes.set.set(path, size <= maxBytes ? { size, data: Buffer.concat(chunks) } : { size })
      next()
    })
  })
  await pipeline(body, verifier(layer), createGunzip(), tar)
  return changes
}

/**
 * The files at `paths` in the image's flattened filesystem, by streaming every layer in order
 * through a digest check, gunzip and a tar reader: later layers win, `.wh.<name>` whiteouts and
 * `.wh..wh..opq` opaque directories remove what lower layers had, and only regular files count.
 * No layer is ever held whole; a wanted file is held only up to `maxBytes` (a bigger one is
 * reported by size only). Rejects with a DigestError when a layer's bytes do not match: nothing
 * read from an unverified layer is returned.
 */
export async function flattenedFiles(
  layers: readonly LayerRef[],
  open: (layer: LayerRef) => Promise<Readable>,
  paths: readonly string[],
  maxBytes: number,
): Promise<Map<string, FoundFile>> {
  const wanted = new Set(paths)
  const files = new Map<string, FoundFile>()
  for (const layer of layers) {
    const changes = await readLayer(await open(layer), layer, wanted, maxBytes)
    for (const [path] of files) {
      const gone =
        changes.removed.some((r) => (r.endsWith('/') ? path.startsWith(r) : under(path, r))) ||
        changes.opaque.some((d) => d === '' || path.startsWith(`${d}/`))
      if (gone) files.delete(path)
    }
    for (const [path, file] of changes.set) {
      if (file === undefined) files.delete(path)
      else files.set(path, file)
    }
  }
  return files
}

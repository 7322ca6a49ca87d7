import { createHash, randomBytes } from 'node:crypto'
import { mkdir, readdir, readFile, rename, rm, stat, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { DIGEST } from '../packages/manifest.js'
import type { ManifestBytes } from '../packages/peer-port.js'

/** Under the cache directory: the cache's own layout (blobs/, tmp/, the index) never looks here. */
export const MANIFEST_FILES_DIR = 'peer-manifests'

const NAME = /^[0-9a-f]{64}$/
const TEMP_PREFIX = '.tmp-'
/** Files read at once at start. */
const LOAD_BATCH = 32

export interface LoadedManifests {
  /** Oldest first, so putting them into the memo in order rebuilds its recency. */
  manifests: Array<{ digest: string; manifest: ManifestBytes }>
  /** Files that did not hash to their name (torn by a power loss, written to by someone): deleted. */
  corrupt: string[]
  /** Files beyond the bound (the oldest), and temp files of a process that died: deleted. */
  dropped: number
}

/**
 * The memo's manifests as files, one per digest (`<dir>/<64 hex>`: the media type, a newline,
 * then the manifest's bytes exactly as verified), so a restarted replica still serves its
 * peers while the registry is down. Content-addressed like the blob store, and trusted no more
 * than it: every file is hashed against its name when read back, and one that does not match
 * is deleted, never served. Written to a temp name and renamed, so a crash leaves the old file
 * or the new one; not fsynced, because a file a power loss tore fails that check and is only a
 * manifest the registry (or another peer) gives again.
 */
export class ManifestFiles {
  readonly dir: string

  constructor(dir: string) {
    this.dir = dir
  }

  /** Creates the folder and reads back what it holds, newest kept up to `limitBytes` of manifests. */
  async load(limitBytes: number): Promise<LoadedManifests> {
    await mkdir(this.dir, { recursive: true })
    const found: Array<{ digest: string; manifest: ManifestBytes; mtimeMs: number }> = []
    const out: LoadedManifests = { manifests: [], corrupt: [], dropped: 0 }
    const readOne = async (name: string): Promise<void> => {
      const path = join(this.dir, name)
      if (!NAME.test(name)) {
        await rm(path, { force: true, recursive: true })
        out.dropped++
        return
      }
      const digest = `sha256:${name}`
      const [text, info] = await Promise.all([readFile(path), stat(path)])
      const manifest = decode(text)
      if (!manifest || `sha256:${createHash('sha256').update(manifest.body).digest('hex')}` !== digest) {
        await rm(path, { force: true })
        out.corrupt.push(digest)
        return
      }
      found.push({ digest, manifest, mtimeMs: info.mtimeMs })
    }
    // A few files at a time: thousands of small reads one by one would hold the listener back
    // for seconds (measured: 4,096 files of 4 KiB, 16 MiB, took 1.6 s one by one, 0.5 s so).
    const names = await readdir(this.dir)
    for (let i = 0; i < names.length; i += LOAD_BATCH) await Promise.all(names.slice(i, i + LOAD_BATCH).map(readOne))
    found.sort((a, b) => b.mtimeMs - a.mtimeMs)
    let bytes = 0
    for (const f of found) {
      bytes += f.manifest.body.length
      if (bytes <= limitBytes) out.manifests.push({ digest: f.digest, manifest: f.manifest })
      else {
        await this.remove(f.digest)
        out.dropped++
      }
    }
    out.manifests.reverse()
    return out
  }

  async write(digest: string, m: ManifestBytes): Promise<void> {
    const path = this.#pathFor(digest)
    const temp = join(this.dir, `${TEMP_PREFIX}${randomBytes(6).toString('hex')}`)
    try {
      await writeFile(temp, Buffer.concat([Buffer.from(`${m.mediaType}\n`), m.body]), { mode: 0o600 })
      await rename(temp, path)
    } catch (err) {
      await rm(temp, { force: true })
      throw err
    }
  }

  async remove(digest: string): Promise<void> {
    await rm(this.#pathFor(digest), { force: true })
  }

  /** Paths only from a validated digest: no request names a file outside the folder. */
  #pathFor(digest: string): string {
    if (!DIGEST.test(digest)) throw new Error(`not a sha256 digest: ${JSON.stringify(digest)}`)
    return join(this.dir, digest.slice('sha256:'.length))
  }
}

/** The media type line, then the body; undefined when there is no line (a torn file). */
function decode(file: Buffer): ManifestBytes | undefined {
  const newline = file.indexOf(0x0a)
  if (newline < 0) return undefined
  return { mediaType: file.subarray(0, newline).toString('utf8'), body: file.subarray(newline + 1) }
}

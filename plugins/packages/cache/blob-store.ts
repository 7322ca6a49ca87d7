import { randomBytes } from 'node:crypto'
import { mkdir, open, readdir, readFile, rename, rm } from 'node:fs/promises'
import { dirname, join } from 'node:path'
import { DIGEST } from '../manifest.js'

/** A file's identity for a lease's `stamp`: any write or replacement changes it (ctime too). */
export function fileStamp(st: { ino: number; size: number; mtimeMs: number; ctimeMs: number }): string {
  return `${st.ino}:${st.size}:${st.mtimeMs}:${st.ctimeMs}`
}

/** The part of a file handle a fill uses; tests substitute one that fails like a full disk. */
export interface TempFile {
  write(buffer: Buffer, offset: number, length: number, position: number): Promise<{ bytesWritten: number }>
  read(buffer: Buffer, offset: number, length: number, position: number): Promise<{ bytesRead: number }>
  /** Flushes the file's data to the device (fsync), before it may be renamed into place. */
  sync(): Promise<void>
  close(): Promise<void>
}

/**
 * The on-disk layout this code writes and reads. A directory written by a newer version (a
 * higher number) is not touched: the proxy serves uncached rather than guess at its meaning.
 * An older layout would be migrated here, in {@link BlobStore.init}; version 1 is the first.
 */
export const LAYOUT_VERSION = 1
const LAYOUT_FILE = 'layout.json'

/** The cache directory holds a layout this version does not know (written by a newer one). */
export class LayoutError extends Error {
  readonly code = 'ELAYOUT'
  constructor(readonly found: unknown) {
    super(`cache directory layout ${JSON.stringify(found)} is not ${LAYOUT_VERSION}`)
    this.name = 'LayoutError'
  }
}

/**
 * Layer files on disk, named by their digest: `<dir>/blobs/sha256/<2 hex>/<64 hex>` (the
 * content store; the index lives beside it). A file appears under that name only by an atomic
 * rename of a fully written, verified and fsynced temp file from `<dir>/tmp/`, followed by an
 * fsync of its directory, so after a power loss any file under `blobs/` is complete; anything in
 * `tmp/` after a restart is debris and is deleted. Paths are only ever built from a validated
 * digest, so no request can name a file outside the cache directory.
 */
export class BlobStore {
  readonly blobsDir: string
  readonly tmpDir: string
  readonly #root: string

  constructor(directory: string) {
    this.#root = directory
    this.blobsDir = join(directory, 'blobs', 'sha256')
    this.tmpDir = join(directory, 'tmp')
  }

  /** Creates the folders, and checks (or, on a new directory, writes) the layout version. */
  async init(): Promise<void> {
    await mkdir(this.blobsDir, { recursive: true })
    await mkdir(this.tmpDir, { recursive: true })
    const path = join(this.#root, LAYOUT_FILE)
    const text = await readFile(path, 'utf8').catch((err: NodeJS.ErrnoException) => {
      if (err.code === 'ENOENT') return undefined
      throw err
    })
    if (text === undefined) {
      // A directory without the file is new, or was written before versions existed; both
      // hold layout 1. Written like a blob: temp file, fsync, rename, fsync of the folder.
      const temp = join(this.tmpDir, `${LAYOUT_FILE}.${randomBytes(6).toString('hex')}`)
      const handle = await open(temp, 'wx', 0o600)
      try {
        await handle.writeFile(`${JSON.stringify({ version: LAYOUT_VERSION })}\n`)
        await handle.sync()
      } finally {
        await handle.close()
      }
      await rename(temp, path)
      await syncDirectory(this.#root)
      return
    }
    let version: unknown
    try {
      version = (JSON.parse(text) as { version?: unknown }).version
    } catch {
      version = text.trim()
    }
    if (version !== LAYOUT_VERSION) throw new LayoutError(version)
  }

  pathFor(digest: string): string {
    if (!DIGEST.test(digest)) throw new Error(`not a sha256 digest: ${JSON.stringify(digest)}`)
    const hex = digest.slice('sha256:'.length)
    return join(this.blobsDir, hex.slice(0, 2), hex)
  }

  /** A new temp file open for writing and reading (readers share it while it grows). */
  async createTemp(): Promise<{ path: string; handle: TempFile }> {
    const path = join(this.tmpDir, `${Date.now()}-${randomBytes(6).toString('hex')}.partial`)
    const handle = await open(path, 'wx+', 0o600)
    return { path, handle }
  }

  /**
   * Moves a verified temp file to its final name: fsync of the data, atomic rename, fsync of
   * the folder that now names it. Without the first, a power loss can leave a file of the
   * right size whose blocks never reached the disk; without the last, the rename itself.
   */
  async commit(temp: { path: string; handle: TempFile }, digest: string): Promise<string> {
    const final = this.pathFor(digest)
    await temp.handle.sync()
    const shard = dirname(final)
    const created = await mkdir(shard, { recursive: true })
    if (created !== undefined) await syncDirectory(this.blobsDir)
    await rename(temp.path, final)
    await syncDirectory(shard)
    return final
  }

  async remove(digest: string): Promise<void> {
    await rm(this.pathFor(digest), { force: true })
  }

  async removeTemp(path: string): Promise<void> {
    await rm(path, { force: true })
  }

  /** Deletes everything in `tmp/`: partial fills of a process that died. */
  async clearTemp(): Promise<number> {
    const names = await readdir(this.tmpDir).catch(() => [] as string[])
    await Promise.all(names.map((n) => rm(join(this.tmpDir, n), { force: true, recursive: true })))
    return names.length
  }

  /** Every file under `blobs/`, with whether its name is a digest we could have written. */
  async list(): Promise<Array<{ path: string; digest?: string }>> {
    const out: Array<{ path: string; digest?: string }> = []
    const shards = await readdir(this.blobsDir, { withFileTypes: true }).catch(() => [])
    for (const shard of shards) {
      const shardPath = join(this.blobsDir, shard.name)
      if (!shard.isDirectory()) {
        out.push({ path: shardPath })
        continue
      }
      for (const name of await readdir(shardPath)) {
        const digest = `sha256:${name}`
        const ok = DIGEST.test(digest) && name.startsWith(shard.name)
        out.push(ok ? { path: join(shardPath, name), digest } : { path: join(shardPath, name) })
      }
    }
    return out
  }
}

/** fsync of a directory, so the names created or renamed in it survive a power loss. */
async function syncDirectory(path: string): Promise<void> {
  const dir = await open(path, 'r')
  try {
    await dir.sync()
  } finally {
    await dir.close()
  }
}

import { randomBytes } from 'node:crypto'
import { mkdir, open, readdir, rename, rm } from 'node:fs/promises'
import { join } from 'node:path'
import { DIGEST } from './manifest.js'

/** The part of a file handle a fill uses; tests substitute one that fails like a full disk. */
export interface TempFile {
  write(buffer: Buffer, offset: number, length: number, position: number): Promise<{ bytesWritten: number }>
  read(buffer: Buffer, offset: number, length: number, position: number): Promise<{ bytesRead: number }>
  close(): Promise<void>
}

/**
 * Layer files on disk, named by their digest: `<dir>/blobs/sha256/<2 hex>/<64 hex>`.
 * A file appears under that name only by an atomic rename of a fully written, verified temp
 * file from `<dir>/tmp/`, so any file under `blobs/` is complete; anything in `tmp/` after a
 * restart is debris from a crash and is deleted. Paths are only ever built from a validated
 * digest, so no request can name a file outside the cache directory.
 */
export class BlobStore {
  readonly blobsDir: string
  readonly tmpDir: string

  constructor(readonly directory: string) {
    this.blobsDir = join(directory, 'blobs', 'sha256')
    this.tmpDir = join(directory, 'tmp')
  }

  async init(): Promise<void> {
    await mkdir(this.blobsDir, { recursive: true })
    await mkdir(this.tmpDir, { recursive: true })
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

  /** Moves a verified temp file to its final name; atomic on one filesystem. */
  async commit(tempPath: string, digest: string): Promise<string> {
    const final = this.pathFor(digest)
    await mkdir(join(final, '..'), { recursive: true })
    await rename(tempPath, final)
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

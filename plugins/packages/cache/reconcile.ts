import { createHash } from 'node:crypto'
import { createReadStream } from 'node:fs'
import { rm, stat } from 'node:fs/promises'
import type { BlobStore } from './blob-store.js'
import type { CacheIndex } from './cache-index.js'

export interface ReconcileReport {
  tempRemoved: number
  rowsDropped: number
  orphansAdopted: number
  orphansDeleted: number
  sizeFixed: number
}

async function hashFile(path: string): Promise<string> {
  const hash = createHash('sha256')
  for await (const chunk of createReadStream(path)) hash.update(chunk as Buffer)
  return `sha256:${hash.digest('hex')}`
}

/**
 * Makes the index and the files agree before the cache serves anything; runs on every start,
 * so a `kill -9` at any moment is repaired here:
 * - temp files are partial fills: deleted;
 * - a row whose file is missing (or has another size) is dropped;
 * - a file without a row (the process died between rename and insert, or between the row's
 *   delete and the unlink) is hashed: kept and indexed if it matches its name, else deleted;
 * - manifest rows whose layer is gone are dropped.
 */
export async function reconcile(index: CacheIndex, store: BlobStore, now = Date.now()): Promise<ReconcileReport> {
  const report: ReconcileReport = { tempRemoved: 0, rowsDropped: 0, orphansAdopted: 0, orphansDeleted: 0, sizeFixed: 0 }
  report.tempRemoved = await store.clearTemp()
  const files = await store.list()
  const onDisk = new Map<string, string>()
  for (const f of files) {
    if (f.digest) onDisk.set(f.digest, f.path)
    else {
      await rm(f.path, { force: true, recursive: true })
      report.orphansDeleted++
    }
  }
  for (const entry of index.blobs()) {
    const path = onDisk.get(entry.digest)
    const size = path
      ? await stat(path).then(
          (s) => s.size,
          () => -1,
        )
      : -1
    if (size !== entry.size) {
      await index.removeBlob(entry.digest)
      if (path) await rm(path, { force: true })
      report.rowsDropped++
      if (size >= 0) report.sizeFixed++
    }
    onDisk.delete(entry.digest)
  }
  for (const [digest, path] of onDisk) {
    if ((await hashFile(path).catch(() => '')) === digest) {
      // The file's mtime is when its fill wrote the last byte: a fair stand-in for its last
      // access, so a rebuilt index keeps a sensible LRU order instead of one stamp for all.
      const { size, mtimeMs } = await stat(path)
      const when = Math.min(Math.round(mtimeMs), now)
      await index.putBlob({ digest, size, lastAccess: when, hits: 0, createdAt: when })
      report.orphansAdopted++
    } else {
      await rm(path, { force: true })
      report.orphansDeleted++
    }
  }
  for (const digest of index.danglingManifests()) await index.removeManifest(digest)
  return report
}

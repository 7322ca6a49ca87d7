import { writeAdminToken } from './admin-token.js'
import { describe, type PackageLogger } from '../log.js'
import { BlobCache, type RemovalReason } from './blob-cache.js'
import { BlobStore } from './blob-store.js'
import { CacheIndex } from './cache-index.js'
import { reconcile } from './reconcile.js'

/** The parts of an open cache, attached together (at start, or once a late directory opens). */
export interface CacheParts {
  cache: BlobCache
  index: CacheIndex
  store: BlobStore
}

export interface OpenCacheOptions {
  directory: string
  limitBytes: number
  log: PackageLogger
  onRemoved?: (reason: RemovalReason, bytes: number, digest: string) => void
  /** Written to `<directory>/admin-token` for `cache rm` (see admin-token.ts). */
  adminToken?: string
}

/**
 * Opens the blob store and the index, reconciles them (so a `kill -9` or power loss at any
 * moment is repaired before the first request), builds the cache's owner and trims it to the
 * limit (which may have shrunk since the last run). Closes what it opened on failure.
 */
export async function openCache(o: OpenCacheOptions): Promise<CacheParts> {
  const store = new BlobStore(o.directory)
  await store.init()
  if (o.adminToken !== undefined) await writeAdminToken(o.directory, o.adminToken)
  const index = await CacheIndex.open(
    o.directory,
    (err) => o.log.error({ err: describe(err) }, 'cache index error'),
    (err) => o.log.error({ err: describe(err) }, 'cache index is corrupt: moved aside to index.sqlite.corrupt; rebuilding it from the blob files'),
  )
  try {
    const report = await reconcile(index, store)
    o.log.info({ ...report, entries: index.blobCount, usedBytes: index.usedBytes }, 'cache reconciled')
    const cache = new BlobCache({
      index,
      store,
      limit: o.limitBytes,
      log: o.log,
      onRemoved: (reason, bytes, digest) => o.onRemoved?.(reason, bytes, digest),
    })
    const trimmed = await cache.trim()
    if (trimmed > 0) o.log.info({ evicted: trimmed }, 'cache trimmed to --cache-retention-size')
    return { cache, index, store }
  } catch (err) {
    await index.close().catch(() => undefined)
    throw err
  }
}

/**
 * The error code when opening the cache failed because of the disk, the database file or a
 * layout this version does not know (not a bug): errno codes (EACCES, EROFS, ENOSPC, EIO, ...),
 * ELAYOUT, and SQLite's (SQLITE_CANTOPEN, SQLITE_READONLY, SQLITE_IOERR, SQLITE_FULL, ...).
 */
export function storageErrorCode(err: unknown): string | undefined {
  const code = (err as { code?: unknown } | null)?.code
  return typeof code === 'string' && /^(E[A-Z]+|SQLITE_[A-Z_]+)$/.test(code) ? code : undefined
}

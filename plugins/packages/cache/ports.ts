import type { TempFile } from './blob-store.js'
import type { BlobEntry } from './cache-index.js'

/**
 * The cache owner's edges ({@link BlobCache} in blob-cache.ts): what it needs of the index and
 * the content store (tests put a scheduler between them to reorder completions), and what it
 * hands out to readers.
 */

/** What the owner needs of the index (the SQLite record); tests wrap it to reorder completions. */
export interface IndexPort {
  blobs(): BlobEntry[]
  blob(digest: string): BlobEntry | undefined
  putBlob(entry: BlobEntry): Promise<void>
  removeBlob(digest: string): Promise<unknown>
}

/** What the owner needs of the content store (the files). */
export interface StorePort {
  pathFor(digest: string): string
  commit(temp: { path: string; handle: TempFile }, digest: string): Promise<string>
  remove(digest: string): Promise<void>
}

/** Why an entry left the cache: room for another (LRU), DELETE /cache, or a failed re-hash. */
export type RemovalReason = 'evicted' | 'deleted' | 'corrupt'

/** A reader's hold on one cached file: it stays on disk, and counted, until {@link release}. */
export interface Lease {
  readonly digest: string
  readonly size: number
  /** Where the file is; it is there until the lease is released, whatever else happens. */
  readonly path: string
  /** Whether this process has hashed the file (it wrote it, or re-hashed it since start). */
  readonly verified: boolean
  /**
   * The file's identity when it was last known good (inode, size, mtime, ctime): a file whose
   * identity changed since was written to by someone, and is hashed again before it is served.
   */
  readonly stamp: string | undefined
  /** Records that the file is good, as it is now (`stamp`). */
  markVerified(stamp?: string): void
  /** Idempotent. */
  release(): void
}

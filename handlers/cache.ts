import type { Request, ResponseObject, ResponseToolkit } from '@hapi/hapi'
import { BadRequestError, ForbiddenError, NotCachedError } from '../errors.js'
import { ADMIN_TOKEN_FILE, ADMIN_TOKEN_HEADER, adminTokenMatches } from '../plugins/packages/cache/admin-token.js'
import type { BlobEntry, CacheIndex } from '../plugins/packages/cache/cache-index.js'
import { DIGEST } from '../plugins/packages/manifest.js'
import type { PackageResult } from '../plugins/packages/package-service.js'

/** Request outcome counters since start (the numbers behind the hit ratio). */
export type ResultCounts = Record<PackageResult, number>

/** The cache's books as `GET /cache` shows them. */
export interface CacheBooks {
  usedBytes: number
  reservedBytes: number
  /** Removed entries whose files are still open by readers (or being unlinked). */
  heldBytes: number
  fillsInFlight: number
  evictions: number
  evictedBytes: number
}

export interface CacheHandlerDeps {
  index: CacheIndex | undefined
  books(): CacheBooks
  /** Removes an entry by layer digest; false if it was not cached. */
  remove(layerDigest: string): Promise<boolean>
  limitBytes: number
  counts: ResultCounts
  /** Why the cache is off although `--disable-cache` was not given (it could not be opened). */
  unavailable?: string | undefined
  /**
   * The token `DELETE /cache/{digest}` requires in its `X-Cache-Token` header (written to
   * `<cache directory>/admin-token` when the cache opens; see admin-token.ts). Without one,
   * every DELETE is refused.
   */
  adminToken?: string | undefined
}

/** One cache entry as the API shows it (and `registry-packages-proxy cache show` reads it). */
export interface CacheEntryView {
  digest: string
  manifests: string[]
  size: number
  lastAccess: string
  createdAt: string
  hits: number
}

/** `GET /cache` as the API shows it (and `registry-packages-proxy cache ls` reads it). */
export interface CacheListView extends CacheBooks, ResultCounts {
  enabled: boolean
  /** Why the cache is off although it was not disabled. */
  unavailable?: string
  limitBytes: number
  entries: number
  hitRatio: number
  items: CacheEntryView[]
}

const SORTS = ['lastAccess', 'size', 'hits', 'createdAt', 'digest'] as const
type SortKey = (typeof SORTS)[number]

function view(index: CacheIndex, e: BlobEntry): CacheEntryView {
  return {
    digest: e.digest,
    manifests: index.manifestsOf(e.digest),
    size: e.size,
    lastAccess: new Date(e.lastAccess).toISOString(),
    createdAt: new Date(e.createdAt).toISOString(),
    hits: e.hits,
  }
}

function digestParam(request: Request): string {
  const raw: unknown = request.params.digest
  const digest = typeof raw === 'string' ? raw : ''
  if (!DIGEST.test(digest)) throw new BadRequestError('digest must be sha256:<64 lowercase hex>')
  return digest
}

/** Finds an entry by layer digest or by a manifest digest that resolves to it. */
function find(index: CacheIndex, digest: string): BlobEntry | undefined {
  return index.blob(digest) ?? index.blob(index.manifest(digest)?.layerDigest ?? '')
}

/**
 * `GET /cache`: limit, used bytes, entry count, hit ratio, and the entries
 * (`?sort=lastAccess|size|hits|createdAt|digest&order=asc|desc&limit=N`, default most recent first).
 */
export function listCacheHandler(deps: CacheHandlerDeps) {
  return (request: Request, h: ResponseToolkit): ResponseObject => {
    const q = request.query as Record<string, unknown>
    const sort = (q.sort ?? 'lastAccess') as SortKey
    if (!SORTS.includes(sort)) throw new BadRequestError(`sort must be one of ${SORTS.join(', ')}`)
    const order = q.order ?? (sort === 'digest' ? 'asc' : 'desc')
    if (order !== 'asc' && order !== 'desc') throw new BadRequestError('order must be asc or desc')
    const limit = q.limit === undefined ? 100 : Number(q.limit)
    if (!Number.isInteger(limit) || limit < 0 || limit > 100_000) throw new BadRequestError('limit must be an integer from 0 to 100000')
    const { counts } = deps
    const served = Object.values(counts).reduce((a, b) => a + b, 0)
    const base: Omit<CacheListView, 'items'> = {
      enabled: deps.index !== undefined,
      ...(deps.unavailable ? { unavailable: deps.unavailable } : {}),
      limitBytes: deps.index ? deps.limitBytes : 0,
      ...deps.books(),
      entries: deps.index?.blobCount ?? 0,
      ...counts,
      hitRatio: served === 0 ? 0 : Number((counts.hit / served).toFixed(4)),
    }
    const index = deps.index
    if (!index) return h.response({ ...base, items: [] } satisfies CacheListView)
    const sign = order === 'asc' ? 1 : -1
    const items = index
      .blobs()
      .sort((a, b) => sign * (sort === 'digest' ? a.digest.localeCompare(b.digest) : a[sort] - b[sort]))
      .slice(0, limit)
      .map((e) => view(index, e))
    return h.response({ ...base, items } satisfies CacheListView)
  }
}

/** `GET /cache/{digest}`: one entry, by layer or manifest digest. */
export function showCacheEntryHandler(deps: CacheHandlerDeps) {
  return (request: Request, h: ResponseToolkit): ResponseObject => {
    const digest = digestParam(request)
    const entry = deps.index ? find(deps.index, digest) : undefined
    if (!deps.index || !entry) throw new NotCachedError(digest)
    return h.response(view(deps.index, entry))
  }
}

/**
 * `DELETE /cache/{digest}`: removes an entry; a reader in progress finishes first. Needs the
 * cache admin token: anything on the master reaches this listener directly (host network),
 * so kube-rbac-proxy's rule alone does not guard it. Checked before anything else is said.
 */
export function deleteCacheEntryHandler(deps: CacheHandlerDeps) {
  return async (request: Request, h: ResponseToolkit): Promise<ResponseObject> => {
    if (!adminTokenMatches(deps.adminToken, request.headers[ADMIN_TOKEN_HEADER])) {
      throw new ForbiddenError(
        `deleting from the cache needs the X-Cache-Token header with the token in <cache directory>/${ADMIN_TOKEN_FILE} (registry-packages-proxy cache rm sends it)`,
      )
    }
    const digest = digestParam(request)
    const entry = deps.index ? find(deps.index, digest) : undefined
    if (!deps.index || !entry) throw new NotCachedError(digest)
    const shown = view(deps.index, entry)
    await deps.remove(entry.digest)
    return h.response({ removed: shown })
  }
}

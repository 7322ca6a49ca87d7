import { constants } from 'node:fs'
import { access } from 'node:fs/promises'
import Boom from '@hapi/boom'
import type { Plugin, Request } from '@hapi/hapi'
import { BusyError, DigestError, toBoom } from '../../errors.js'
import { deleteCacheEntryHandler, listCacheHandler, showCacheEntryHandler, type ResultCounts } from '../../handlers/cache.js'
import { packageHandler } from '../../handlers/package.js'
import type { SourceSet } from '../credentials/source-set.js'
import type { Metrics } from '../metrics/metrics.js'
import { newAdminToken, writeAdminToken } from './admin-token.js'
import { BlobStore } from './blob-store.js'
import { CacheIndex } from './cache-index.js'
import type { DownloadSlotsOptions } from './download-slots.js'
import { describe, PackageService, type PackageLogger } from './package-service.js'
import { reconcile } from './reconcile.js'
import { RegistryClient } from './registry-client.js'
import type { RegistryTimeouts } from './transport.js'

export interface PackagesOptions {
  sources: SourceSet
  metrics: Metrics
  log: PackageLogger
  cacheDirectory: string
  limitBytes: number
  disableCache: boolean
  timeouts?: Partial<RegistryTimeouts>
  env?: NodeJS.ProcessEnv
  /** How often batched access times are written to SQLite. */
  flushIntervalMs?: number
  /** Bounds on concurrent layer downloads and on those waiting for a slot (503 beyond). */
  downloads?: Partial<DownloadSlotsOptions>
  /** The same for manifest lookups of cold digests. */
  lookups?: Partial<DownloadSlotsOptions>
  /** How often a cache directory that was unusable at start is tried again (default 30 s). */
  cacheRetryMs?: number
}

/** What the plugin exposes to the server and to other plugins (health, cache API). */
export interface PackagesApi {
  service: PackageService
  index: CacheIndex | undefined
  /** Why the cache cannot serve right now (index closed, directory not writable), or undefined. */
  notReady(): string | undefined
  /** Request outcomes since start (GET /cache); the fast path counts its hits here too. */
  counts: ResultCounts
}

/**
 * Package handling: opens the cache (index + blob files, reconciled before the first request),
 * builds the registry client, and registers `/package`. With `--disable-cache` nothing is
 * opened or written.
 */
export const packagesPlugin: Plugin<PackagesOptions> = {
  name: 'packages',
  async register(server, o) {
    let index: CacheIndex | undefined
    let store: BlobStore | undefined
    // Set while the cache could not be opened: packages are then served uncached.
    let unavailable: string | undefined
    const retryMs = o.cacheRetryMs ?? 30_000
    const unusable = (code: string | undefined): string =>
      `cache directory unusable (${code ?? 'error'}): serving packages uncached, trying again every ${Math.round(retryMs / 1000)} s`
    // DELETE /cache needs it (handlers/cache.ts); it lives in the cache directory, so a cache
    // that cannot be opened has no token, and nothing to delete either.
    const adminToken = newAdminToken()
    /** Opens the blob store and the index and reconciles them; closes what it opened on failure. */
    const openCache = async (): Promise<{ index: CacheIndex; store: BlobStore }> => {
      const s = new BlobStore(o.cacheDirectory)
      await s.init()
      await writeAdminToken(o.cacheDirectory, adminToken)
      const i = await CacheIndex.open(
        o.cacheDirectory,
        (err) => o.log.error({ err: describe(err) }, 'cache index error'),
        (err) => o.log.error({ err: describe(err) }, 'cache index is corrupt: moved aside to index.sqlite.corrupt; rebuilding it from the blob files'),
      )
      try {
        const report = await reconcile(i, s)
        o.log.info({ ...report, entries: i.blobCount, usedBytes: i.usedBytes }, 'cache reconciled')
        return { index: i, store: s }
      } catch (err) {
        await i.close().catch(() => undefined)
        throw err
      }
    }
    if (!o.disableCache) {
      try {
        ;({ index, store } = await openCache())
      } catch (err) {
        // A cache volume that is read-only, full, failing or not ours must not stop the proxy:
        // during bootstrap nothing else hands out packages, and a crash-looping pod would not
        // do it either. It serves every package straight from the registry instead, says so
        // where on-call looks (the log, /readyz, the NotReady alert), and tries the directory
        // again every 30 s. Anything else is a bug.
        const code = storageErrorCode(err)
        if (code === undefined) throw err
        unavailable = unusable(code)
        o.log.error({ err: describe(err), cacheDirectory: o.cacheDirectory }, 'cannot open the cache; serving packages uncached')
      }
    }
    const cacheOff = (): boolean => o.disableCache || unavailable !== undefined
    const client = new RegistryClient({
      ...(o.timeouts ? { timeouts: o.timeouts } : {}),
      ...(o.env ? { env: o.env } : {}),
      observe: (kind, code, seconds) => {
        o.metrics.upstreamRequests.inc({ kind, code: String(code) })
        o.metrics.upstreamSeconds.observe({ kind }, seconds)
      },
    })
    const service = new PackageService({
      index,
      store,
      client,
      limitBytes: o.limitBytes,
      disableCache: cacheOff(),
      log: o.log,
      ...(o.downloads ? { downloads: o.downloads } : {}),
      ...(o.lookups ? { lookups: o.lookups } : {}),
      onFillDone: (outcome, seconds, error) => {
        o.metrics.fillSeconds.observe({ outcome }, seconds)
        // A mismatch found mid-stream: the response was already aborted before its last byte.
        if (error instanceof DigestError) o.metrics.digestMismatches.inc({ what: error.what })
      },
      onEvict: (bytes) => {
        o.metrics.evictions.inc()
        o.metrics.evictedBytes.inc(bytes)
      },
      onResume: (kind) => o.metrics.upstreamResumes.inc({ kind }),
    })
    if (service.space) {
      const trimmed = await service.space.trim()
      if (trimmed > 0) o.log.info({ evicted: trimmed }, 'cache trimmed to --cache-retention-size')
    }
    o.metrics.attachCache({
      usedBytes: () => service.space?.usedBytes ?? 0,
      limitBytes: () => (cacheOff() ? 0 : o.limitBytes),
      entries: () => index?.blobCount ?? 0,
      activeFills: () => service.activeFills,
      downloads: () => ({ layer: service.downloads, manifest: service.lookups }),
    })
    // The directory check uses access(W_OK), not a test write: a full disk still serves (fills
    // fall back to streaming through), so it must not take the pod out of rotation.
    let dirProblem: string | undefined
    const checkDirectory = async (): Promise<void> => {
      if (!store) return
      dirProblem = await access(store.tmpDir, constants.W_OK).then(
        () => undefined,
        (err: NodeJS.ErrnoException) => `cache directory is not writable (${err.code ?? 'error'})`,
      )
    }
    await checkDirectory()
    const flusher = setInterval(() => {
      index?.flush().catch((err: unknown) => o.log.warn({ err: describe(err) }, 'cannot write access times'))
      void checkDirectory()
    }, o.flushIntervalMs ?? 5000)
    flusher.unref()

    const counts: ResultCounts = { hit: 0, miss: 0, coalesced: 0, bypass: 0 }
    const onResult = (request: Request, result: string): void => {
      o.metrics.packageResults.inc({ result })
      if (result in counts) counts[result as keyof ResultCounts]++
      ;(request.app as { result?: string }).result = result
    }
    const onStreamError = (request: Request, result: string, err: Error): void => {
      ;(request.app as { error?: unknown }).error = describe(err)
      // Fills count their own mismatches once (onFillDone); a pass-through has no fill.
      if (result === 'bypass' && err instanceof DigestError) o.metrics.digestMismatches.inc({ what: err.what })
    }
    const handler = packageHandler({ sources: o.sources, packages: service, onResult, onStreamError })
    server.route({
      method: 'GET',
      path: '/package',
      options: { response: { ranges: false, emptyStatusCode: 200 } },
      handler: async (request, h) => {
        try {
          return await handler(request, h)
        } catch (err) {
          if (err instanceof DigestError) o.metrics.digestMismatches.inc({ what: err.what })
          onResult(request, 'error')
          ;(request.app as { error?: unknown }).error = describe(err)
          if (err instanceof BusyError) o.metrics.downloadsRefused.inc({ kind: err.kind })
          throw toBoom(err)
        }
      },
    })
    server.route({
      method: '*',
      path: '/package',
      // Never read or parse a refused request's body: the answer is 405 whatever it holds.
      options: { payload: { parse: false, output: 'stream' } },
      handler: () => {
        const err = Boom.methodNotAllowed('only GET and HEAD are allowed on /package', undefined, ['GET', 'HEAD'])
        return err
      },
    })
    server.events.on('response', (request) => {
      const result = (request.app as { result?: string }).result
      const length = Number(request.response && 'headers' in request.response ? request.response.headers['content-length'] : 0)
      // Only bodies that went out whole: an aborted response did not deliver its length.
      if (result && ['hit', 'miss', 'coalesced', 'bypass'].includes(result) && request.raw.res.writableFinished && length > 0) {
        o.metrics.bytesServed.inc(length)
      }
    })
    // Getters: the cache may be attached after start (see the retry below).
    const cacheDeps = {
      get index() {
        return index
      },
      get unavailable() {
        return unavailable
      },
      packages: service,
      limitBytes: o.limitBytes,
      counts,
      adminToken,
    }
    server.route([
      { method: 'GET', path: '/cache', handler: listCacheHandler(cacheDeps) },
      { method: 'GET', path: '/cache/{digest}', handler: showCacheEntryHandler(cacheDeps) },
      { method: 'DELETE', path: '/cache/{digest}', handler: deleteCacheEntryHandler(cacheDeps) },
    ])
    server.expose('api', {
      service,
      get index() {
        return index
      },
      notReady: () => unavailable ?? (index?.closed ? 'cache index is closed' : dirProblem),
      counts,
    } satisfies PackagesApi)
    // A cache that could not be opened at start is tried again until it opens, then attached:
    // a volume that was mounted late, or a disk that was full and got space, heals by itself.
    let retrying = false
    let stopped = false
    const retry = unavailable
      ? setInterval(() => {
          if (retrying) return
          retrying = true
          openCache()
            .then(async (opened) => {
              if (stopped) {
                await opened.index.close()
                return
              }
              const space = service.attachCache(opened.index, opened.store)
              index = opened.index
              store = opened.store
              unavailable = undefined
              clearInterval(retry)
              o.log.info({ cacheDirectory: o.cacheDirectory, entries: opened.index.blobCount }, 'cache directory usable again: caching resumed')
              // Attached for good from here: a failure below is the running cache's, not a reason
              // to call the directory unusable again.
              await space.trim().catch((err: unknown) => o.log.warn({ err: describe(err) }, 'cache trim failed'))
              await checkDirectory()
            })
            .catch((err: unknown) => {
              // Said once per kind of failure, not every 30 s: /readyz carries the reason.
              const now = unusable(storageErrorCode(err))
              if (now !== unavailable) o.log.warn({ err: describe(err), cacheDirectory: o.cacheDirectory }, 'cache directory still unusable')
              unavailable = now
            })
            .finally(() => {
              retrying = false
            })
        }, retryMs)
      : undefined
    retry?.unref()
    server.ext('onPostStop', async () => {
      stopped = true
      clearInterval(retry)
      clearInterval(flusher)
      await service.close()
      client.close()
      await index?.close()
    })
  },
}

/**
 * The error code when opening the cache failed because of the disk or the database file (not a
 * bug): errno codes (EACCES, EROFS, ENOSPC, EIO, ...) and SQLite's (SQLITE_CANTOPEN,
 * SQLITE_READONLY, SQLITE_IOERR, SQLITE_FULL, ...).
 */
function storageErrorCode(err: unknown): string | undefined {
  const code = (err as { code?: unknown } | null)?.code
  return typeof code === 'string' && /^(E[A-Z]+|SQLITE_[A-Z_]+)$/.test(code) ? code : undefined
}

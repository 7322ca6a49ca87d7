import { BadRequestError } from '../errors.js'
import { isRegistryHost, isRepositoryPath } from '../plugins/credentials/source.js'
import { DIGEST } from '../plugins/packages/manifest.js'

/** A validated `/package` query. */
export interface PackageQuery {
  digest: string
  repository?: string
  path?: string
}

function single(query: Record<string, unknown>, key: string): string | undefined {
  const v = query[key]
  if (v === undefined) return undefined
  if (typeof v !== 'string') throw new BadRequestError(`"${key}" must be given once`)
  return v
}

/**
 * Validates `digest`, `repository` and `path` (README, "HTTP API"); throws a 400 naming the field.
 * Two forms real clients send are normalised first, as the module this proxy replaces accepts
 * them: one trailing `/` on `repository` is dropped, and so is one leading `/` on `path` (the
 * `rpp-get` client passes `path` on as it was given). Anything more (`//a`, `a//`) is still an
 * empty segment and refused.
 */
export function parsePackageQuery(query: Record<string, unknown>): PackageQuery {
  const digest = single(query, 'digest')
  if (digest === undefined || digest === '') throw new BadRequestError('"digest" is required (sha256:<64 lowercase hex>)')
  if (!DIGEST.test(digest)) throw new BadRequestError('"digest" must be sha256:<64 lowercase hex>')
  const rawRepository = single(query, 'repository')
  const repository = rawRepository?.endsWith('/') ? rawRepository.slice(0, -1) : rawRepository
  if (repository !== undefined && repository !== '') {
    const slash = repository.indexOf('/')
    const host = slash === -1 ? repository : repository.slice(0, slash)
    const rest = slash === -1 ? '' : repository.slice(slash + 1)
    if (repository.length > 512 || !isRegistryHost(host) || (slash !== -1 && !isRepositoryPath(rest))) {
      throw new BadRequestError('"repository" must be host[:port]/path in the OCI name grammar')
    }
  }
  const rawPath = single(query, 'path')
  const path = rawPath?.startsWith('/') ? rawPath.slice(1) : rawPath
  if (path !== undefined && path !== '' && !isRepositoryPath(path)) {
    throw new BadRequestError('"path" must be /-separated lowercase OCI name components (no "..", no empty segments)')
  }
  return {
    digest,
    ...(repository ? { repository } : {}),
    ...(path ? { path } : {}),
  }
}

/**
 * The query's parameters, a repeated one as a list (as hapi gives them). Queries without
 * escapes, which is what clients send, are split directly: URLSearchParams and its decoding
 * were a tenth of a memory hit's JavaScript.
 */
export function queryOf(search: string): Record<string, string | string[]> {
  const query: Record<string, string | string[]> = {}
  const add = (key: string, value: string): void => {
    const seen = query[key]
    query[key] = seen === undefined ? value : Array.isArray(seen) ? [...seen, value] : [seen, value]
  }
  if (search.includes('%') || search.includes('+')) {
    for (const [key, value] of new URLSearchParams(search)) add(key, value)
    return query
  }
  for (const part of search.split('&')) {
    if (part === '') continue
    const eq = part.indexOf('=')
    add(eq === -1 ? part : part.slice(0, eq), eq === -1 ? '' : part.slice(eq + 1))
  }
  return query
}

/**
 * The query of a request-target (`/package?…`, or the absolute form), read by {@link queryOf}:
 * what the hapi route reads too. hapi's own `request.query` keeps only the first 1,000
 * parameters, so a `repository` or `path` after them would be lost there and read on the fast
 * path (found from outside).
 */
export function requestQuery(target: string | undefined): Record<string, string | string[]> {
  const q = target?.indexOf('?') ?? -1
  if (target === undefined || q === -1) return {}
  const hash = target.indexOf('#', q)
  return queryOf(target.slice(q + 1, hash === -1 ? undefined : hash))
}

/** A byte range `start..end` (inclusive) of an object of `size` bytes. */
export interface ByteRange {
  start: number
  end: number
}

/**
 * Interprets a `Range` header for an object of `size` bytes: undefined to send it whole (no
 * header, a syntax we ignore as RFC 9110 allows, or several ranges), 'unsatisfiable' for 416.
 *
 * Not `@hapi/ammo` (inert's parser): its `header()` returns null both for a malformed header
 * (which must be ignored: a 200) and for an unsatisfiable one (a 416), merges several ranges
 * where we send the whole package, and answers `bytes=-500` on 100 bytes with a negative start;
 * the parseRange cases in test/handlers/package-request.test.ts fail with it.
 */
export function parseRange(header: string | undefined, size: number): ByteRange | 'unsatisfiable' | undefined {
  if (!header) return undefined
  const m = /^bytes=\s*(\d*)\s*-\s*(\d*)\s*$/.exec(header)
  if (!m) return undefined
  const [, a = '', b = ''] = m
  if (a === '' && b === '') return undefined
  if (a === '') {
    const suffix = Number(b)
    if (suffix === 0 || size === 0) return 'unsatisfiable'
    return { start: Math.max(0, size - suffix), end: size - 1 }
  }
  const start = Number(a)
  const end = b === '' ? size - 1 : Math.min(Number(b), size - 1)
  if (b !== '' && Number(b) < start) return undefined
  if (start >= size) return 'unsatisfiable'
  return { start, end }
}

/**
 * True when an `If-None-Match` header matches `etag` (weak comparison). `*` matches only a
 * package known to `exist`: it means "any current representation", so it is no shortcut past
 * the lookup, and a digest that exists nowhere must still be a 404.
 */
export function matchesIfNoneMatch(header: string | undefined, etag: string, exists = false): boolean {
  if (!header) return false
  return header.split(',').some((t) => {
    const tag = t.trim().replace(/^W\//, '')
    return tag === etag || (exists && tag === '*')
  })
}

/**
 * The headers of a package's bytes, the same whichever path serves them (the hapi route or the
 * fast path before it): the ETag is the digest asked for, and the bytes never change.
 */
export function packageHeaders(digest: string, length: number, cache: string): Record<string, string> {
  return {
    etag: `"${digest}"`,
    'cache-control': 'public, max-age=31536000, immutable',
    'accept-ranges': 'bytes',
    'content-type': 'application/x-gzip',
    'content-disposition': `attachment; filename="${digest.slice('sha256:'.length)}.tar.gz"`,
    'content-length': String(length),
    'x-cache': cache,
  }
}

import type { Request } from '@hapi/hapi'
import { NoSourceError, NotFoundError, NotSyncedError } from '../errors.js'
import type { SourceSet } from '../plugins/credentials/source-set.js'
import type { RegistrySource } from '../plugins/credentials/source.js'

/** Told how each v1 request ended (metrics, the request log). */
export type V1ResultHook = (request: Request, result: string) => void

/** A header's value when it was sent once. */
export function header(request: Request, name: string): string | undefined {
  const v: unknown = request.headers[name]
  return typeof v === 'string' ? v : undefined
}

/**
 * 503 with `Retry-After` while some source provider has not synced yet: a source missing now
 * may be one the API server has not told us about (CONTRACT: never a 404 before the first sync).
 */
function notSyncedYet(sources: SourceSet, what: string): NotSyncedError | undefined {
  const pending = sources.unsynced()
  if (pending.length === 0) return undefined
  return new NotSyncedError(`${what} is not known yet: credential sources not synced (${pending.join(', ')})`)
}

/** The default source (the main registry), or 503 before the first sync, or 404. */
export function defaultSource(sources: SourceSet): RegistrySource {
  try {
    return sources.match(undefined)
  } catch (err) {
    if (!(err instanceof NoSourceError)) throw err
    throw notSyncedYet(sources, 'the default registry') ?? err
  }
}

/**
 * Runs `attempt` on each repository name in turn while the registry says the previous one does
 * not exist (the edition-root fallback); any other failure, or the last 404, is thrown. A 404
 * only moves on when `repositoryMissing` (if given) confirms that the repository itself is
 * unknown: a tag missing from a repository that exists is that repository's 404, never a
 * reason to serve the same tag from the edition root.
 */
export async function firstFound<T>(
  names: readonly string[],
  attempt: (name: string) => Promise<T>,
  repositoryMissing?: (name: string) => Promise<boolean>,
): Promise<{ name: string; value: T }> {
  let lastError: unknown = new NotFoundError('no repository to try')
  for (const [i, name] of names.entries()) {
    try {
      return { name, value: await attempt(name) }
    } catch (err) {
      if (!(err instanceof NotFoundError)) throw err
      if (i < names.length - 1 && repositoryMissing && !(await repositoryMissing(name))) throw err
      lastError = err
    }
  }
  throw lastError
}

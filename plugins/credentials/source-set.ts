import { NoSourceError } from '../../errors.js'
import type { RegistrySource } from './source.js'

/**
 * The sources currently known, grouped by the provider that reported them (the config file,
 * the Kubernetes Secret, the ModuleSource informer). A provider replaces its whole group
 * atomically, so a reload never leaves a half-updated view; requests see either the old or
 * the new group.
 */
export class SourceSet {
  readonly #groups = new Map<string, { sources: RegistrySource[]; synced: boolean; lastSync?: number }>()

  /** Declares a provider before it has synced: readiness waits for it. */
  expect(provider: string): void {
    if (!this.#groups.has(provider)) this.#groups.set(provider, { sources: [], synced: false })
  }

  /** Replaces everything `provider` contributes and marks it synced. */
  replace(provider: string, sources: RegistrySource[], now = Date.now()): void {
    this.#groups.set(provider, { sources: [...sources], synced: true, lastSync: now })
  }

  /** Providers that have not delivered their first sync yet. */
  unsynced(): string[] {
    return [...this.#groups].filter(([, g]) => !g.synced).map(([name]) => name)
  }

  all(): RegistrySource[] {
    return [...this.#groups.values()].flatMap((g) => g.sources)
  }

  /** The package repository (a `PackageRepository`, or the file's entry) called `name`, if known. */
  packageRepository(name: string): RegistrySource | undefined {
    return this.all().find((s) => s.kind === 'package-repository' && s.name === name)
  }

  /**
   * Picks the source for a request. No `repository` means the default source; otherwise the
   * repository must equal a source's repository exactly. Never guesses: an unknown repository
   * is a {@link NoSourceError}, so no request can steer the proxy to an arbitrary host.
   */
  match(repository: string | undefined): RegistrySource {
    const all = this.all()
    if (repository === undefined || repository === '') {
      const found = all.find((s) => s.kind === 'default')
      if (!found) throw new NoSourceError('(default)')
      return found
    }
    const wanted = repository.replace(/\/+$/, '')
    // A ModuleSource wins over the default source when both name the same repository. Package
    // repositories are for icons only: never chosen by `repository`.
    const found =
      all.find((s) => s.kind === 'module-source' && s.repository === wanted) ?? all.find((s) => s.kind !== 'package-repository' && s.repository === wanted)
    if (!found) throw new NoSourceError(repository)
    return found
  }
}

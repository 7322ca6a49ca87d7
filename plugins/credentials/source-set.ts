import { NoSourceError, SourcesNotSyncedError } from '../../errors.js'
import type { RegistrySource } from './source.js'

/**
 * The sources currently known, grouped by the provider that reported them (the config file,
 * the Kubernetes Secret, the ModuleSource informer). A provider replaces its whole group
 * atomically, so a reload never leaves a half-updated view; requests see either the old or
 * the new group.
 */
export class SourceSet {
  readonly #groups = new Map<string, { sources: RegistrySource[]; synced: boolean; lastSync?: number }>()
  /** {@link all}, kept between changes: every request matches against it. */
  #all: RegistrySource[] | undefined
  /**
   * {@link match}'s answers by `repository`, kept between changes: a roll-out's nodes name the
   * same few repositories on every request. Only matches are kept, and at most
   * {@link MATCHES_KEPT} (a client can spell one repository many ways: trailing slashes).
   */
  readonly #matched = new Map<string | undefined, RegistrySource>()

  /** Declares a provider before it has synced: readiness waits for it. */
  expect(provider: string): void {
    if (!this.#groups.has(provider)) this.#groups.set(provider, { sources: [], synced: false })
    this.#changed()
  }

  /** Replaces everything `provider` contributes and marks it synced. */
  replace(provider: string, sources: RegistrySource[], now = Date.now()): void {
    this.#groups.set(provider, { sources: [...sources], synced: true, lastSync: now })
    this.#changed()
  }

  #changed(): void {
    this.#all = undefined
    this.#matched.clear()
  }

  /** Providers that have not delivered their first sync yet. */
  unsynced(): string[] {
    return [...this.#groups].filter(([, g]) => !g.synced).map(([name]) => name)
  }

  all(): readonly RegistrySource[] {
    this.#all ??= [...this.#groups.values()].flatMap((g) => g.sources)
    return this.#all
  }

  /** The package repository (a `PackageRepository`, or the file's entry) called `name`, if known. */
  packageRepository(name: string): RegistrySource | undefined {
    return this.all().find((s) => s.kind === 'package-repository' && s.name === name)
  }

  /**
   * Picks the source for a request, as the module this proxy replaces does: no (or an empty)
   * `repository` means the default source; otherwise a ModuleSource whose repo equals it, else
   * the default source when it equals the default's `address/path` or its bare registry host
   * (`address` alone). A ModuleSource match wins over those aliases; a trailing `/` is ignored.
   *
   * Never guesses beyond that: an unknown repository is a {@link NoSourceError}, so no request
   * can steer the proxy to an arbitrary host. While a provider has not synced yet the set is
   * incomplete, so "no match" is not an answer yet: {@link SourcesNotSyncedError} (503).
   */
  match(repository: string | undefined): RegistrySource {
    const known = this.#matched.get(repository)
    if (known) return known
    const found = this.#find(repository)
    if (this.#matched.size >= MATCHES_KEPT) this.#matched.clear()
    this.#matched.set(repository, found)
    return found
  }

  #find(repository: string | undefined): RegistrySource {
    const all = this.all()
    const wanted = (repository ?? '').replace(/\/+$/, '')
    const defaults = all.filter((s) => s.kind === 'default')
    // A ModuleSource wins over the default source's aliases. Package repositories are for icons
    // only: never chosen by `repository`.
    const found =
      wanted === ''
        ? defaults[0]
        : (all.find((s) => s.kind === 'module-source' && s.repository === wanted) ??
          defaults.find((s) => s.repository === wanted) ??
          defaults.find((s) => s.registry === wanted))
    if (found) return found
    const shown = wanted === '' ? '(default)' : (repository ?? '')
    const pending = this.unsynced()
    if (pending.length > 0) throw new SourcesNotSyncedError(shown, pending)
    throw new NoSourceError(shown)
  }
}

const MATCHES_KEPT = 64

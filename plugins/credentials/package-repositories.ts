import { CustomObjectsApi, type KubeConfig, type KubernetesListObject, type KubernetesObject } from '@kubernetes/client-node'
import type { Logger } from 'pino'
import type { Metrics } from '../metrics/metrics.js'
import { withSignal } from './kubernetes-source.js'
import { PACKAGE_REPOSITORY, parsePackageRepository, type PackageRepositoryObject } from './package-repository.js'
import { reparse, type ParsedObject } from './kubernetes-parse.js'
import { RestartingInformer, type InformerTiming } from './restarting-informer.js'
import type { SourceSet } from './source-set.js'

const PROVIDER = 'packagerepositories'

export interface PackageRepositoryWatchOptions {
  kubeConfig: KubeConfig
  sources: SourceSet
  metrics: Metrics
  log: Logger
  timing?: Partial<InformerTiming>
}

/**
 * The `packagerepositories` provider: the cluster-scoped `PackageRepository` objects, watched
 * by the same restarting informer as ModuleSources (the current module did a live API `Get` on
 * every icon request instead). Each one becomes a `package-repository` source named after the
 * object, used by the icon endpoint only. A malformed one is skipped on its own, with one log
 * line naming the object and key and `registry_packages_proxy_source_errors_total`.
 */
export class PackageRepositoryWatch {
  readonly #o: PackageRepositoryWatchOptions
  readonly #informer: RestartingInformer<KubernetesObject>
  /** Parse results by name, reused while the resourceVersion is unchanged. */
  #parsed = new Map<string, ParsedObject>()
  #synced = false

  constructor(o: PackageRepositoryWatchOptions) {
    this.#o = o
    const custom = o.kubeConfig.makeApiClient(CustomObjectsApi)
    this.#informer = new RestartingInformer<KubernetesObject>({
      provider: PROVIDER,
      kubeConfig: o.kubeConfig,
      path: `/apis/${PACKAGE_REPOSITORY.group}/${PACKAGE_REPOSITORY.version}/${PACKAGE_REPOSITORY.plural}`,
      list: (signal) => custom.listClusterCustomObject({ ...PACKAGE_REPOSITORY }, withSignal(signal)) as Promise<KubernetesListObject<KubernetesObject>>,
      onChange: (objects) => this.#apply(objects),
      log: o.log,
      metrics: o.metrics,
      ...(o.timing ? { timing: o.timing } : {}),
    })
    // Not declared to the SourceSet before it syncs, on purpose: readiness gates /package, and a
    // cluster without the PackageRepository CRD (or RBAC for it) must not lose its packages for
    // want of icons. The icon endpoint asks `synced` instead (503 until then).
    o.metrics.sourceSynced.set({ provider: PROVIDER }, 0)
    o.metrics.sourceSyncClock(PROVIDER, () => this.#informer.lastSync())
  }

  /** True once the first LIST was applied: an unknown name is then a 404, not a 503. */
  get synced(): boolean {
    return this.#synced
  }

  start(): void {
    this.#informer.start()
  }

  async stop(): Promise<void> {
    await this.#informer.stop()
  }

  #apply(objects: readonly PackageRepositoryObject[]): void {
    const { log, metrics, sources } = this.#o
    const next = reparse(objects, this.#parsed, parsePackageRepository, {
      parsed: (name, source, before) =>
        log.info(
          { packageRepository: name, repository: source.repository, scheme: source.scheme },
          before ? 'package repository updated' : 'package repository added',
        ),
      rejected: (name, err) => {
        metrics.sourceErrors.inc({ provider: PROVIDER })
        log.error({ packageRepository: name || undefined, err: { message: err.message } }, 'PackageRepository is malformed; skipped')
      },
    })
    for (const [name, before] of this.#parsed) {
      if (!next.has(name) && before.source) log.info({ packageRepository: name }, 'package repository deleted')
    }
    this.#parsed = next
    sources.replace(
      PROVIDER,
      [...next.values()].flatMap((p) => (p.source ? [p.source] : [])),
    )
    metrics.sourceSynced.set({ provider: PROVIDER }, 1)
    this.#synced = true
  }
}

import {
  CoreV1Api,
  CustomObjectsApi,
  Observable,
  type ConfigurationOptions,
  type KubeConfig,
  type KubernetesListObject,
  type KubernetesObject,
  type RequestContext,
  type ResponseContext,
} from '@kubernetes/client-node'
import type { Logger } from 'pino'
import type { Metrics } from '../metrics/metrics.js'
import {
  MODULE_SOURCE,
  parseModuleSource,
  parseRegistrySecret,
  REGISTRY_SECRET,
  type ModuleSourceObject,
  type SecretObject,
  reparse,
  type ParsedObject,
} from './kubernetes-parse.js'
import { RestartingInformer, type InformerTiming } from './restarting-informer.js'
import type { SourceSet } from './source-set.js'
import { SourceError, type RegistrySource } from './source.js'

/** Call options that tie one generated-client request to `signal`. */
export function withSignal(signal: AbortSignal): ConfigurationOptions {
  return {
    middleware: [
      {
        pre: (ctx: RequestContext) => {
          ctx.setSignal(signal)
          return new Observable(Promise.resolve(ctx))
        },
        post: (res: ResponseContext) => new Observable(Promise.resolve(res)),
      },
    ],
    middlewareMergeStrategy: 'append',
  }
}

export interface KubernetesSourceOptions {
  kubeConfig: KubeConfig
  sources: SourceSet
  metrics: Metrics
  log: Logger
  timing?: Partial<InformerTiming>
}

/**
 * The `secret` and `modulesources` providers: one informer on the `d8-system/deckhouse-registry`
 * Secret (a field selector on its name: RBAC grants that one Secret only) and one on the
 * cluster-scoped ModuleSources. Each replaces its group of the {@link SourceSet} with the
 * whole collection it now knows, so an add, an update, a delete or a changed `repo` (which
 * retires the old repository) all land as one atomic switch.
 *
 * A malformed ModuleSource is left out on its own; a malformed Secret keeps the last good
 * default source. Either way: one log line naming the object and the key, and
 * `registry_packages_proxy_source_errors_total{provider}`; a value is never logged.
 */
export class KubernetesSource {
  readonly #o: KubernetesSourceOptions
  readonly #secret: RestartingInformer<KubernetesObject>
  readonly #moduleSources: RestartingInformer<KubernetesObject>
  /** Parse results by ModuleSource name, reused while the resourceVersion is unchanged. */
  #parsedModuleSources = new Map<string, ParsedObject>()
  #secretParsed: ParsedObject | undefined
  /** The last default source that parsed: kept while the Secret is malformed. */
  #lastGoodDefault: RegistrySource | undefined
  #missingReported = false

  constructor(o: KubernetesSourceOptions) {
    this.#o = o
    const core = o.kubeConfig.makeApiClient(CoreV1Api)
    const custom = o.kubeConfig.makeApiClient(CustomObjectsApi)
    const fieldSelector = `metadata.name=${REGISTRY_SECRET.name}`
    this.#secret = new RestartingInformer<KubernetesObject>({
      provider: 'secret',
      kubeConfig: o.kubeConfig,
      path: `/api/v1/namespaces/${REGISTRY_SECRET.namespace}/secrets`,
      fieldSelector,
      list: (signal) => core.listNamespacedSecret({ namespace: REGISTRY_SECRET.namespace, fieldSelector }, withSignal(signal)),
      onChange: (objects) => this.#applySecret(objects),
      log: o.log,
      metrics: o.metrics,
      ...(o.timing ? { timing: o.timing } : {}),
    })
    this.#moduleSources = new RestartingInformer<KubernetesObject>({
      provider: 'modulesources',
      kubeConfig: o.kubeConfig,
      path: `/apis/${MODULE_SOURCE.group}/${MODULE_SOURCE.version}/${MODULE_SOURCE.plural}`,
      list: (signal) => custom.listClusterCustomObject({ ...MODULE_SOURCE }, withSignal(signal)) as Promise<KubernetesListObject<KubernetesObject>>,
      onChange: (objects) => this.#applyModuleSources(objects),
      log: o.log,
      metrics: o.metrics,
      ...(o.timing ? { timing: o.timing } : {}),
    })
    // Declared now, so readiness waits for both from the very start.
    for (const provider of ['secret', 'modulesources']) {
      o.sources.expect(provider)
      o.metrics.sourceSynced.set({ provider }, 0)
    }
    o.metrics.sourceSyncClock('secret', () => this.#secret.lastSync())
    o.metrics.sourceSyncClock('modulesources', () => this.#moduleSources.lastSync())
  }

  start(): void {
    const cluster = this.#o.kubeConfig.getCurrentCluster()
    this.#o.log.info({ server: cluster?.server }, 'watching the registry Secret and ModuleSources')
    this.#secret.start()
    this.#moduleSources.start()
  }

  async stop(): Promise<void> {
    await Promise.all([this.#secret.stop(), this.#moduleSources.stop()])
  }

  #applySecret(objects: readonly SecretObject[]): void {
    const { log, metrics, sources } = this.#o
    const secret = objects.find((s) => s.metadata?.name === REGISTRY_SECRET.name)
    const where = `${REGISTRY_SECRET.namespace}/${REGISTRY_SECRET.name}`
    if (!secret) {
      if (this.#secretParsed || this.#lastGoodDefault) log.warn({ secret: where }, 'registry Secret deleted: no default source')
      else if (!this.#missingReported) log.warn({ secret: where }, 'registry Secret not found: no default source')
      this.#missingReported = true
      this.#secretParsed = undefined
      this.#lastGoodDefault = undefined
    } else {
      const resourceVersion = secret.metadata?.resourceVersion
      const unchanged = this.#secretParsed !== undefined && resourceVersion !== undefined && this.#secretParsed.resourceVersion === resourceVersion
      if (!unchanged) {
        try {
          const source = parseRegistrySecret(secret)
          const previous = this.#lastGoodDefault
          this.#secretParsed = { resourceVersion, source }
          this.#lastGoodDefault = source
          log.info(
            {
              secret: where,
              repository: source.repository,
              scheme: source.scheme,
              ...(previous && previous.repository !== source.repository ? { was: previous.repository } : {}),
            },
            previous ? 'default source updated' : 'default source loaded',
          )
        } catch (err) {
          if (!(err instanceof SourceError)) throw err
          this.#secretParsed = { resourceVersion }
          metrics.sourceErrors.inc({ provider: 'secret' })
          log.error(
            { secret: where, err: { message: err.message }, keeping: this.#lastGoodDefault?.repository },
            this.#lastGoodDefault ? 'registry Secret is malformed; keeping the last good default source' : 'registry Secret is malformed; no default source',
          )
        }
      }
    }
    sources.replace('secret', this.#lastGoodDefault ? [this.#lastGoodDefault] : [])
    metrics.sourceSynced.set({ provider: 'secret' }, 1)
  }

  #applyModuleSources(objects: readonly ModuleSourceObject[]): void {
    const { log, metrics, sources } = this.#o
    const next = reparse(objects, this.#parsedModuleSources, parseModuleSource, {
      parsed: (name, source, before) => {
        const was = before?.source?.repository
        if (was === undefined) log.info({ moduleSource: name, repository: source.repository, scheme: source.scheme }, 'module source added')
        else if (was !== source.repository)
          log.info({ moduleSource: name, repository: source.repository, retired: was }, 'module source moved; its old repository is retired')
        else log.info({ moduleSource: name, repository: source.repository }, 'module source updated')
      },
      rejected: (name, err, before) => {
        metrics.sourceErrors.inc({ provider: 'modulesources' })
        log.error({ moduleSource: name || undefined, err: { message: err.message }, retired: before?.source?.repository }, 'ModuleSource is malformed; skipped')
      },
    })
    for (const [name, before] of this.#parsedModuleSources) {
      if (!next.has(name) && before.source) log.info({ moduleSource: name, retired: before.source.repository }, 'module source deleted')
    }
    this.#parsedModuleSources = next
    const list = [...next.values()].flatMap((p) => (p.source ? [p.source] : []))
    const seen = new Map<string, string>()
    for (const s of list) {
      const first = seen.get(s.repository)
      if (first !== undefined)
        log.warn({ moduleSource: s.name, repository: s.repository, servedBy: first }, 'two ModuleSources name the same repository; the first one serves it')
      else seen.set(s.repository, s.name)
    }
    sources.replace('modulesources', list)
    metrics.sourceSynced.set({ provider: 'modulesources' }, 1)
  }
}

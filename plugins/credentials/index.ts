import type { Plugin } from '@hapi/hapi'
import type { Logger } from 'pino'
import type { Metrics } from '../metrics/metrics.js'
import { FileSourceWatcher } from './file-watch.js'
import { loadKubeConfig } from './kube-config.js'
import type { InformerTiming } from './restarting-informer.js'
import type { SourceSet } from './source-set.js'

export interface CredentialsOptions {
  sources: SourceSet
  metrics: Metrics
  log: Logger
  /** `--registry-config`: read at start (a bad file fails start-up), then re-read when it changes. */
  registryConfig?: string
  /** How often the file is checked for changes (default 1 s). */
  fileIntervalMs?: number
  /** `--kubeconfig`: watch the registry Secret and ModuleSources through this cluster. */
  kubeconfig?: string
  /** For the in-cluster check (`KUBERNETES_SERVICE_HOST`); default `process.env`. */
  env?: NodeJS.ProcessEnv
  /** Where the in-cluster service-account token lives (tests point it elsewhere). */
  serviceAccountDir?: string
  /** Informer backoff and timeouts (tests shorten them). */
  kubernetesTiming?: Partial<InformerTiming>
  /**
   * Also watch PackageRepositories in Kubernetes (the server turns it on for the icon endpoint;
   * the plugin alone watches what /package needs).
   */
  watchPackageRepositories?: boolean
}

/** What the plugin exposes as `server.plugins.credentials.api`. */
export interface CredentialsApi {
  /** Re-reads `--registry-config` now (SIGHUP); true when new sources took effect. Never rejects. */
  reloadFile(reason?: string): Promise<boolean>
  /** False until PackageRepositories were listed once (always true without Kubernetes). */
  packageRepositoriesSynced(): boolean
}

// hapi's own typing for `server.plugins.credentials.api`, as hapijs/inert's lib/index.d.ts types its plugin.
declare module '@hapi/hapi' {
  interface PluginProperties {
    credentials: { api: CredentialsApi }
  }
}

/**
 * Fills the shared {@link SourceSet} from the configured providers: the `--registry-config`
 * file (`file`), and in Kubernetes the registry Secret (`secret`) and the ModuleSources
 * (`modulesources`). Every provider is declared at registration, so `/readyz` waits until each
 * has synced once; later outages keep the last known sources serving. Watching starts with
 * the server and stops with it.
 */
export const credentialsPlugin: Plugin<CredentialsOptions> = {
  name: 'credentials',
  dependencies: [],
  async register(server, options) {
    const log = options.log.child({ component: 'credentials' })
    let file: FileSourceWatcher | undefined
    if (options.registryConfig) {
      file = new FileSourceWatcher({
        path: options.registryConfig,
        sources: options.sources,
        metrics: options.metrics,
        log,
        ...(options.fileIntervalMs ? { intervalMs: options.fileIntervalMs } : {}),
      })
      await file.load()
    }
    const kubeConfig = await loadKubeConfig({
      ...(options.kubeconfig ? { kubeconfig: options.kubeconfig } : {}),
      env: options.env ?? process.env,
      ...(options.serviceAccountDir ? { serviceAccountDir: options.serviceAccountDir } : {}),
    })
    // What both Kubernetes watches are given, once a kubeconfig was found.
    const watchOptions = kubeConfig && {
      kubeConfig,
      sources: options.sources,
      metrics: options.metrics,
      log,
      ...(options.kubernetesTiming ? { timing: options.kubernetesTiming } : {}),
    }
    // client-node loads only in Kubernetes mode (see loadKubeConfig).
    const kubernetes = watchOptions ? new (await import('./kubernetes-source.js')).KubernetesSource(watchOptions) : undefined

    // PackageRepositories (package icons) are watched beside the ModuleSources, the same way.
    const packageRepositories =
      watchOptions && options.watchPackageRepositories ? new (await import('./package-repositories.js')).PackageRepositoryWatch(watchOptions) : undefined

    server.ext('onPreStart', () => {
      file?.start()
      kubernetes?.start()
      packageRepositories?.start()
    })
    server.ext('onPostStop', async () => {
      file?.stop()
      await Promise.all([kubernetes?.stop(), packageRepositories?.stop()])
    })
    const api: CredentialsApi = {
      reloadFile: async (reason = 'reload requested') => {
        if (!file) {
          log.info({ reason }, 'no --registry-config to reload')
          return false
        }
        return file.reload(reason)
      },
      packageRepositoriesSynced: () => packageRepositories?.synced ?? true,
    }
    server.expose('api', api)
  },
}

import type { Plugin } from '@hapi/hapi'
import type { Metrics } from '../metrics/metrics.js'
import { loadRegistryConfig } from './file-source.js'
import type { SourceSet } from './source-set.js'

export interface CredentialsOptions {
  sources: SourceSet
  metrics: Metrics
  /** `--registry-config`: read once at start; a bad file fails start-up. */
  registryConfig?: string
}

/**
 * Fills the shared {@link SourceSet} from the configured providers. Today: the
 * `--registry-config` file. The Kubernetes Secret and ModuleSources join here as more providers.
 */
export const credentialsPlugin: Plugin<CredentialsOptions> = {
  name: 'credentials',
  dependencies: [],
  async register(_server, options) {
    if (options.registryConfig) {
      options.sources.expect('file')
      const sources = await loadRegistryConfig(options.registryConfig)
      options.sources.replace('file', sources)
      options.metrics.sourceSynced.set({ provider: 'file' }, 1)
    }
  },
}

import { existsSync } from 'node:fs'
import { isIPv6 } from 'node:net'
import { join } from 'node:path'
import type { KubeConfig } from '@kubernetes/client-node'
import { SourceError } from './source.js'

/** Where a pod finds its service-account token and the cluster CA. */
export const SERVICE_ACCOUNT_DIR = '/var/run/secrets/kubernetes.io/serviceaccount'

export interface KubeConfigChoice {
  /** `--kubeconfig`: wins when given. */
  kubeconfig?: string
  /** For the in-cluster check: `KUBERNETES_SERVICE_HOST` and `KUBERNETES_SERVICE_PORT`. */
  env: NodeJS.ProcessEnv
  serviceAccountDir?: string
}

/**
 * The Kubernetes connection, or undefined when the proxy runs outside Kubernetes: `--kubeconfig`
 * when given, else the in-cluster config when running in a pod (the service host variable is
 * set and the service-account token exists). Mirrors client-node's `loadFromCluster`, with the
 * environment and token folder injectable. Throws a {@link SourceError} naming `--kubeconfig`
 * when that file is unusable; the message never quotes the file (it may hold a token).
 */
export async function loadKubeConfig(o: KubeConfigChoice): Promise<KubeConfig | undefined> {
  const dir = o.serviceAccountDir ?? SERVICE_ACCOUNT_DIR
  const host = o.env.KUBERNETES_SERVICE_HOST ?? ''
  const tokenFile = join(dir, 'token')
  const inPod = host !== '' && existsSync(tokenFile)
  if (!o.kubeconfig && !inPod) return undefined
  // Loaded only when needed: importing client-node costs over a second of start-up.
  const { KubeConfig } = await import('@kubernetes/client-node')
  const kc = new KubeConfig()
  if (o.kubeconfig) {
    const what = `--kubeconfig ${o.kubeconfig}`
    try {
      kc.loadFromFile(o.kubeconfig)
    } catch (err) {
      const e = err as NodeJS.ErrnoException
      if (e.code) throw new SourceError(`${what}: cannot read (${e.code})`)
      // js-yaml quotes the offending text; client-node's own checks only name fields.
      throw new SourceError(`${what}: not a valid kubeconfig${e.name === 'YAMLException' ? ' (YAML does not parse)' : ` (${e.message})`}`)
    }
    const cluster = kc.getCurrentCluster()
    if (!cluster) throw new SourceError(`${what}: no current-context naming a cluster`)
    let url: URL
    try {
      url = new URL(cluster.server)
    } catch {
      throw new SourceError(`${what}: cluster "${cluster.name}" has no valid server URL`)
    }
    if (url.protocol !== 'http:' && url.protocol !== 'https:') throw new SourceError(`${what}: cluster server must be an http(s) URL`)
    if (url.protocol === 'http:' && !cluster.skipTLSVerify) {
      // kubectl talks plain HTTP to an http:// server (kubectl proxy, a local API server): there
      // is no TLS to verify. client-node refuses it on every request unless skipTLSVerify is
      // set, which for http:// means exactly that and nothing more, so it is set here.
      kc.loadFromOptions({
        clusters: kc.clusters.map((c) => (c.name === cluster.name ? { ...c, skipTLSVerify: true } : c)),
        contexts: kc.contexts,
        users: kc.users,
        currentContext: kc.currentContext,
      })
    }
    return kc
  }
  const port = o.env.KUBERNETES_SERVICE_PORT || '443'
  const scheme = port === '80' || port === '8080' || port === '8001' ? 'http' : 'https'
  kc.loadFromClusterAndUser(
    // client-node refuses http:// unless skipTLSVerify is set (there is no TLS to verify then).
    { name: 'inCluster', server: `${scheme}://${isIPv6(host) ? `[${host}]` : host}:${port}`, caFile: join(dir, 'ca.crt'), skipTLSVerify: scheme === 'http' },
    // The tokenFile provider re-reads the file every minute: projected tokens rotate.
    { name: 'inClusterUser', authProvider: { name: 'tokenFile', config: { tokenFile } } },
  )
  return kc
}

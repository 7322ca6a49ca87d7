/**
 * How Deckhouse's kube-rbac-proxy routes a request, from its KUBE_RBAC_PROXY_CONFIG: upstreams
 * are registered on a Go `http.ServeMux` by `path` (a pattern ending in `/` matches a subtree,
 * any other only itself; the longest match wins; no match is a 404), the path is rewritten onto
 * the upstream URL (the matched prefix replaced by the upstream's path), and `excludePaths`
 * (Go `path.Match` globs) skip authentication and authorization. A request that is not excluded
 * is authorized with a SubjectAccessReview of the upstream's `resourceAttributes`, the verb
 * coming from the HTTP method.
 */
import { parse } from 'yaml'
import { container, RBAC_PROXY_CONTAINER, type Manifests } from './manifests.js'
import type { Attributes } from './rbac.js'

export interface ResourceAttributes {
  namespace?: string
  apiGroup?: string
  apiVersion?: string
  resource?: string
  subresource?: string
  name?: string
}

export interface Upstream {
  path: string
  upstream: string
  authorization?: { resourceAttributes?: ResourceAttributes }
}

export interface RbacProxyConfig {
  excludePaths?: string[]
  upstreams: Upstream[]
}

export interface Routed {
  upstream: Upstream
  /** The URL kube-rbac-proxy forwards to. */
  target: string
  excluded: boolean
}

export function rbacProxyConfig(m: Manifests): RbacProxyConfig {
  const value = container(m, RBAC_PROXY_CONTAINER).env?.find((e) => e.name === 'KUBE_RBAC_PROXY_CONFIG')?.value
  if (value === undefined) throw new Error('kube-rbac-proxy has no KUBE_RBAC_PROXY_CONFIG')
  return parse(value) as RbacProxyConfig
}

/** Go's `path.Match` for the patterns a config uses: `*` and `?` never cross a `/`. */
export function pathMatch(pattern: string, path: string): boolean {
  const re = pattern.replace(/[.+^${}()|[\]\\]/g, '\\$&').replace(/\*/g, '[^/]*').replace(/\?/g, '[^/]')
  return new RegExp(`^${re}$`).test(path)
}

/** Go's `singleJoiningSlash` from the Deckhouse patch. */
function joinSlash(a: string, b: string): string {
  const aSlash = a.endsWith('/')
  const bSlash = b.startsWith('/')
  if (aSlash && bSlash) return a + b.slice(1)
  if (!aSlash && !bSlash) return `${a}/${b}`
  return a + b
}

/** Where kube-rbac-proxy sends `path`, or undefined for its 404. */
export function routeRequest(config: RbacProxyConfig, path: string): Routed | undefined {
  let best: Upstream | undefined
  for (const u of config.upstreams) {
    const matches = u.path.endsWith('/') ? path.startsWith(u.path) : path === u.path
    if (matches && (!best || u.path.length > best.path.length)) best = u
  }
  if (!best) return undefined
  const target = new URL(best.upstream)
  let rewritten = joinSlash(target.pathname, path.slice(best.path.length))
  if (!best.path.endsWith('/')) rewritten = rewritten.replace(/\/$/, '')
  target.pathname = rewritten
  return { upstream: best, target: target.toString(), excluded: (config.excludePaths ?? []).some((p) => pathMatch(p, path)) }
}

/** kube-rbac-proxy's HTTP method to SubjectAccessReview verb. */
export const METHOD_VERBS: Readonly<Record<string, string>> = { GET: 'get', POST: 'create', PUT: 'update', PATCH: 'patch', DELETE: 'delete' }

/** The SubjectAccessReview attributes for a request routed to `u` with `method`. */
export function reviewAttributes(u: Upstream, method: string): Attributes | undefined {
  const ra = u.authorization?.resourceAttributes
  const verb = METHOD_VERBS[method.toUpperCase()]
  if (!ra || !verb) return undefined
  return {
    verb,
    apiGroup: ra.apiGroup ?? '',
    resource: ra.subresource ? `${ra.resource ?? ''}/${ra.subresource}` : (ra.resource ?? ''),
    ...(ra.namespace !== undefined ? { namespace: ra.namespace } : {}),
    ...(ra.name !== undefined ? { name: ra.name } : {}),
  }
}

/**
 * A small model of Kubernetes RBAC, enough to ask "may this subject make this call?" of the
 * manifests in infra/: how the API server turns a request into attributes (RequestInfo), which
 * rules a subject's bindings grant, and whether a rule covers attributes. No wildcards are used
 * in infra/, but they are honoured here so a wildcard is judged by what it really grants.
 */
import { all, type Binding, type Manifests, type PolicyRule, type Role, type Subject } from './manifests.js'

/** What an authorizer sees (a SubjectAccessReview's resourceAttributes). */
export interface Attributes {
  verb: string
  apiGroup: string
  /** `deployments`, or with a subresource `deployments/http`. */
  resource: string
  namespace?: string
  name?: string
}

/** A rule as granted: a ClusterRoleBinding grants everywhere, a RoleBinding in its namespace. */
export interface Grant {
  /** Undefined: every namespace and cluster-scoped resources. */
  namespace?: string
  rule: PolicyRule
  via: string
}

/**
 * The attributes the API server derives from a request (k8s.io/apiserver RequestInfoFactory):
 * GET on a collection is `list`, or `watch` with `watch=true`; GET on a named object is `get`;
 * a `metadata.name=` field selector on a list or watch supplies the name, which is what lets a
 * Role restricted by resourceNames allow a LIST/WATCH of one Secret.
 */
export function requestAttributes(method: string, path: string, query: Record<string, string>): Attributes {
  const parts = path.split('/').filter((p) => p !== '')
  let rest: string[]
  let apiGroup: string
  if (parts[0] === 'api' && parts.length >= 2) {
    apiGroup = ''
    rest = parts.slice(2)
  } else if (parts[0] === 'apis' && parts.length >= 3) {
    apiGroup = parts[1] ?? ''
    rest = parts.slice(3)
  } else {
    throw new Error(`not a resource path: ${path}`)
  }
  let namespace: string | undefined
  if (rest[0] === 'namespaces' && rest.length >= 3) {
    namespace = rest[1]
    rest = rest.slice(2)
  }
  const [resource = '', name, subresource] = rest
  const watch = query.watch === 'true' || query.watch === '1'
  let verb: string
  switch (method.toUpperCase()) {
    case 'GET':
      verb = name === undefined ? (watch ? 'watch' : 'list') : 'get'
      break
    case 'POST':
      verb = 'create'
      break
    case 'PUT':
      verb = 'update'
      break
    case 'PATCH':
      verb = 'patch'
      break
    case 'DELETE':
      verb = name === undefined ? 'deletecollection' : 'delete'
      break
    default:
      verb = method.toLowerCase()
  }
  let effectiveName = name
  if (effectiveName === undefined && (verb === 'list' || verb === 'watch')) {
    effectiveName = /^metadata\.name=([^,]+)$/.exec(query.fieldSelector ?? '')?.[1]
  }
  return {
    verb,
    apiGroup,
    resource: subresource ? `${resource}/${subresource}` : resource,
    ...(namespace !== undefined ? { namespace } : {}),
    ...(effectiveName !== undefined ? { name: effectiveName } : {}),
  }
}

function sameSubject(a: Subject, b: Subject, bindingNamespace: string | undefined): boolean {
  if (a.kind !== b.kind || a.name !== b.name) return false
  if (a.kind !== 'ServiceAccount') return true
  return (a.namespace ?? bindingNamespace) === (b.namespace ?? bindingNamespace)
}

/** Every rule granted to `subject` by the bindings in `m`, with where it applies. */
export function grantsFor(m: Manifests, subject: Subject): Grant[] {
  const roles = all<Role>(m, 'Role')
  const clusterRoles = all<Role>(m, 'ClusterRole')
  const grants: Grant[] = []
  const rolesOf = (kind: string, name: string, namespace: string | undefined): Role[] =>
    kind === 'ClusterRole'
      ? clusterRoles.filter((r) => r.metadata.name === name)
      : roles.filter((r) => r.metadata.name === name && r.metadata.namespace === namespace)
  for (const b of all<Binding>(m, 'ClusterRoleBinding')) {
    if (!b.subjects.some((s) => sameSubject(s, subject, undefined))) continue
    for (const role of rolesOf(b.roleRef.kind, b.roleRef.name, undefined)) {
      for (const rule of role.rules) grants.push({ rule, via: `ClusterRoleBinding ${b.metadata.name}` })
    }
  }
  for (const b of all<Binding>(m, 'RoleBinding')) {
    const ns = b.metadata.namespace
    if (!b.subjects.some((s) => sameSubject(s, subject, ns))) continue
    for (const role of rolesOf(b.roleRef.kind, b.roleRef.name, ns)) {
      for (const rule of role.rules) grants.push({ ...(ns !== undefined ? { namespace: ns } : {}), rule, via: `RoleBinding ${ns}/${b.metadata.name}` })
    }
  }
  return grants
}

function has(list: readonly string[] | undefined, value: string): boolean {
  return list !== undefined && (list.includes('*') || list.includes(value))
}

/** True when `rule`, granted in `namespace`, covers `a` (RBAC's RuleAllows, for one verb). */
export function ruleCovers(grant: Grant, a: Attributes): boolean {
  if (grant.namespace !== undefined && grant.namespace !== a.namespace) return false
  const r = grant.rule
  if (!has(r.verbs, a.verb) || !has(r.apiGroups, a.apiGroup) || !has(r.resources, a.resource)) return false
  if (r.resourceNames && r.resourceNames.length > 0) return a.name !== undefined && r.resourceNames.includes(a.name)
  return true
}

export function allows(grants: readonly Grant[], a: Attributes): boolean {
  return grants.some((g) => ruleCovers(g, a))
}

export function describe(a: Attributes): string {
  return `${a.verb} ${a.apiGroup || 'core'}/${a.resource}${a.namespace ? ` in ${a.namespace}` : ''}${a.name ? ` named ${a.name}` : ''}`
}

/**
 * What a granted rule allows beyond `needed`: one line per (verb, apiGroup, resource) in the
 * rule that no needed call uses, and for rules without resourceNames, any that a needed call
 * had to be restricted to. Empty when the grants are exactly what is needed.
 */
export function surplus(grants: readonly Grant[], needed: readonly Attributes[]): string[] {
  const problems: string[] = []
  for (const g of grants) {
    const r = g.rule
    for (const verb of r.verbs) {
      for (const apiGroup of r.apiGroups ?? []) {
        for (const resource of r.resources ?? []) {
          const used = needed.some(
            (a) => (verb === '*' || a.verb === verb) && (apiGroup === '*' || a.apiGroup === apiGroup) && (resource === '*' || a.resource === resource) && ruleCovers(g, a),
          )
          if (!used) problems.push(`${g.via} grants ${verb} ${apiGroup || 'core'}/${resource}${g.namespace ? ` in ${g.namespace}` : ''}, which nothing calls`)
        }
      }
    }
    if (r.nonResourceURLs?.length) problems.push(`${g.via} grants non-resource URLs ${r.nonResourceURLs.join(', ')}`)
    // A rule that lets a caller read more objects than the calls name (no resourceNames where
    // every call names its object) is wider than needed.
    const named = needed.filter((a) => ruleCovers(g, a))
    if (named.length > 0 && !(r.resourceNames?.length) && named.every((a) => a.name !== undefined)) {
      problems.push(`${g.via} grants ${r.resources?.join(', ')} without resourceNames, but every call names ${[...new Set(named.map((a) => a.name))].join(', ')}`)
    }
  }
  return problems
}

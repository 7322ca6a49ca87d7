/**
 * infra/ with an opt-in kustomize Component applied, the way `kubectl apply -k` would build it:
 * the base's objects, the Component's resources, and its patches (JSON patches, RFC 6902, the
 * only kind infra/components/ uses: `test` and `add`). `kubectl kustomize`, where this machine
 * has it, builds the same thing for real, so the tests can check this stand-in against it.
 */
import { spawnSync } from 'node:child_process'
import { cpSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { parse, parseAllDocuments } from 'yaml'
import { INFRA_DIR, loadManifests, type K8sObject, type Manifests } from './manifests.js'

/** The peer-fill Component, as infra/kustomization.yaml names it (commented out). */
export const PEER_FILL = 'components/peer-fill'

interface ComponentFile {
  apiVersion?: string
  kind?: string
  resources?: string[]
  patches?: Array<{ path: string; target: { group?: string; version?: string; kind: string; name: string } }>
}

interface JsonPatchOp {
  op: string
  path: string
  value?: unknown
}

function documents(path: string, file: string): Array<{ file: string; object: K8sObject }> {
  const out: Array<{ file: string; object: K8sObject }> = []
  for (const doc of parseAllDocuments(readFileSync(path, 'utf8'))) {
    if (doc.errors.length > 0) throw new Error(`${file}: ${doc.errors.map((e) => e.message).join('; ')}`)
    const object = doc.toJS() as K8sObject | null
    if (object !== null) out.push({ file, object })
  }
  return out
}

/** RFC 6901: `/a/0/b` to its segments (`~1` is `/`, `~0` is `~`). */
function pointer(path: string): string[] {
  if (!path.startsWith('/')) throw new Error(`not a JSON pointer: ${path}`)
  return path.slice(1).split('/').map((s) => s.replace(/~1/g, '/').replace(/~0/g, '~'))
}

/** Applies one `test` or `add` op to `doc` in place; throws as kustomize's build would fail. */
export function applyOp(doc: unknown, op: JsonPatchOp): void {
  const parts = pointer(op.path)
  const last = parts.pop() as string
  let parent = doc as Record<string, unknown> | unknown[]
  for (const part of parts) {
    const next: unknown = Array.isArray(parent) ? parent[Number(part)] : parent[part]
    if (typeof next !== 'object' || next === null) throw new Error(`${op.op} ${op.path}: ${part} does not exist`)
    parent = next as Record<string, unknown> | unknown[]
  }
  if (op.op === 'test') {
    const actual: unknown = Array.isArray(parent) ? parent[Number(last)] : parent[last]
    if (JSON.stringify(actual) !== JSON.stringify(op.value)) throw new Error(`test ${op.path}: ${JSON.stringify(actual)} is not ${JSON.stringify(op.value)}`)
    return
  }
  if (op.op !== 'add') throw new Error(`op ${op.op} is not one this stand-in knows: teach it, or use test/add`)
  const value = structuredClone(op.value)
  if (!Array.isArray(parent)) {
    parent[last] = value
    return
  }
  const index = last === '-' ? parent.length : Number(last)
  if (!Number.isInteger(index) || index < 0 || index > parent.length) throw new Error(`add ${op.path}: index out of range`)
  parent.splice(index, 0, value)
}

/** infra/ (or a copy in `dir`) with the Component at `component` (relative to `dir`) applied. */
export function loadWithComponent(dir = INFRA_DIR, component = PEER_FILL): Manifests {
  const m = loadManifests(dir)
  const root = join(dir, component)
  const kustomization = parse(readFileSync(join(root, 'kustomization.yaml'), 'utf8')) as ComponentFile
  if (kustomization.kind !== 'Component' || kustomization.apiVersion !== 'kustomize.config.k8s.io/v1alpha1') throw new Error(`${component} is not a kustomize Component`)
  for (const file of kustomization.resources ?? []) m.objects.push(...documents(join(root, file), `${component}/${file}`))
  for (const patch of kustomization.patches ?? []) {
    const ops = parse(readFileSync(join(root, patch.path), 'utf8')) as JsonPatchOp[]
    if (!Array.isArray(ops)) throw new Error(`${patch.path}: only JSON patches are known here`)
    const { group, version, kind, name } = patch.target
    const targets = m.objects.filter(({ object: o }) => o.kind === kind && o.metadata.name === name && (group === undefined || o.apiVersion === `${group}/${version ?? 'v1'}`))
    if (targets.length === 0) throw new Error(`${patch.path}: no ${kind} ${name} to patch`)
    for (const t of targets) for (const op of ops) applyOp(t.object, op)
  }
  return m
}

/**
 * What `kubectl kustomize` builds of infra/ with the Component listed in its kustomization (a
 * copy: infra/ itself is left as shipped), or undefined where kubectl is not installed.
 */
export function kubectlBuild(component = PEER_FILL): K8sObject[] | undefined {
  const dir = mkdtempSync(join(tmpdir(), 'rpp-infra-'))
  try {
    cpSync(INFRA_DIR, dir, { recursive: true })
    const path = join(dir, 'kustomization.yaml')
    const text = readFileSync(path, 'utf8')
    const enabled = text.replace(`# - ${component}`, `- ${component}`)
    if (enabled === text) throw new Error(`infra/kustomization.yaml has no commented-out "- ${component}" line to enable`)
    writeFileSync(path, enabled)
    const run = spawnSync('kubectl', ['kustomize', dir], { encoding: 'utf8', timeout: 60_000 })
    if (run.error && (run.error as NodeJS.ErrnoException).code === 'ENOENT') return undefined
    if (run.status !== 0) throw new Error(`kubectl kustomize failed: ${run.stderr}`)
    return parseAllDocuments(run.stdout).map((d) => d.toJS() as K8sObject)
  } finally {
    rmSync(dir, { recursive: true, force: true })
  }
}

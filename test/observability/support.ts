/**
 * Helpers for the observability tests: a parser for the Prometheus text format, the metric names
 * used by the alert rules and the dashboard, and the README's metrics table. Not a test file
 * (`.taprc` runs `*.test.ts` only).
 */
import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { parse } from 'yaml'

export const ROOT = fileURLToPath(new URL('../..', import.meta.url))
export const RULE_FILE = join(ROOT, 'infra', 'monitoring', 'prometheus-rule.yaml')
export const DASHBOARD_FILE = join(ROOT, 'infra', 'monitoring', 'grafana-dashboard.json')
export const PREFIX = 'registry_packages_proxy_'

/** One sample line of an exposition. */
export interface Sample {
  name: string
  labels: Record<string, string>
  value: number
}

/** A parsed `/metrics` answer: families from `# TYPE` lines, and every sample. */
export interface Exposition {
  types: Map<string, string>
  samples: Sample[]
}

/** Parses the Prometheus text format (0.0.4), label value escapes included. Throws on a malformed line. */
export function parseExposition(text: string): Exposition {
  const types = new Map<string, string>()
  const samples: Sample[] = []
  for (const line of text.split('\n')) {
    if (line === '') continue
    const type = /^# TYPE (\S+) (\S+)$/.exec(line)
    if (type?.[1] && type[2]) {
      types.set(type[1], type[2])
      continue
    }
    if (line.startsWith('#')) continue
    samples.push(parseSample(line))
  }
  return { types, samples }
}

function parseSample(line: string): Sample {
  const name = /^[a-zA-Z_:][a-zA-Z0-9_:]*/.exec(line)?.[0]
  if (!name) throw new Error(`not a sample line: ${line}`)
  let i = name.length
  const labels: Record<string, string> = {}
  if (line[i] === '{') {
    i++
    while (line[i] !== '}') {
      const label = /^([a-zA-Z_][a-zA-Z0-9_]*)="/.exec(line.slice(i))
      if (!label?.[1]) throw new Error(`bad label at ${i}: ${line}`)
      i += label[0].length
      let value = ''
      while (line[i] !== '"') {
        if (i >= line.length) throw new Error(`unterminated label value: ${line}`)
        if (line[i] === '\\') {
          const next = line[i + 1]
          value += next === 'n' ? '\n' : (next ?? '')
          i += 2
        } else {
          value += line[i]
          i++
        }
      }
      labels[label[1]] = value
      i++
      if (line[i] === ',') i++
    }
    i++
  }
  const valueText = line.slice(i).trim().split(/\s+/)[0] ?? ''
  const value = valueText === '+Inf' ? Infinity : valueText === '-Inf' ? -Infinity : Number(valueText)
  if (Number.isNaN(value) && valueText !== 'NaN') throw new Error(`bad value in: ${line}`)
  return { name, labels, value }
}

/** The family a sample belongs to: histogram and summary samples drop their suffix. */
export function familyOf(sample: string, types: Map<string, string>): string {
  if (types.has(sample)) return sample
  const base = sample.replace(/_(bucket|sum|count|created)$/, '')
  return types.has(base) ? base : sample
}

/** `name{a="1",b="2"}` with labels sorted: a stable key for one series. */
export function seriesKey(s: Pick<Sample, 'name' | 'labels'>): string {
  const labels = Object.entries(s.labels)
    .sort(([a], [b]) => a.localeCompare(b))
    .map(([k, v]) => `${k}=${JSON.stringify(v)}`)
  return labels.length === 0 ? s.name : `${s.name}{${labels.join(',')}}`
}

/** Value of one series, or undefined when the exposition does not have it. */
export function valueOf(e: Exposition, name: string, labels: Record<string, string> = {}): number | undefined {
  const key = seriesKey({ name, labels })
  return e.samples.find((s) => seriesKey(s) === key)?.value
}

/** Our metric names in a PromQL expression (digits included: `…_lag_p99_seconds`), `_bucket`/`_sum`/`_count` stripped. */
export function promqlMetricNames(expr: string): string[] {
  const names = expr.match(/registry_packages_proxy_[a-z0-9_]+/g) ?? []
  return [...new Set(names.map((n) => n.replace(/_(bucket|sum|count)$/, '')))]
}

export interface AlertRule {
  alert: string
  expr: string
  for?: string
  labels?: Record<string, string>
  annotations?: Record<string, string>
}

export interface RuleDocument {
  apiVersion: string
  kind: string
  metadata: { name: string; namespace?: string; labels?: Record<string, string> }
  spec: { groups: Array<{ name: string; rules: AlertRule[] }> }
}

export function loadRule(): RuleDocument {
  return parse(readFileSync(RULE_FILE, 'utf8')) as RuleDocument
}

export function alertRules(doc: RuleDocument = loadRule()): AlertRule[] {
  return doc.spec.groups.flatMap((g) => g.rules)
}

interface DashboardPanel {
  id?: number
  type: string
  title: string
  targets?: Array<{ expr?: string; refId?: string }>
  panels?: DashboardPanel[]
}

export interface Dashboard {
  title: string
  uid: string
  panels: DashboardPanel[]
  templating?: { list: Array<{ name: string; type: string; query?: unknown; definition?: string }> }
}

export function loadDashboard(): Dashboard {
  return JSON.parse(readFileSync(DASHBOARD_FILE, 'utf8')) as Dashboard
}

/** Every panel, rows' nested panels included. */
export function dashboardPanels(d: Dashboard = loadDashboard()): DashboardPanel[] {
  return d.panels.flatMap((p) => [p, ...(p.panels ?? [])])
}

/** Every PromQL query of the dashboard: panel targets and query variables. */
export function dashboardQueries(d: Dashboard = loadDashboard()): Array<{ where: string; expr: string }> {
  const out: Array<{ where: string; expr: string }> = []
  for (const p of dashboardPanels(d)) {
    for (const target of p.targets ?? []) {
      if (target.expr) out.push({ where: `panel "${p.title}" ${target.refId ?? ''}`, expr: target.expr })
    }
  }
  for (const v of d.templating?.list ?? []) {
    if (v.type !== 'query') continue
    const q = typeof v.query === 'string' ? v.query : (v.query as { query?: string } | undefined)?.query
    if (q) out.push({ where: `variable ${v.name}`, expr: q })
  }
  return out
}

/** One row of the README's metrics table. */
export interface ReadmeMetric {
  /** The family name, or a prefix ending in `_` for a `…_*` row. */
  name: string
  wildcard: boolean
  labels: string[]
  type: string
}

/** The rows of the table in README's "## Metrics" section. */
export function readmeMetrics(): ReadmeMetric[] {
  const readme = readFileSync(join(ROOT, 'README.md'), 'utf8')
  const section = /^## Metrics\n([\s\S]*?)(?=^## |(?![\s\S]))/m.exec(readme)?.[1]
  if (!section) throw new Error('README.md has no "## Metrics" section')
  const rows: ReadmeMetric[] = []
  for (const line of section.split('\n')) {
    const m = /^\| `(registry_packages_proxy_[a-z0-9_]+\*?)(?:\{([a-z_,]*)\})?` \| ([a-z]*) \|/.exec(line)
    if (!m?.[1]) continue
    const wildcard = m[1].endsWith('*')
    rows.push({ name: wildcard ? m[1].slice(0, -1) : m[1], wildcard, labels: m[2] ? m[2].split(',') : [], type: m[3] ?? '' })
  }
  return rows
}

/** Brackets and parentheses balance, and string literals close: a cheap PromQL sanity check. */
export function balanced(expr: string): boolean {
  const stack: string[] = []
  const pairs: Record<string, string> = { ')': '(', ']': '[', '}': '{' }
  let quote: string | undefined
  for (let i = 0; i < expr.length; i++) {
    const c = expr[i] ?? ''
    if (quote) {
      if (c === '\\') i++
      else if (c === quote) quote = undefined
      continue
    }
    if (c === '"' || c === "'") quote = c
    else if ('([{'.includes(c)) stack.push(c)
    else if (c in pairs && stack.pop() !== pairs[c]) return false
  }
  return stack.length === 0 && quote === undefined
}

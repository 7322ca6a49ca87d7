/**
 * infra/monitoring: the PrometheusRule validates against the Prometheus Operator schema and is
 * part of `kubectl apply -k infra/`; every alert the issue asks for is there, with `for:`, a
 * severity, and a description that tells on-call what to check; the dashboard has the panels
 * on-call needs, on one data source variable. Which metric names they use is checked against a
 * running server in test/integration/metric-names.test.ts.
 */
import { spawnSync } from 'node:child_process'
import { readdirSync, readFileSync } from 'node:fs'
import { join } from 'node:path'
import { PrometheusRule } from '@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1'
import t from 'tap'
import { parse, parseAllDocuments } from 'yaml'
import { alertRules, balanced, dashboardPanels, dashboardQueries, loadDashboard, loadRule, ROOT, type RuleDocument } from '../fixtures/monitoring.js'

const rule = loadRule()

function validate(doc: RuleDocument): void {
  new PrometheusRule(structuredClone(doc)).validate()
}

void t.test('the PrometheusRule validates, and the schema is really applied', (t) => {
  t.doesNotThrow(() => validate(rule))
  t.equal(rule.metadata.namespace, 'd8-monitoring', 'beside the PodMonitor')
  t.match(rule.metadata.labels, { app: 'registry-packages-proxy', prometheus: 'main', component: 'rules' }, "labels Deckhouse's Prometheus selects rules by")
  const badFor = structuredClone(rule)
  const first = badFor.spec.groups[0]?.rules[0]
  if (first) first.for = 'ten minutes'
  t.throws(() => validate(badFor), /for/)
  t.end()
})

void t.test('kubectl apply -k infra/ includes the rule', (t) => {
  const top = parse(readFileSync(join(ROOT, 'infra', 'kustomization.yaml'), 'utf8')) as { components?: string[] }
  t.ok(top.components?.includes('monitoring'), 'infra/kustomization.yaml lists the monitoring component')
  const component = parse(readFileSync(join(ROOT, 'infra', 'monitoring', 'kustomization.yaml'), 'utf8')) as { kind: string; resources: string[] }
  t.equal(component.kind, 'Component')
  const yamlFiles = readdirSync(join(ROOT, 'infra', 'monitoring')).filter((f) => /\.ya?ml$/.test(f) && f !== 'kustomization.yaml')
  t.same([...component.resources].sort(), yamlFiles.sort(), 'the component lists every manifest in infra/monitoring')
  // kubectl's built-in kustomize renders offline; where it is installed, the rule must come out.
  const built = spawnSync('kubectl', ['kustomize', join(ROOT, 'infra')], { encoding: 'utf8' })
  if (built.error) {
    t.comment('kubectl is not installed: the rendered kustomization is not checked')
  } else {
    t.equal(built.status, 0, `kubectl kustomize infra/ succeeds ${built.stderr}`)
    const kinds = parseAllDocuments(built.stdout).map((d) => (d.toJS() as { kind?: string } | null)?.kind)
    t.ok(kinds.includes('PrometheusRule'), 'the rendered manifests hold the PrometheusRule')
  }
  t.end()
})

void t.test('every alert has for:, a severity, and a runbook-like description', (t) => {
  const rules = alertRules(rule)
  const names = rules.map((r) => r.alert)
  t.same(names.length, new Set(names).size, 'alert names are unique')
  for (const wanted of ['NotReady', 'UpstreamErrors', 'DigestMismatch', 'EvictionsChurning', 'CacheNearLimit']) {
    t.ok(names.includes(`RegistryPackagesProxy${wanted}`), `RegistryPackagesProxy${wanted} exists`)
  }
  for (const r of rules) {
    t.match(r.alert, /^RegistryPackagesProxy[A-Z]\w+$/, `${r.alert}: named after the app`)
    t.match(r.for, /^\d+[smh]$/, `${r.alert}: for ${r.for}`)
    t.ok(['critical', 'warning', 'info'].includes(r.labels?.severity ?? ''), `${r.alert}: severity ${r.labels?.severity}`)
    t.match(r.labels?.severity_level, /^[1-9]$/, `${r.alert}: Deckhouse severity_level`)
    t.ok((r.annotations?.summary ?? '').length > 10, `${r.alert}: summary`)
    t.ok(balanced(r.expr), `${r.alert}: brackets and quotes balance`)
    const description = r.annotations?.description ?? ''
    const tools = ['/readyz', 'cache ls', 'cache show', 'logs', 'grep', 'kubectl'].filter((s) => description.includes(s))
    t.ok(tools.length > 0, `${r.alert}: the description names what to check (${tools.join(', ')})`)
  }
  const notReady = rules.find((r) => r.alert === 'RegistryPackagesProxyNotReady')
  t.match(notReady?.expr, /registry_packages_proxy_ready/, 'not-ready uses the process gauge, not kube-state-metrics')
  t.match(notReady?.annotations?.description, /reasons/, 'and tells where the reasons are')
  t.end()
})

void t.test('the dashboard has the panels on-call needs', (t) => {
  const dashboard = loadDashboard()
  t.equal(dashboard.uid, 'registry-packages-proxy')
  const panels = dashboardPanels(dashboard)
  const ids = panels.map((p) => p.id)
  t.same(ids.length, new Set(ids).size, 'panel ids are unique')
  const titles = panels.map((p) => p.title.toLowerCase())
  for (const wanted of [
    'hit ratio',
    'requests by code',
    'upstream errors and resumes by kind',
    'fill duration p50 / p95',
    'cache used vs limit',
    'evictions',
    'downloads: fills, running, queued, refused',
    'digest mismatches',
    'source sync age',
  ]) {
    t.ok(titles.includes(wanted), `a "${wanted}" panel`)
  }
  const text = readFileSync(join(ROOT, 'infra', 'monitoring', 'grafana-dashboard.json'), 'utf8')
  const datasources = new Set([...text.matchAll(/"uid": "([^"]+)"/g)].map((m) => m[1]).filter((u) => u !== 'registry-packages-proxy'))
  t.same([...datasources], ['${ds_prometheus}'], 'every query uses the data source variable')
  for (const q of dashboardQueries(dashboard)) t.ok(balanced(q.expr), `${q.where}: brackets and quotes balance`)
  const fill = panels.find((p) => p.title === 'Fill duration p50 / p95')
  t.match(fill?.targets?.map((x) => x.expr).join('\n'), /histogram_quantile\(0\.5,[\s\S]*histogram_quantile\(0\.95,/, 'fill duration p50 and p95')
  t.end()
})

/**
 * Peer fill in infra/: off in the base (no pod waits for a Secret nobody makes), and on with
 * the opt-in Component infra/components/peer-fill/, whose cert-manager objects make the Secret
 * and whose patch mounts it where the flags look. Built by a stand-in for kustomize (component.ts)
 * and, where kubectl is installed, by `kubectl kustomize` itself, which must agree.
 */
import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import { Deployment } from 'kubernetes-models/apps/v1'
import t from 'tap'
import { checkFlags, checkWiring } from '../fixtures/infra/checks.js'
import { applyOp, kubectlBuild, loadWithComponent, PEER_FILL } from '../fixtures/infra/component.js'
import {
  cloneManifests,
  container,
  deployment,
  loadManifests,
  PROXY_CONTAINER,
  RBAC_PROXY_CONTAINER,
  ROOT,
  type K8sObject,
  type Manifests,
} from '../fixtures/infra/manifests.js'
import {
  checkCertManagerShapes,
  checkPeerFillOff,
  checkPeerFillOn,
  checkSecretVolumes,
  TLS_SECRET,
  type Certificate,
  type Issuer,
} from '../fixtures/infra/peer-fill.js'

const base = loadManifests()
const withPeers = loadWithComponent()

function broken(m: Manifests, edit: (m: Manifests) => void): Manifests {
  const copy = cloneManifests(m)
  edit(copy)
  return copy
}

function cert(m: Manifests, secretName: string): Certificate {
  const c = m.objects.map((o) => o.object).find((o): o is Certificate => o.kind === 'Certificate' && (o as Certificate).spec.secretName === secretName)
  if (!c) throw new Error(`no Certificate for ${secretName}`)
  return c
}

void t.test('the base keeps peer fill off and mounts no Secret it does not make', (t) => {
  t.same(checkPeerFillOff(base), [])
  t.same(checkSecretVolumes(base), [])
  t.notOk(
    base.objects.some((o) => o.object.apiVersion.startsWith('cert-manager.io/')),
    'no cert-manager objects: the base needs no cert-manager',
  )
  // The defect the Component avoids: the TLS Secret mounted without anything making it.
  const waiting = broken(base, (m) => {
    deployment(m).spec.template.spec.volumes?.push({ name: 'peer-tls', secret: { secretName: TLS_SECRET } })
  })
  t.match(checkSecretVolumes(waiting), [/Secret registry-packages-proxy-tls, which nothing in the manifests makes/])
  t.match(checkPeerFillOff(withPeers), [/--peer-ca-file/, /--peer-server-name/, /kube-rbac-proxy serves a mounted certificate/])
  t.end()
})

void t.test('the Component builds: its objects validate, the binary accepts the flags', (t) => {
  const d = deployment(withPeers)
  t.doesNotThrow(() => new Deployment(structuredClone(d) as never).validate(), 'the patched Deployment validates')
  t.same(checkCertManagerShapes(withPeers), [])
  t.equal(withPeers.objects.filter((o) => o.object.apiVersion === 'cert-manager.io/v1').length, 4, 'two Issuers, two Certificates')
  t.same(checkFlags(withPeers), [], '--peer-ca-file and --peer-server-name parse')
  t.same(checkWiring(withPeers), [], 'every new object names its namespace and the app label')
  t.same(checkSecretVolumes(withPeers), [], 'the mounted Secret is one a Certificate makes')
  // The shape check would notice the usual slips.
  const slips = broken(withPeers, (m) => {
    const c = cert(m, TLS_SECRET)
    c.spec.usages = ['serverAuth']
    c.spec.duration = '90d'
    ;(c.spec as Record<string, unknown>).keySize = 2048
    const i = m.objects.find((o) => o.object.kind === 'Issuer')?.object as Issuer
    i.spec.ca = { secretName: 'x' }
  })
  t.match(checkCertManagerShapes(slips), [
    /exactly one issuer type/,
    /spec.keySize is not a Certificate field/,
    /90d is not a Go duration/,
    /usage "serverAuth"/,
  ])
  // The patch checks container order before it appends by index.
  const swapped = structuredClone(deployment(base))
  swapped.spec.template.spec.containers.reverse()
  t.throws(() => applyOp(swapped, { op: 'test', path: '/spec/template/spec/containers/0/name', value: PROXY_CONTAINER }), /is not "registry-packages-proxy"/)
  t.end()
})

void t.test('the Component wires the Certificate to the flags', (t) => {
  t.same(checkPeerFillOn(withPeers), [])
  t.match(checkPeerFillOn(base), [/no --peer-ca-file/])
  const args = (name: string, m: Manifests) => container(m, name).args ?? []
  const replaceArg = (m: Manifests, name: string, flag: string, value: string): void => {
    const c = container(m, name)
    c.args = args(name, m).map((a) => (a.startsWith(`--${flag}=`) ? `--${flag}=${value}` : a))
  }
  const moved = broken(withPeers, (m) => replaceArg(m, PROXY_CONTAINER, 'peer-ca-file', '/etc/peer-ca/ca.crt'))
  t.match(checkPeerFillOn(moved), [/--peer-ca-file \/etc\/peer-ca\/ca.crt is on no Secret volume/])
  const wrongKey = broken(withPeers, (m) => replaceArg(m, RBAC_PROXY_CONTAINER, 'tls-private-key-file', '/etc/kube-rbac-proxy-tls/tls.crt'))
  t.match(checkPeerFillOn(wrongKey), [/--tls-private-key-file .* is the Secret's tls.crt, not tls.key/])
  const otherName = broken(withPeers, (m) => replaceArg(m, PROXY_CONTAINER, 'peer-server-name', 'registry-packages-proxy'))
  t.match(checkPeerFillOn(otherName), [/--peer-server-name is registry-packages-proxy, not/])
  const otherDns = broken(withPeers, (m) => (cert(m, TLS_SECRET).spec.dnsNames = ['registry-packages-proxy.svc']))
  t.match(checkPeerFillOn(otherDns), [/does not name registry-packages-proxy.d8-cloud-instance-manager.svc/])
  const otherSecret = broken(withPeers, (m) => (cert(m, TLS_SECRET).spec.secretName = 'registry-packages-proxy-serving'))
  t.match(checkPeerFillOn(otherSecret), [/no Certificate writes the Secret registry-packages-proxy-tls/])
  t.match(checkSecretVolumes(otherSecret), [/nothing in the manifests makes/])
  const pinned = broken(withPeers, (m) => {
    const mount = container(m, PROXY_CONTAINER).volumeMounts?.find((v) => v.name === 'peer-ca')
    if (mount) Object.assign(mount, { mountPath: '/etc/registry-packages-proxy/peer-ca/ca.crt', subPath: 'ca.crt' })
  })
  t.match(checkPeerFillOn(pinned), [/mounted with subPath/])
  const keyInProxy = broken(withPeers, (m) => {
    const v = deployment(m).spec.template.spec.volumes?.find((x) => x.name === 'peer-ca')
    if (v?.secret) delete v.secret.items
  })
  t.match(checkPeerFillOn(keyInProxy), [/the proxy container mounts registry-packages-proxy-tls's private key/])
  const selfSignedLeaf = broken(withPeers, (m) => (cert(m, TLS_SECRET).spec.issuerRef.name = 'registry-packages-proxy-selfsigned'))
  t.match(checkPeerFillOn(selfSignedLeaf), [/not issued by a CA Issuer/])
  t.end()
})

void t.test('kubectl kustomize builds the same as the stand-in', (t) => {
  const built = kubectlBuild()
  if (!built) {
    t.comment('kubectl is not installed: the stand-in alone was checked')
    return t.end()
  }
  const byId = (objects: K8sObject[]): string[] => objects.map((o) => `${o.apiVersion} ${o.kind} ${o.metadata.namespace ?? ''}/${o.metadata.name}`).sort()
  const ours = withPeers.objects.map((o) => o.object).filter((o) => o.kind !== 'PrometheusRule')
  t.same(byId(built.filter((o) => o.kind !== 'PrometheusRule')), byId(ours), 'the same objects')
  const real = built.find((o) => o.kind === 'Deployment') as unknown as ReturnType<typeof deployment>
  const pod = (d: ReturnType<typeof deployment>) => ({
    volumes: d.spec.template.spec.volumes,
    containers: d.spec.template.spec.containers.map((c) => ({ name: c.name, args: c.args, volumeMounts: c.volumeMounts })),
  })
  t.same(pod(real), pod(deployment(withPeers)), 'the same patched pod: args, mounts, volumes')
  for (const o of built.filter((x) => x.apiVersion === 'cert-manager.io/v1')) {
    const mine = ours.find((x) => x.kind === o.kind && x.metadata.name === o.metadata.name)
    t.same(o, mine, `${o.kind} ${o.metadata.name} as written`)
  }
  t.end()
})

void t.test('the README turns peer fill on with the Component, and says it needs cert-manager', (t) => {
  const readme = readFileSync(join(ROOT, 'README.md'), 'utf8')
  const section = /\*\*Turning peer fill on in a cluster\.\*\*([\s\S]*?)(?=\n\*\*[A-Z])/.exec(readme)?.[1] ?? ''
  t.match(section, /cert-manager/)
  t.match(section, new RegExp(PEER_FILL))
  t.match(section, /kubectl apply -k infra\//)
  t.end()
})

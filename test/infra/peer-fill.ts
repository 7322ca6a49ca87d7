/**
 * Peer fill in infra/ (README, "Turning peer fill on in a cluster"): the cert-manager objects of
 * the opt-in Component, checked against cert-manager's v1 API (its CRDs' fields and enums; no
 * schema package for them is installed here), and the wiring from the Certificate's Secret to
 * the files the two containers' flags name. Each check returns problems, empty when all hold.
 */
import { posix } from 'node:path'
import { all, argValue, container, deployment, PROXY_CONTAINER, RBAC_PROXY_CONTAINER, type Container, type K8sObject, type Manifests, type Volume } from './manifests.js'

/** The DNS name every serving certificate carries (the Service's), as --peer-server-name says. */
export const PEER_SERVER_NAME = 'registry-packages-proxy.d8-cloud-instance-manager.svc'
export const TLS_SECRET = 'registry-packages-proxy-tls'

export interface IssuerRef {
  name: string
  kind?: string
  group?: string
}

export interface Certificate extends K8sObject {
  spec: {
    secretName: string
    issuerRef: IssuerRef
    isCA?: boolean
    commonName?: string
    dnsNames?: string[]
    duration?: string
    renewBefore?: string
    usages?: string[]
    privateKey?: { algorithm?: string; size?: number; rotationPolicy?: string; encoding?: string }
  }
}

export interface Issuer extends K8sObject {
  spec: { selfSigned?: object; ca?: { secretName: string }; [type: string]: unknown }
}

/** cert-manager.io/v1 CertificateSpec's fields. */
const CERTIFICATE_FIELDS = new Set([
  'additionalOutputFormats', 'commonName', 'dnsNames', 'duration', 'emailAddresses', 'encodeUsagesInRequest', 'ipAddresses', 'isCA', 'issuerRef', 'keystores', 'literalSubject',
  'nameConstraints', 'otherNames', 'privateKey', 'renewBefore', 'renewBeforePercentage', 'revisionHistoryLimit', 'secretName', 'secretTemplate', 'subject', 'uris', 'usages',
])
/** cert-manager's KeyUsage enum. */
const USAGES = new Set([
  'signing', 'digital signature', 'content commitment', 'key encipherment', 'key agreement', 'data encipherment', 'cert sign', 'crl sign', 'encipher only', 'decipher only',
  'any', 'server auth', 'client auth', 'code signing', 'email protection', 's/mime', 'ipsec end system', 'ipsec tunnel', 'ipsec user', 'timestamping', 'ocsp signing',
  'microsoft sgc', 'netscape sgc',
])
const ISSUER_TYPES = ['acme', 'ca', 'selfSigned', 'vault', 'venafi']
const GO_DURATION = /^(\d+(\.\d+)?(h|m|s|ms|us|µs|ns))+$/
const ECDSA_SIZES = new Set([256, 384, 521])

/** Issuers and Certificates as cert-manager.io/v1 would admit them. */
export function checkCertManagerShapes(m: Manifests): string[] {
  const problems: string[] = []
  for (const { file, object } of m.objects) {
    if (!object.apiVersion.startsWith('cert-manager.io/')) continue
    const id = `${file}: ${object.kind} ${object.metadata.name}`
    if (object.apiVersion !== 'cert-manager.io/v1') problems.push(`${id}: ${object.apiVersion} is not served by current cert-manager (v1)`)
    if (object.kind === 'Issuer' || object.kind === 'ClusterIssuer') {
      const spec = (object as Issuer).spec as Record<string, unknown> | undefined
      const types = Object.keys(spec ?? {}).filter((k) => ISSUER_TYPES.includes(k))
      if (types.length !== 1) problems.push(`${id}: needs exactly one issuer type of ${ISSUER_TYPES.join(', ')}, has ${types.join(', ') || 'none'}`)
      const ca = (object as Issuer).spec.ca
      if (ca && typeof ca.secretName !== 'string') problems.push(`${id}: ca.secretName is required`)
    } else if (object.kind === 'Certificate') {
      const spec = (object as Certificate).spec
      for (const key of Object.keys(spec)) if (!CERTIFICATE_FIELDS.has(key)) problems.push(`${id}: spec.${key} is not a Certificate field`)
      if (typeof spec.secretName !== 'string') problems.push(`${id}: spec.secretName is required`)
      if (typeof spec.issuerRef?.name !== 'string') problems.push(`${id}: spec.issuerRef.name is required`)
      if (spec.issuerRef?.kind !== undefined && !['Issuer', 'ClusterIssuer'].includes(spec.issuerRef.kind)) problems.push(`${id}: issuerRef.kind ${spec.issuerRef.kind}`)
      if (spec.issuerRef?.group !== undefined && spec.issuerRef.group !== 'cert-manager.io') problems.push(`${id}: issuerRef.group ${spec.issuerRef.group}`)
      for (const d of [spec.duration, spec.renewBefore]) if (d !== undefined && !GO_DURATION.test(d)) problems.push(`${id}: ${d} is not a Go duration`)
      for (const u of spec.usages ?? []) if (!USAGES.has(u)) problems.push(`${id}: usage "${u}" is not a cert-manager KeyUsage`)
      const key = spec.privateKey
      if (key?.algorithm !== undefined && !['RSA', 'ECDSA', 'Ed25519'].includes(key.algorithm)) problems.push(`${id}: privateKey.algorithm ${key.algorithm}`)
      if (key?.algorithm === 'ECDSA' && key.size !== undefined && !ECDSA_SIZES.has(key.size)) problems.push(`${id}: ECDSA size ${key.size}`)
      if (key?.rotationPolicy !== undefined && !['Never', 'Always'].includes(key.rotationPolicy)) problems.push(`${id}: privateKey.rotationPolicy ${key.rotationPolicy}`)
      if (!spec.isCA && (spec.dnsNames ?? []).length === 0 && spec.commonName === undefined) problems.push(`${id}: names nothing (no dnsNames, no commonName)`)
    } else problems.push(`${id}: an unexpected cert-manager kind`)
  }
  return problems
}

/** The volume and key a container's file comes from, through its mounts (longest mount first). */
export function fileSource(m: Manifests, c: Container, path: string): { volume: Volume; key: string; subPath: boolean } | undefined {
  const mounts = [...(c.volumeMounts ?? [])].sort((a, b) => b.mountPath.length - a.mountPath.length)
  const mount = mounts.find((v) => path.startsWith(`${posix.normalize(v.mountPath)}/`) || (v.subPath !== undefined && path === v.mountPath))
  const volume = deployment(m).spec.template.spec.volumes?.find((v) => v.name === mount?.name)
  if (!mount || !volume) return undefined
  const relative = mount.subPath ?? path.slice(posix.normalize(mount.mountPath).length + 1)
  const items = volume.secret?.items
  const key = items ? items.find((i) => i.path === relative)?.key : relative
  return key === undefined ? undefined : { volume, key, subPath: mount.subPath !== undefined }
}

/** Secrets the manifests make: Secret objects, and what cert-manager writes for each Certificate. */
function madeSecrets(m: Manifests): Set<string> {
  return new Set([...all(m, 'Secret').map((s) => s.metadata.name), ...all<Certificate>(m, 'Certificate').map((c) => c.spec.secretName)])
}

/** No pod waits for a Secret that nothing in the manifests makes (unless mounted optional). */
export function checkSecretVolumes(m: Manifests): string[] {
  const made = madeSecrets(m)
  return (deployment(m).spec.template.spec.volumes ?? [])
    .filter((v) => v.secret && !v.secret.optional && !made.has(v.secret.secretName))
    .map((v) => `volume ${v.name} mounts Secret ${v.secret?.secretName ?? ''}, which nothing in the manifests makes: the pod would wait for it`)
}

/** Peer fill is off: no peer flags on the proxy, kube-rbac-proxy on its own certificate. */
export function checkPeerFillOff(m: Manifests): string[] {
  const problems: string[] = []
  const proxy = container(m, PROXY_CONTAINER).args
  for (const flag of ['peers', 'peer-ca-file', 'peer-server-name']) if (argValue(proxy, flag) !== undefined) problems.push(`the proxy has --${flag}: peer fill is on`)
  if (argValue(container(m, RBAC_PROXY_CONTAINER).args, 'tls-cert-file') !== undefined) problems.push('kube-rbac-proxy serves a mounted certificate')
  return problems
}

/**
 * Peer fill is on and wired: --peer-ca-file is the `ca.crt` of the Secret a Certificate writes,
 * issued by a CA Issuer (which is what puts ca.crt there), mounted so renewals reach the file;
 * kube-rbac-proxy serves that Secret's tls.crt/tls.key; the certificate names
 * --peer-server-name; the proxy container gets no private key.
 */
export function checkPeerFillOn(m: Manifests): string[] {
  const problems: string[] = []
  const proxy = container(m, PROXY_CONTAINER)
  const rbac = container(m, RBAC_PROXY_CONTAINER)
  const caFile = argValue(proxy.args, 'peer-ca-file')
  const serverName = argValue(proxy.args, 'peer-server-name')
  if (caFile === undefined) return ['the proxy has no --peer-ca-file: peer fill is off']
  if (serverName !== PEER_SERVER_NAME) problems.push(`--peer-server-name is ${serverName}, not the Service's ${PEER_SERVER_NAME}`)
  const certs = all<Certificate>(m, 'Certificate')
  const issuers = all<Issuer>(m, 'Issuer')
  const from = (c: Container, path: string | undefined, key: string, what: string): string | undefined => {
    if (path === undefined) {
      problems.push(`${c.name}: ${what} is not set`)
      return undefined
    }
    const src = fileSource(m, c, path)
    if (!src?.volume.secret) problems.push(`${c.name}: ${what} ${path} is on no Secret volume`)
    else if (src.key !== key) problems.push(`${c.name}: ${what} ${path} is the Secret's ${src.key}, not ${key}`)
    else if (src.subPath) problems.push(`${c.name}: ${what} ${path} is mounted with subPath: the kubelet would never update it on renewal`)
    return src?.volume.secret?.secretName
  }
  const caSecret = from(proxy, caFile, 'ca.crt', '--peer-ca-file')
  const certSecret = from(rbac, argValue(rbac.args, 'tls-cert-file'), 'tls.crt', '--tls-cert-file')
  const keySecret = from(rbac, argValue(rbac.args, 'tls-private-key-file'), 'tls.key', '--tls-private-key-file')
  if (caSecret !== TLS_SECRET || certSecret !== TLS_SECRET || keySecret !== TLS_SECRET) {
    problems.push(`the CA (${caSecret}), certificate (${certSecret}) and key (${keySecret}) must all come from ${TLS_SECRET}`)
  }
  const serving = certs.find((c) => c.spec.secretName === TLS_SECRET)
  if (!serving) return [...problems, `no Certificate writes the Secret ${TLS_SECRET}`]
  if (serving.spec.isCA) problems.push(`Certificate ${serving.metadata.name} is a CA, not a serving certificate`)
  if (!serving.spec.dnsNames?.includes(PEER_SERVER_NAME)) problems.push(`Certificate ${serving.metadata.name} does not name ${PEER_SERVER_NAME} (--peer-server-name)`)
  if (serving.spec.usages && !serving.spec.usages.includes('server auth')) problems.push(`Certificate ${serving.metadata.name} lacks the "server auth" usage`)
  // ca.crt is written by a CA Issuer, whose own certificate is a cert-manager CA.
  const caIssuer = issuers.find((i) => i.metadata.name === serving.spec.issuerRef.name && i.metadata.namespace === serving.metadata.namespace)
  if (!caIssuer?.spec.ca) problems.push(`Certificate ${serving.metadata.name} is not issued by a CA Issuer in its namespace: its Secret would carry no ca.crt`)
  else {
    const ca = certs.find((c) => c.spec.secretName === caIssuer.spec.ca?.secretName && c.metadata.namespace === caIssuer.metadata.namespace)
    const root = issuers.find((i) => i.metadata.name === ca?.spec.issuerRef.name)
    if (!ca?.spec.isCA) problems.push(`Issuer ${caIssuer.metadata.name} signs with ${caIssuer.spec.ca.secretName}, which no CA Certificate makes`)
    else if (!root?.spec.selfSigned) problems.push(`the CA ${ca.metadata.name} is not issued by a self-signed Issuer in the manifests`)
  }
  for (const v of proxy.volumeMounts ?? []) {
    const volume = deployment(m).spec.template.spec.volumes?.find((x) => x.name === v.name)
    const keys = volume?.secret?.items?.map((i) => i.key)
    if (volume?.secret?.secretName === TLS_SECRET && (keys === undefined || keys.includes('tls.key'))) problems.push(`the proxy container mounts ${TLS_SECRET}'s private key`)
  }
  return problems
}

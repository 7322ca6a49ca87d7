import { rootCertificates } from 'node:tls'
import { inspect } from 'node:util'
import t from 'tap'
import { parseModuleSource, parseRegistrySecret, type ModuleSourceObject, type SecretObject } from '../../../plugins/credentials/kubernetes-parse.js'
import { SourceError } from '../../../plugins/credentials/source.js'
import { b64, moduleSource, registrySecret } from '../../fixtures/fake-kube-api.js'

const SECRET = 'Sup3r-Secret-Pw'
const CA = rootCertificates[0] ?? ''
const auths = (host: string, entry: unknown): string => JSON.stringify({ auths: { [host]: entry } })

function errorOf(fn: () => unknown): SourceError {
  try {
    fn()
  } catch (err) {
    if (err instanceof SourceError) return err
    throw err
  }
  throw new Error('expected a SourceError')
}

void t.test('the registry Secret: address/path, scheme, ca, .dockerconfigjson, all base64', (t) => {
  const secret = registrySecret({
    address: 'registry.deckhouse.io',
    path: '/deckhouse/ee',
    scheme: 'HTTPS',
    ca: CA,
    dockerconfigjson: auths('registry.deckhouse.io', { auth: b64(`license-token:${SECRET}`) }),
  }) as SecretObject
  const source = parseRegistrySecret(secret)
  t.match(source, {
    name: 'default',
    kind: 'default',
    repository: 'registry.deckhouse.io/deckhouse/ee',
    registry: 'registry.deckhouse.io',
    namePrefix: 'deckhouse/ee',
    scheme: 'https',
    ca: CA,
  })
  t.equal(source.credentials?.basicHeader(), `Basic ${b64(`license-token:${SECRET}`)}`)
  t.notMatch(JSON.stringify(source), SECRET, 'credentials redact themselves')
  t.notMatch(inspect(source), SECRET)

  const minimal = parseRegistrySecret(registrySecret({ address: '127.0.0.1:5000' }))
  t.match(minimal, { repository: '127.0.0.1:5000', namePrefix: '', scheme: 'https' })
  t.equal(minimal.credentials, undefined)
  t.equal(minimal.ca, undefined)

  // username/password instead of auth; a key with a scheme; values with a trailing newline.
  const fields = parseRegistrySecret({
    metadata: { name: 'deckhouse-registry', namespace: 'd8-system' },
    data: {
      address: b64('127.0.0.1:5000\n'),
      path: b64('deckhouse/ce\n'),
      scheme: b64('http'),
      '.dockerconfigjson': b64(auths('https://127.0.0.1:5000', { username: 'u', password: SECRET })),
    },
  })
  t.match(fields, { repository: '127.0.0.1:5000/deckhouse/ce', scheme: 'http' })
  t.equal(fields.credentials?.username, 'u')
  // No entry for the registry host: anonymous.
  t.equal(
    parseRegistrySecret(registrySecret({ address: 'a.io', dockerconfigjson: auths('b.io', { auth: b64('x:y') }) }) as SecretObject).credentials,
    undefined,
  )
  t.end()
})

void t.test('a malformed Secret: the error names the key, never the value', (t) => {
  const cases: Array<[string, SecretObject, RegExp]> = [
    ['no data', { metadata: { name: 'deckhouse-registry' } }, /Secret d8-system\/deckhouse-registry: has no data/],
    ['no address', registrySecret({ path: 'x' }), /data\.address is required/],
    ['address not base64', registrySecret({}, { address: `${SECRET}!` }), /data\.address is not valid base64/],
    ['bad host', registrySecret({ address: 'bad host' }), /data\.address\/path: "bad host" is not a registry host/],
    ['bad path', registrySecret({ address: 'r.io', path: 'a/../b' }), /is not a valid repository path/],
    ['bad scheme', registrySecret({ address: 'r.io', scheme: 'ftp' }), /scheme must be http or https/],
    ['ca not PEM', registrySecret({ address: 'r.io', ca: SECRET }), /data\.ca: ca holds no PEM certificate/],
    ['ca bad PEM', registrySecret({ address: 'r.io', ca: `-----BEGIN CERTIFICATE-----\n${b64(SECRET)}\n-----END CERTIFICATE-----` }), /does not parse/],
    [
      'dockerconfigjson not JSON',
      registrySecret({ address: 'r.io', dockerconfigjson: `{"auths": ${SECRET}` }),
      /data\.\.dockerconfigjson: docker config is not valid JSON/,
    ],
    [
      'dockerconfigjson not base64',
      registrySecret({ address: 'r.io' }, { '.dockerconfigjson': `%${SECRET}%` }),
      /data\.\.dockerconfigjson is not valid base64/,
    ],
    ['auth not base64', registrySecret({ address: 'r.io', dockerconfigjson: auths('r.io', { auth: `%${SECRET}` }) }), /"auth" is not valid base64/],
    ['auth without colon', registrySecret({ address: 'r.io', dockerconfigjson: auths('r.io', { auth: b64(SECRET) }) }), /not base64 of user:password/],
    ['value not a string', { metadata: { name: 'deckhouse-registry' }, data: { address: 42 as unknown as string } }, /data\.address must be a base64 string/],
  ]
  for (const [what, secret, message] of cases) {
    const err = errorOf(() => parseRegistrySecret(secret))
    t.match(err.message, message, what)
    t.notMatch(err.message, SECRET, `${what}: no secret in the message`)
    t.equal(err.code, 'ESOURCE')
  }
  t.end()
})

void t.test('a ModuleSource: spec.registry.{repo, dockerCfg, ca, scheme}', (t) => {
  const source = parseModuleSource(
    moduleSource('deckhouse-prod', {
      repo: 'registry.example.com/deckhouse/modules/',
      dockerCfg: b64(auths('registry.example.com', { auth: b64(`robot:${SECRET}`) })),
      ca: CA,
      scheme: 'HTTPS',
    }),
  )
  t.match(source, {
    name: 'deckhouse-prod',
    kind: 'module-source',
    repository: 'registry.example.com/deckhouse/modules',
    registry: 'registry.example.com',
    namePrefix: 'deckhouse/modules',
    scheme: 'https',
    ca: CA,
  })
  t.equal(source.credentials?.username, 'robot')
  t.notMatch(JSON.stringify(source), SECRET)

  const plain = parseModuleSource(moduleSource('m', { repo: '127.0.0.1:5000/m', scheme: 'http' }))
  t.match(plain, { repository: '127.0.0.1:5000/m', scheme: 'http' })
  t.equal(plain.credentials, undefined)
  t.end()
})

void t.test('a malformed ModuleSource: the error names it and the key, never the value', (t) => {
  const cases: Array<[string, ModuleSourceObject, RegExp]> = [
    ['no name', { spec: { registry: { repo: 'r.io/a' } } }, /ModuleSource without metadata\.name/],
    ['no spec', { metadata: { name: 'm' } }, /ModuleSource m: spec\.registry is missing/],
    ['no repo', moduleSource('m', {}), /spec\.registry\.repo is required/],
    ['repo not a string', moduleSource('m', { repo: 7 }), /spec\.registry\.repo is required/],
    ['repo with a scheme', moduleSource('m', { repo: 'https://r.io/a' }), /spec\.registry\.repo: "https:" is not a registry host/],
    ['dockerCfg not base64', moduleSource('m', { repo: 'r.io/a', dockerCfg: `%${SECRET}` }), /spec\.registry\.dockerCfg is not valid base64/],
    ['dockerCfg not JSON', moduleSource('m', { repo: 'r.io/a', dockerCfg: b64(`{${SECRET}`) }), /spec\.registry\.dockerCfg: docker config is not valid JSON/],
    ['dockerCfg not a string', moduleSource('m', { repo: 'r.io/a', dockerCfg: { auths: {} } }), /dockerCfg must be a base64 string/],
    [
      'ca bad PEM',
      moduleSource('m', { repo: 'r.io/a', ca: `-----BEGIN CERTIFICATE-----\n${b64(SECRET)}\n-----END CERTIFICATE-----` }),
      /spec\.registry\.ca: ca holds a certificate that does not parse/,
    ],
    ['scheme', moduleSource('m', { repo: 'r.io/a', scheme: 'ftp' }), /ModuleSource m: spec\.registry: scheme must be http or https/],
  ]
  for (const [what, obj, message] of cases) {
    const err = errorOf(() => parseModuleSource(obj))
    t.match(err.message, message, what)
    t.notMatch(err.message, SECRET, `${what}: no secret in the message`)
  }
  t.end()
})

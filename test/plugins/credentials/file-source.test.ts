import { writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { rootCertificates } from 'node:tls'
import { inspect } from 'node:util'
import t from 'tap'
import { pino } from 'pino'
import { parseRegistryConfig } from '../../../plugins/credentials/file-source.js'
import { FileSourceWatcher } from '../../../plugins/credentials/file-watch.js'
import { SourceSet } from '../../../plugins/credentials/source-set.js'
import { Metrics } from '../../../plugins/metrics/metrics.js'
import { SourceError } from '../../../plugins/credentials/source.js'
import { createServer } from '../../../server.js'

const SECRET = 'Sup3r-Secret-Pw'
const b64 = (s: string): string => Buffer.from(s).toString('base64')
const dockerCfg = (host: string, entry: unknown): string => JSON.stringify({ auths: { [host]: entry } })
const CA = rootCertificates[0] ?? ''

/** Runs parseRegistryConfig and returns the SourceError it throws. */
function errorOf(doc: unknown): SourceError {
  try {
    parseRegistryConfig(doc, 'cfg.json')
  } catch (err) {
    if (err instanceof SourceError) return err
    throw err
  }
  throw new Error('expected a SourceError')
}

void t.test('loading --registry-config (FileSourceWatcher.load): file problems name the file', async (t) => {
  const metrics = new Metrics({ collectDefaults: false })
  const loadRegistryConfig = (path: string) => new FileSourceWatcher({ path, sources: new SourceSet(), metrics, log: pino({ level: 'silent' }) }).load()
  const dir = t.testdir({ 'bad.json': '{ "default": ', 'ok.json': JSON.stringify({ default: { address: 'r.io:5000', path: '/a/b/' } }) })
  const missing = join(dir, 'missing.json')
  await t.rejects(loadRegistryConfig(missing), { code: 'ESOURCE', message: new RegExp(`--registry-config ${missing}: cannot read \\(ENOENT\\)`) })
  await t.rejects(loadRegistryConfig(join(dir, 'bad.json')), { code: 'ESOURCE', message: /bad\.json: not valid JSON/ })
  const [source] = await loadRegistryConfig(join(dir, 'ok.json'))
  t.match(source, { name: 'default', kind: 'default', repository: 'r.io:5000/a/b', registry: 'r.io:5000', namePrefix: 'a/b', scheme: 'https' })
  t.equal(source?.credentials, undefined)
})

void t.test('a full config', (t) => {
  const sources = parseRegistryConfig(
    {
      default: {
        address: 'registry.example.com',
        path: 'deckhouse/ce',
        scheme: 'HTTP',
        ca: CA,
        dockerConfigJson: dockerCfg('registry.example.com', { auth: b64(`user:${SECRET}`) }),
      },
      moduleSources: [
        { name: 'one', repo: '127.0.0.1:5000/modules/one/', dockerCfg: b64(dockerCfg('https://127.0.0.1:5000/v1/', { username: 'u', password: SECRET })) },
        { name: 'two', repo: 'other.io', scheme: 'https', ca: null },
      ],
    },
    'cfg.json',
  )
  t.equal(sources.length, 3)
  const [def, one, two] = sources
  t.match(def, { kind: 'default', repository: 'registry.example.com/deckhouse/ce', scheme: 'http', ca: CA })
  t.equal(def?.credentials?.basicHeader(), `Basic ${b64(`user:${SECRET}`)}`)
  t.match(one, { kind: 'module-source', name: 'one', repository: '127.0.0.1:5000/modules/one', registry: '127.0.0.1:5000', namePrefix: 'modules/one' })
  t.equal(one?.credentials?.basicHeader(), `Basic ${b64(`u:${SECRET}`)}`, 'a docker config key with scheme and path matches by host')
  t.match(two, { repository: 'other.io', namePrefix: '', scheme: 'https' })
  t.equal(two?.ca, undefined)
  t.same(parseRegistryConfig({}, 'x'), [], 'an empty config has no sources')
  t.end()
})

void t.test('credentials never print', (t) => {
  const [def] = parseRegistryConfig({ default: { address: 'r.io', dockerConfigJson: dockerCfg('r.io', { username: 'u', password: SECRET }) } }, 'x')
  const creds = def?.credentials
  t.ok(creds)
  t.notMatch(JSON.stringify(def), SECRET)
  t.notMatch(inspect(def, { depth: 5 }), SECRET)
  t.notMatch(`${String(creds)}`, SECRET)
  t.equal(creds?.username, 'u')
  t.end()
})

void t.test('credentials for another registry are ignored', (t) => {
  const [def] = parseRegistryConfig({ default: { address: 'r.io', dockerConfigJson: dockerCfg('other.io', { auth: b64('u:p') }) } }, 'x')
  t.equal(def?.credentials, undefined)
  const [noAuths] = parseRegistryConfig({ default: { address: 'r.io', dockerConfigJson: '{}' } }, 'x')
  t.equal(noAuths?.credentials, undefined)
  const [empty] = parseRegistryConfig({ default: { address: 'r.io', dockerConfigJson: dockerCfg('r.io', {}) } }, 'x')
  t.equal(empty?.credentials, undefined, 'an entry without auth or username/password')
  t.end()
})

void t.test('every problem is a SourceError naming the key, never the secret', (t) => {
  const cases: Array<[string, unknown, RegExp]> = [
    ['root not an object', [], /cfg\.json must be an object/],
    ['unknown key', { default: { address: 'r.io' }, extra: SECRET }, /unknown key "extra"/],
    ['default not an object', { default: 'r.io' }, /default must be an object/],
    ['default.address missing', { default: { path: 'a' } }, /default\.address is required/],
    ['default.address not a string', { default: { address: 5 } }, /default\.address must be a string/],
    ['default.address not a host', { default: { address: 'http://r.io' } }, /default\.address\/path.*not a registry host/],
    ['default.path invalid', { default: { address: 'r.io', path: 'A/../b' } }, /default\.address\/path.*not a valid repository path/],
    ['default.scheme', { default: { address: 'r.io', scheme: 'ftp' } }, /default: scheme must be http or https/],
    ['default.scheme not a string', { default: { address: 'r.io', scheme: 1 } }, /default: scheme must be http or https/],
    ['default.ca not PEM', { default: { address: 'r.io', ca: 'not a certificate' } }, /default\.ca: ca holds no PEM certificate/],
    ['default.ca not a string', { default: { address: 'r.io', ca: 5 } }, /default\.ca: ca must be a PEM string/],
    [
      'default.ca garbage PEM',
      { default: { address: 'r.io', ca: '-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----' } },
      /default\.ca: ca holds a certificate that does not parse/,
    ],
    [
      'dockerConfigJson not JSON',
      { default: { address: 'r.io', dockerConfigJson: `{"auths": ${SECRET}` } },
      /default\.dockerConfigJson: docker config is not valid JSON/,
    ],
    ['dockerConfigJson not an object', { default: { address: 'r.io', dockerConfigJson: '"x"' } }, /docker config is not a JSON object/],
    ['auths not an object', { default: { address: 'r.io', dockerConfigJson: '{"auths": 5}' } }, /"auths" is not an object/],
    ['auth entry not an object', { default: { address: 'r.io', dockerConfigJson: dockerCfg('r.io', SECRET) } }, /entry for the registry is not an object/],
    [
      'auth not base64',
      { default: { address: 'r.io', dockerConfigJson: dockerCfg('r.io', { auth: `${SECRET}!*` }) } },
      /docker config "auth" is not valid base64/,
    ],
    [
      'auth without a colon',
      { default: { address: 'r.io', dockerConfigJson: dockerCfg('r.io', { auth: b64(SECRET) }) } },
      /"auth" is not base64 of user:password/,
    ],
    ['moduleSources not an array', { moduleSources: {} }, /moduleSources must be an array/],
    ['moduleSources entry not an object', { moduleSources: [1] }, /moduleSources\[0\] must be an object/],
    ['moduleSources name missing', { moduleSources: [{ repo: 'r.io/a' }] }, /moduleSources\[0\]\.name is required/],
    ['moduleSources repo missing', { moduleSources: [{ name: 'a' }] }, /moduleSources\[0\]\.repo is required/],
    ['moduleSources repo bad', { moduleSources: [{ name: 'a', repo: 'r.io/a//b' }] }, /moduleSources\[0\]\.repo: "a\/\/b" is not a valid repository path/],
    ['moduleSources scheme', { moduleSources: [{ name: 'a', repo: 'r.io/a', scheme: 'gopher' }] }, /moduleSources\[0\]: scheme must be http or https/],
    ['moduleSources ca', { moduleSources: [{ name: 'a', repo: 'r.io/a', ca: 'pem?' }] }, /moduleSources\[0\]\.ca: ca holds no PEM certificate/],
    [
      'dockerCfg not base64',
      { moduleSources: [{ name: 'a', repo: 'r.io/a', dockerCfg: `${SECRET}$$$` }] },
      /moduleSources\[0\]\.dockerCfg is not valid base64/,
    ],
    [
      'dockerCfg base64 of garbage',
      { moduleSources: [{ name: 'a', repo: 'r.io/a', dockerCfg: b64(`{${SECRET}`) }] },
      /moduleSources\[0\]\.dockerCfg: docker config is not valid JSON/,
    ],
    ['dockerCfg not a string', { moduleSources: [{ name: 'a', repo: 'r.io/a', dockerCfg: { auths: {} } }] }, /moduleSources\[0\]\.dockerCfg must be a string/],
    [
      'duplicate name',
      {
        moduleSources: [
          { name: 'a', repo: 'r.io/a' },
          { name: 'a', repo: 'r.io/b' },
        ],
      },
      /moduleSources\[1\]: duplicate name "a"/,
    ],
  ]
  for (const [name, doc, message] of cases) {
    const err = errorOf(doc)
    t.match(err.message, message, name)
    t.equal(err.code, 'ESOURCE')
    t.notMatch(err.message, SECRET, `${name}: no secret`)
    t.notMatch(err.message, b64(SECRET), `${name}: no encoded secret`)
  }
  t.end()
})

void t.test('a bad config file fails server start-up', async (t) => {
  const dir = t.testdir({ 'cfg.json': JSON.stringify({ default: { address: 'r.io', scheme: 'ftp' } }) })
  const options = {
    cacheDirectory: join(dir, 'cache'),
    limitBytes: 1000,
    registryConfig: join(dir, 'cfg.json'),
    logger: pino({ level: 'silent' }),
    env: {},
    collectDefaultMetrics: false,
  }
  const err = await createServer(options).catch((e: unknown) => e)
  t.type(err, SourceError, 'main prints it and exits 2')
  t.match(err, { message: /cfg\.json: default: scheme must be http or https/ })
  writeFileSync(join(dir, 'cfg.json'), JSON.stringify({ default: { address: 'r.io' } }))
  const proxy = await createServer(options)
  t.teardown(() => proxy.server.stop())
  t.equal(proxy.sources.all().length, 1, 'a fixed file starts')
})

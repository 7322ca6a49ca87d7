import { resolve } from 'node:path'
import t from 'tap'
import { ConfigError, DEFAULT_CACHE_DIRECTORY, FLAG_NAMES, envName, parseFlags, parseListenAddress } from '../../config/flags.js'

const CWD = '/srv/rpp'

void t.test('defaults', (t) => {
  t.same(parseFlags([], {}, CWD), {
    listenHost: '127.0.0.1',
    listenPort: 5080,
    cacheDirectory: resolve(CWD, DEFAULT_CACHE_DIRECTORY),
    cacheRetentionBytes: 2 ** 30,
    disableCache: false,
    scrubBytesPerSecond: 4 * 2 ** 20,
    logLevel: 'info',
    peers: [],
    peerTimeoutMs: 5000,
  })
  t.end()
})

void t.test('every flag, in both forms', (t) => {
  const argv = [
    '--listen-address=0.0.0.0:4219',
    '--cache-directory',
    '/cache',
    '--cache-retention-size=512Mi',
    '--disable-cache',
    '--scrub-rate=0',
    '--kubeconfig=kube.conf',
    '--registry-config',
    'cfg/registry.json',
    '--log-level=debug',
    '--peers',
    '10.0.0.1:4219',
    '--peer-timeout=1s',
  ]
  t.same(parseFlags(argv, {}, CWD), {
    peers: ['10.0.0.1:4219'],
    peerTimeoutMs: 1000,
    listenHost: '0.0.0.0',
    listenPort: 4219,
    cacheDirectory: '/cache',
    cacheRetentionBytes: 512 * 2 ** 20,
    disableCache: true,
    scrubBytesPerSecond: 0,
    kubeconfig: '/srv/rpp/kube.conf',
    registryConfig: '/srv/rpp/cfg/registry.json',
    logLevel: 'debug',
  })
  t.equal(parseFlags(['--disable-cache=false'], {}, CWD).disableCache, false)
  t.equal(parseFlags(['--disable-cache=1'], {}, CWD).disableCache, true)
  t.equal(parseFlags(['--disable-cache=no'], {}, CWD).disableCache, false)
  t.equal(parseFlags(['--cache-retention-size=1G'], {}, CWD).cacheRetentionBytes, 1e9)
  t.equal(parseFlags(['--cache-retention-size=1048576'], {}, CWD).cacheRetentionBytes, 1_048_576)
  for (const level of ['debug', 'info', 'warn', 'error']) t.equal(parseFlags([`--log-level=${level}`], {}, CWD).logLevel, level)
  t.end()
})

void t.test('every flag from its RPP_ environment variable', (t) => {
  t.same(FLAG_NAMES.map(envName), [
    'RPP_LISTEN_ADDRESS',
    'RPP_CACHE_DIRECTORY',
    'RPP_CACHE_RETENTION_SIZE',
    'RPP_DISABLE_CACHE',
    'RPP_SCRUB_RATE',
    'RPP_KUBECONFIG',
    'RPP_REGISTRY_CONFIG',
    'RPP_LOG_LEVEL',
    'RPP_BOOTSTRAP_LISTEN_ADDRESS',
    'RPP_CLUSTER_UUID',
    'RPP_PEERS',
    'RPP_PEER_TIMEOUT',
    'RPP_PEER_CA_FILE',
    'RPP_PEER_SERVER_NAME',
  ])
  const env = {
    RPP_LISTEN_ADDRESS: '[::1]:6000',
    RPP_CACHE_DIRECTORY: 'var/cache',
    RPP_CACHE_RETENTION_SIZE: '2Gi',
    RPP_DISABLE_CACHE: 'true',
    RPP_SCRUB_RATE: '16Mi',
    RPP_KUBECONFIG: '/etc/kube',
    RPP_REGISTRY_CONFIG: '/etc/registry.json',
    RPP_LOG_LEVEL: 'warn',
    RPP_PEERS: '10.0.0.1:4219, 10.0.0.2:4219,10.0.0.1:4219',
    RPP_PEER_TIMEOUT: '750ms',
  }
  t.same(parseFlags([], env, CWD), {
    peers: ['10.0.0.1:4219', '10.0.0.2:4219'],
    peerTimeoutMs: 750,
    listenHost: '::1',
    listenPort: 6000,
    cacheDirectory: '/srv/rpp/var/cache',
    cacheRetentionBytes: 2 * 2 ** 30,
    disableCache: true,
    scrubBytesPerSecond: 16 * 2 ** 20,
    kubeconfig: '/etc/kube',
    registryConfig: '/etc/registry.json',
    logLevel: 'warn',
  })
  t.equal(parseFlags([], { RPP_LOG_LEVEL: '' }, CWD).logLevel, 'info', 'an empty variable is unset')
  t.end()
})

void t.test('flags win over environment variables, which win over defaults', (t) => {
  const env = { RPP_LOG_LEVEL: 'warn', RPP_CACHE_RETENTION_SIZE: '2Gi', RPP_DISABLE_CACHE: 'true' }
  const flags = parseFlags(['--log-level=error', '--disable-cache=false'], env, CWD)
  t.equal(flags.logLevel, 'error')
  t.equal(flags.disableCache, false)
  t.equal(flags.cacheRetentionBytes, 2 * 2 ** 30, 'the env var still applies where no flag is given')
  t.equal(parseFlags(['--log-level=warn', '--log-level=debug'], {}, CWD).logLevel, 'debug', 'the last flag wins')
  t.equal(parseFlags(['--log-level', 'warn', '--disable-cache'], {}, CWD).logLevel, 'warn', 'a value may be the next argument')
  t.equal(parseFlags(['--log-level', 'warn', '--disable-cache'], {}, CWD).disableCache, true, 'a boolean flag alone is true')
  t.equal(
    parseFlags(['--cache-retention-size=1Gi'], { RPP_CACHE_RETENTION_SIZE: 'garbage' }, CWD).cacheRetentionBytes,
    2 ** 30,
    'a bad env var overridden by a good flag is fine',
  )
  t.end()
})

function configError(argv: string[], env: NodeJS.ProcessEnv = {}): ConfigError {
  try {
    parseFlags(argv, env, CWD)
  } catch (err) {
    if (err instanceof ConfigError) return err
    throw err
  }
  throw new Error('expected a ConfigError')
}

void t.test('errors name the flag', (t) => {
  const cases: Array<[string[], NodeJS.ProcessEnv, RegExp]> = [
    [['--listen'], {}, /unknown flag --listen \(known: --listen-address, --cache-directory/],
    [['--cache-dir=/x'], {}, /unknown flag --cache-dir/],
    [['--Log-Level=info'], {}, /unexpected argument "--Log-Level=info"/],
    [['serve'], {}, /unexpected argument "serve"/],
    [['-v'], {}, /unexpected argument "-v"/],
    [['--', '--log-level=info'], {}, /unexpected argument "--"/],
    [['-l', 'info'], {}, /unexpected argument "-l"/],
    [['--log-level'], {}, /--log-level needs a value/],
    [['--cache-retention-size=1GB'], {}, /--cache-retention-size: "1GB" is not a Kubernetes quantity/],
    [[], { RPP_CACHE_RETENTION_SIZE: 'lots' }, /--cache-retention-size: "lots"/],
    [['--cache-retention-size=9Ei'], {}, /--cache-retention-size: "9Ei" is too large/],
    [['--listen-address=5080'], {}, /--listen-address: "5080" is not host:port/],
    [['--listen-address=127.0.0.1:99999'], {}, /--listen-address: "127.0.0.1:99999"/],
    [['--listen-address=127.0.0.1:'], {}, /--listen-address/],
    [['--listen-address=::1:80'], {}, /--listen-address: "::1:80"/],
    [[], { RPP_LISTEN_ADDRESS: 'nowhere' }, /--listen-address: "nowhere"/],
    [['--log-level=trace'], {}, /--log-level: "trace" is not one of debug, info, warn, error/],
    [['--log-level=INFO'], {}, /--log-level: "INFO"/],
    [['--disable-cache=maybe'], {}, /--disable-cache: "maybe" is not a boolean/],
    [['--cache-directory='], {}, /--cache-directory must not be empty/],
  ]
  for (const [argv, env, message] of cases) {
    const err = configError(argv, env)
    t.match(err.message, message, argv.join(' ') || JSON.stringify(env))
    t.equal(err.code, 'ECONFIG')
    t.notMatch(err.message, /\n/, 'one line')
  }
  t.end()
})

void t.test('parseListenAddress', (t) => {
  t.same(parseListenAddress('127.0.0.1:5080'), { host: '127.0.0.1', port: 5080 })
  t.same(parseListenAddress(':5080'), { host: '0.0.0.0', port: 5080 }, 'an empty host listens everywhere')
  t.same(parseListenAddress('[::]:0'), { host: '::', port: 0 })
  t.same(parseListenAddress('localhost:65535'), { host: 'localhost', port: 65535 })
  t.throws(() => parseListenAddress('localhost:65536'), { code: 'ECONFIG' })
  t.throws(() => parseListenAddress('localhost:123456'), { code: 'ECONFIG' })
  t.throws(() => parseListenAddress('localhost'), { code: 'ECONFIG' })
  t.end()
})

void t.test('--bootstrap-listen-address needs --cluster-uuid, and the UUID must be one path segment', (t) => {
  t.notOk(parseFlags([], {}, '/').bootstrap, 'off by default')
  t.same(parseFlags(['--bootstrap-listen-address=0.0.0.0:4282', '--cluster-uuid=abc-123'], {}, '/').bootstrap, {
    host: '0.0.0.0',
    port: 4282,
    clusterUuid: 'abc-123',
  })
  t.same(
    parseFlags(['--bootstrap-listen-address=:4282'], { RPP_CLUSTER_UUID: 'u' }, '/').bootstrap,
    { host: '0.0.0.0', port: 4282, clusterUuid: 'u' },
    'the UUID from its env var',
  )
  t.throws(() => parseFlags(['--bootstrap-listen-address=0.0.0.0:4282'], {}, '/'), /--bootstrap-listen-address needs --cluster-uuid/)
  t.throws(() => parseFlags(['--bootstrap-listen-address=4282', '--cluster-uuid=u'], {}, '/'), /--bootstrap-listen-address: "4282" is not host:port/)
  t.throws(() => parseFlags(['--bootstrap-listen-address=:1', '--cluster-uuid=a/b'], {}, '/'), /--cluster-uuid must be one URL path segment/)
  t.end()
})

void t.test('--scrub-rate is a quantity of bytes per second; 0 turns the scrubber off', (t) => {
  t.equal(parseFlags(['--scrub-rate=1M'], {}, '/').scrubBytesPerSecond, 1e6)
  t.equal(parseFlags(['--scrub-rate=0'], {}, '/').scrubBytesPerSecond, 0)
  t.throws(() => parseFlags(['--scrub-rate=fast'], {}, '/'), { code: 'ECONFIG', message: /^--scrub-rate: / })
  t.end()
})

void t.test('--peer-ca-file and --peer-server-name: off by default; the name must be a DNS name', (t) => {
  const none = parseFlags([], {}, CWD)
  t.equal(none.peerCaFile, undefined)
  t.equal(none.peerServerName, undefined)
  const set = parseFlags(['--peer-ca-file=tls/ca.crt', '--peer-server-name=registry-packages-proxy.d8-cloud-instance-manager.svc'], {}, CWD)
  t.equal(set.peerCaFile, '/srv/rpp/tls/ca.crt', 'relative to the working directory')
  t.equal(set.peerServerName, 'registry-packages-proxy.d8-cloud-instance-manager.svc')
  t.equal(parseFlags([], { RPP_PEER_CA_FILE: '/ca.pem' }, CWD).peerCaFile, '/ca.pem', 'from its env var')
  for (const bad of ['10.0.0.1', 'a b', '-x.svc', 'x/y']) {
    t.throws(() => parseFlags([`--peer-server-name=${bad}`], {}, CWD), { name: 'ConfigError', message: /^--peer-server-name/ }, bad)
  }
  t.end()
})

void t.test('--peers and --peer-timeout: off by default; addresses a peer can reach, durations', (t) => {
  const none = parseFlags([], {}, CWD)
  t.same(none.peers, [], 'no peers unless given')
  t.equal(none.peerTimeoutMs, 5000)
  t.same(parseFlags(['--peers=127.0.0.1:5080,[::1]:5081', '--peer-timeout=2s'], {}, CWD), {
    ...parseFlags([], {}, CWD),
    peers: ['127.0.0.1:5080', '[::1]:5081'],
    peerTimeoutMs: 2000,
  })
  t.same(parseFlags(['--peers=proxy-0.proxy.svc:5080,10.0.0.255:5080'], {}, CWD).peers, ['proxy-0.proxy.svc:5080', '10.0.0.255:5080'], 'DNS names and IPs')
  // Hosts that are no address at all (an IPv4 part over 255, five parts, a space, a slash)
  // fail here, at start, instead of at the first request for a layer such a member owns.
  for (const bad of [
    '127.0.0.1',
    'host:99999',
    '0.0.0.0:5080',
    '127.0.0.1:0',
    '10.0.0.256:5080',
    '1.2.3.4.5:80',
    'a b:80',
    'a/b:80',
    '[zz]:80',
    ':80',
    '[::]:80',
  ]) {
    t.throws(() => parseFlags([`--peers=${bad}`], {}, CWD), { name: 'ConfigError', message: /^--peers: / }, bad)
  }
  for (const bad of ['5', '1m', '0s', '-1s']) {
    t.throws(() => parseFlags([`--peer-timeout=${bad}`], {}, CWD), { name: 'ConfigError', message: /^--peer-timeout/ }, bad)
  }
  t.end()
})

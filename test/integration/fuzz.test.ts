/**
 * Hostile input, property-based (fast-check, fixed seed, bounded runs): every endpoint's path,
 * method, query and headers, through `server.inject` and over raw sockets. For every input:
 * no 5xx, error bodies are JSON, a package body is always the right bytes (whole or the exact
 * range announced), an unknown repository causes no connection to the registry, no outbound
 * connection goes anywhere else at all (a canary forward proxy catches any), and no file
 * appears outside the cache directory's own layout.
 */
import { connect } from 'node:net'
import { join, relative, resolve } from 'node:path'
import fc from 'fast-check'
import t, { type Test } from 'tap'
import { parsePackageQuery } from '../../handlers/package-request.js'
import { BlobStore } from '../../plugins/packages/cache/blob-store.js'
import { FakeRegistry } from '../fixtures/fake-registry.js'
import { DEFAULT_PREFIX, MODULE_PREFIX, bytes, cacheTokenHeader, packageUrl } from '../fixtures/proxy-harness.js'
import { Canary, fuzzSeed, startProxy, tree, type Proxy } from '../fixtures/listening-proxy.js'
import { eventually } from '../fixtures/eventually.js'

const seed = fuzzSeed()
const RUNS = Number(process.env.FC_RUNS ?? 300)
t.comment(`fast-check seed ${seed}, ${RUNS} runs per property (FC_SEED / FC_RUNS to change)`)
const params = (runs = RUNS): fc.Parameters<unknown> => ({ seed, numRuns: runs, endOnFailure: true })

/** Files the cache directory may hold: the index, verified blobs, temp files of running fills. */
const CACHE_LAYOUT =
  /^(layout\.json|index\.sqlite(-wal|-shm|-journal)?|admin-token|blobs\/sha256\/[0-9a-f]{2}\/[0-9a-f]{64}|tmp\/[0-9]+-[0-9a-f]{12}\.partial)$/

const HEX = /^[0-9a-f]{64}$/

/** Pieces of hostile paths: traversal in every encoding, separators, NUL, broken escapes, routes. */
const NASTY = [
  '..',
  '.',
  '%2e%2e',
  '%2E%2E',
  '.%2e',
  '%2e.',
  '%2f',
  '%2F',
  '%5c',
  '\\',
  '..%2f',
  '..%5c',
  '..%252f',
  '%00',
  '%',
  '%zz',
  '%c0%ae%c0%ae',
  '\u2025',
  '\uff0e\uff0e',
  '~',
  'etc',
  'passwd',
  '',
  'package',
  'cache',
  'healthz',
  'readyz',
  'metrics',
  'blobs',
  'sha256',
  'index.sqlite',
  'tmp',
  '*',
  ';',
  '?',
  '#',
  '&',
  '=',
  ' ',
  '\t',
  '\r\n',
]

interface World {
  p: Proxy
  canary: Canary
  data: Buffer
  manifestDigest: string
  layerDigest: string
  moduleData: Buffer
  moduleDigest: string
  before: Map<string, number>
}

async function world(t: Test): Promise<World> {
  const canary = await Canary.start()
  t.teardown(() => canary.close())
  // Any connection to anything but the fake registry goes to the canary instead.
  const registry = await FakeRegistry.start()
  t.teardown(() => registry.close())
  const p = await startProxy(t, { registry, env: canary.env(registry.host) })
  const data = bytes(3000, 41)
  const image = p.registry.addImage(DEFAULT_PREFIX, [data])
  const moduleData = bytes(2000, 42)
  const moduleImage = p.registry.addImage(`${MODULE_PREFIX}/pkg`, [moduleData])
  const warm = await p.proxy.server.inject(packageUrl({ digest: image.manifestDigest }))
  t.equal(warm.statusCode, 200, 'the package is served before the fuzzing starts')
  await eventually(() => p.proxy.packages.index?.manifest(image.manifestDigest) !== undefined, 'the package is cached')
  return {
    p,
    canary,
    data,
    manifestDigest: image.manifestDigest,
    layerDigest: image.lastLayer.digest,
    moduleData,
    moduleDigest: moduleImage.manifestDigest,
    before: tree(p.dir),
  }
}

/** After a property: nothing outside the cache directory changed, and the cache has only its own files. */
async function assertContained(t: Test, w: World): Promise<void> {
  await eventually(() => w.p.proxy.packages.service.activeFills === 0, 'fills are over')
  const after = tree(w.p.dir)
  const outside = (m: Map<string, number>): string[] => [...m.keys()].filter((k) => !k.startsWith('cache/')).sort()
  t.same(outside(after), outside(w.before), 'no file appeared or vanished outside the cache directory')
  const strays = [...after.keys()].filter((k) => k.startsWith('cache/') && !CACHE_LAYOUT.test(k.slice('cache/'.length)))
  t.same(strays, [], 'every file in the cache directory is an index, blob or temp file, or the admin token')
  t.equal(w.canary.connections, 0, 'no outbound connection to anything but the configured registry')
  t.equal((await w.p.proxy.server.inject('/healthz')).statusCode, 200, 'still serving')
  const ok = await w.p.proxy.server.inject(packageUrl({ digest: w.manifestDigest }))
  t.equal(ok.statusCode, 200, 'the package is still served')
  t.ok(ok.rawPayload.equals(w.data), 'byte-exact')
}

/** Error responses are the contract's JSON shape (HEAD: the same headers, no body). */
function jsonError(status: number, contentType: unknown, payload: string, method = 'GET'): boolean {
  if (status < 400) return true
  if (method === 'HEAD') return payload === ''
  if (!String(contentType).startsWith('application/json')) return false
  const body = JSON.parse(payload) as { statusCode?: unknown; error?: unknown; message?: unknown }
  return body.statusCode === status && typeof body.error === 'string' && typeof body.message === 'string'
}

const hexDigest = fc.stringMatching(/^[0-9a-f]{64}$/).map((h) => `sha256:${h}`)

void t.test('any method and path: a 2xx/3xx/4xx with a JSON error body, never a 5xx', async (t) => {
  const w = await world(t)
  const segment = fc.oneof(
    { weight: 3, arbitrary: fc.constantFrom(...NASTY) },
    { weight: 2, arbitrary: fc.webSegment() },
    { weight: 1, arbitrary: fc.string({ maxLength: 12 }) },
    { weight: 1, arbitrary: fc.string({ unit: 'binary', maxLength: 6 }).map(encodeURIComponent) },
    { weight: 1, arbitrary: fc.constantFrom(w.manifestDigest, w.layerDigest, encodeURIComponent(w.layerDigest)) },
    { weight: 1, arbitrary: fc.nat({ max: 3000 }).map((n) => 'a'.repeat(n)) },
  )
  const method = fc.oneof({ weight: 3, arbitrary: fc.constantFrom('GET', 'HEAD') }, fc.constantFrom('POST', 'PUT', 'DELETE', 'PATCH', 'OPTIONS', 'TRACE'))
  // Half the paths start with a real route, so the handlers (not only the router) see the rest.
  const routes = ['/package', '/cache', `/cache/${w.layerDigest}`, `/cache/${w.manifestDigest}`, '/healthz', '/readyz', '/metrics', '']
  const path = fc.oneof(
    fc.tuple(fc.constantFrom(...routes), fc.array(segment, { maxLength: 2 })).map(([r, segs]) => [r, ...segs].join('/')),
    fc.constantFrom(...routes),
    fc.array(segment, { maxLength: 6 }).map((segs) => `/${segs.join('/')}`),
  )
  const value = fc.oneof(segment, fc.constantFrom(w.manifestDigest, w.layerDigest, '', 'lastAccess', 'asc', '10'))
  const query = fc.option(fc.array(fc.tuple(fc.constantFrom('digest', 'repository', 'path', 'sort', 'limit', 'order', 'x'), value), { maxLength: 4 }))
  const seen = new Map<number, number>()
  await fc.assert(
    fc.asyncProperty(method, path, query, async (m, pathname, q) => {
      const url = `${pathname.startsWith('/') ? '' : '/'}${pathname}${q ? `?${q.map(([k, v]) => `${k}=${v}`).join('&')}` : ''}`
      const res = await w.p.proxy.server.inject({ method: m, url })
      seen.set(res.statusCode, (seen.get(res.statusCode) ?? 0) + 1)
      return res.statusCode < 500 && jsonError(res.statusCode, res.headers['content-type'], res.payload, m)
    }),
    params(),
  )
  t.comment(`statuses seen: ${JSON.stringify(Object.fromEntries(seen))}`)
  t.pass('no input produced a 5xx or a non-JSON error')
  await assertContained(t, w)
})

void t.test('any /package query: 200/400/404 only; an unknown repository reaches no registry at all', async (t) => {
  const w = await world(t)
  const { p } = w
  const repos = [p.defaultRepository, p.moduleRepository]
  const digest = fc.oneof(
    { weight: 4, arbitrary: fc.constantFrom(w.manifestDigest, w.moduleDigest, w.layerDigest) },
    { weight: 2, arbitrary: hexDigest },
    fc.constantFrom(
      w.manifestDigest.toUpperCase(),
      w.manifestDigest.replace('sha256', 'sha512'),
      `${w.manifestDigest} `,
      `${w.manifestDigest}\u0000`,
      w.manifestDigest.slice(0, -1),
    ),
    fc.string({ maxLength: 80 }),
  )
  const host = p.registry.host
  const repository = fc.oneof(
    {
      weight: 8,
      arbitrary: fc.constantFrom(
        ...repos,
        `${p.defaultRepository}/`,
        `${p.moduleRepository}//`,
        '',
        host,
        // Near misses of the default's bare-host alias and of the sources: all unknown.
        host.split(':')[0] ?? '',
        `${host}/deckhouse`,
        `${p.moduleRepository}/sub`,
        `localhost:${host.split(':')[1]}/${DEFAULT_PREFIX}`,
        `127.0.0.1:${w.canary.port}/${DEFAULT_PREFIX}`,
        '169.254.169.254/latest/meta-data',
        'metadata.google.internal/computeMetadata/v1',
        'evil.example.com/deckhouse/ce',
        `${host}/${DEFAULT_PREFIX}/../../etc`,
        `${host}/${DEFAULT_PREFIX.toUpperCase()}`,
        `http://${host}/${DEFAULT_PREFIX}`,
        `user:pass@${host}/${DEFAULT_PREFIX}`,
        `[::1]:${host.split(':')[1]}/${DEFAULT_PREFIX}`,
        `${host}:80/${DEFAULT_PREFIX}`,
        `${host}/${DEFAULT_PREFIX}?x=1`,
        `${host}/${DEFAULT_PREFIX}#x`,
      ),
    },
    fc.tuple(fc.constantFrom(...repos), fc.constantFrom(...NASTY)).map(([r, n]) => `${r}/${n}`),
    fc.string({ maxLength: 40 }),
  )
  const path = fc.oneof(
    { weight: 8, arbitrary: fc.constantFrom('pkg', 'pkg', 'a/b', 'a-b/c_d', 'x.y') },
    fc.constantFrom('pkg', 'a/b', '..', '../pkg', 'pkg/..', 'a//b', '/pkg', 'pkg/', 'PKG', '%2e%2e', 'a\\b', 'x'.repeat(300)),
    fc.array(fc.constantFrom(...NASTY, 'pkg', 'a-b', 'a_b', 'a.b'), { minLength: 1, maxLength: 4 }).map((s) => s.join('/')),
    fc.string({ maxLength: 30 }),
  )
  // A query is a digest, a repository and a path, each usually present, then rarer extras:
  // repeated keys, keys in other spellings, prototype names.
  const extra = fc.oneof(
    fc.tuple(fc.constantFrom('digest', 'repository', 'path'), fc.oneof(digest, repository, path)),
    fc.tuple(fc.constantFrom('Digest', 'digest[]', 'DIGEST', 'repository[]', '__proto__', 'constructor'), fc.string({ maxLength: 10 })),
  )
  const pairsArb = fc
    .tuple(fc.option(digest, { freq: 8 }), fc.option(repository, { freq: 5 }), fc.option(path, { freq: 3 }), fc.array(extra, { maxLength: 1 }))
    .map(([d, r, pa, more]) => [
      ...(d === null ? [] : [['digest', d] as [string, string]]),
      ...(r === null ? [] : [['repository', r] as [string, string]]),
      ...(pa === null ? [] : [['path', pa] as [string, string]]),
      ...more,
    ])
  let unknownRefused = 0
  const layers = new Map([
    [w.manifestDigest, w.data],
    [w.moduleDigest, w.moduleData],
  ])
  const seen = new Map<number, number>()
  await fc.assert(
    fc.asyncProperty(pairsArb, fc.boolean(), async (pairs, encode) => {
      const query = pairs.map(([k, v]) => `${encodeURIComponent(k)}=${encode ? encodeURIComponent(v) : v.replace(/[&#\s%]/g, encodeURIComponent)}`).join('&')
      const before = p.registry.counts.total
      const res = await p.proxy.server.inject(`/package?${query}`)
      seen.set(res.statusCode, (seen.get(res.statusCode) ?? 0) + 1)
      if (![200, 400, 404].includes(res.statusCode)) return false
      if (!jsonError(res.statusCode, res.headers['content-type'], res.payload)) return false
      // What the server parsed: hapi reads the URL with WHATWG URL semantics (which, for one,
      // strips trailing control characters from the whole URL).
      const parsed = new URL(`http://127.0.0.1/package?${query}`).searchParams
      const given = parsed.getAll('repository')
      // Known: a source's repository, or the default's bare registry host (README, "HTTP API"), with or
      // without a trailing slash.
      const known = given.length === 0 || (given.length === 1 && (given[0] === '' || [...repos, host].includes((given[0] ?? '').replace(/\/+$/, ''))))
      if (!known && p.registry.counts.total !== before) return false
      if (!known && res.statusCode === 404) unknownRefused++
      if (res.statusCode === 200) {
        const expected = layers.get(parsed.get('digest') ?? '')
        return expected !== undefined && res.rawPayload.equals(expected)
      }
      return true
    }),
    params(),
  )
  t.comment(`statuses seen: ${JSON.stringify(Object.fromEntries(seen))}`)
  t.pass('only 200/400/404; unknown repositories never reached the registry; 200s were byte-exact')
  // Not vacuous: many well-formed but unknown repositories got as far as the source lookup.
  t.ok(unknownRefused >= 30, `${unknownRefused} well-formed unknown repositories were refused with 404`)
  await assertContained(t, w)
})

void t.test('any Range, If-None-Match, If-Range and other headers: the bytes are always the right ones', async (t) => {
  const w = await world(t)
  const { p, data } = w
  const size = data.length
  const etag = `"${w.manifestDigest}"`
  const position = fc.oneof(fc.nat({ max: size + 10 }), fc.constantFrom(0, size - 1, size, size + 1, 2 ** 53, 1e30))
  const range = fc.oneof(
    fc.tuple(position, position).map(([a, b]) => `bytes=${a}-${b}`),
    position.map((a) => `bytes=${a}-`),
    position.map((n) => `bytes=-${n}`),
    fc.tuple(position, position, position).map(([a, b, c]) => `bytes=${a}-${b},${c}-`),
    fc.constantFrom('bytes=', 'bytes=-', 'bytes=--1', 'bytes=1-2-3', 'items=0-1', 'bytes = 0 - 5', 'bytes=0x10-', 'bytes=-0', 'bytes=\u0000'),
    fc.string({ maxLength: 20 }),
  )
  const ifNoneMatch = fc.oneof(fc.constantFrom(etag, `W/${etag}`, '*', `"x", ${etag}`, '"x"', w.manifestDigest, '', ',,,'), fc.string({ maxLength: 20 }))
  const ifRange = fc.oneof(fc.constantFrom(etag, `W/${etag}`, '"other"', 'Tue, 01 Jan 2030 00:00:00 GMT'), fc.string({ maxLength: 20 }))
  const visible = fc.string({ unit: fc.integer({ min: 0x20, max: 0x7e }).map((c) => String.fromCharCode(c)), maxLength: 40 })
  const token = fc.stringMatching(/^[a-z][a-z0-9-]{0,15}$/)
  const headers = fc.record(
    {
      range,
      'if-none-match': ifNoneMatch,
      'if-range': ifRange,
      accept: fc.oneof(fc.constantFrom('*/*', 'application/json', 'text/html', ''), visible),
      'accept-encoding': fc.constantFrom('gzip', 'br', 'deflate, gzip;q=0.5', 'identity', '*', ''),
      extra: fc.tuple(token, visible),
    },
    { requiredKeys: [] },
  )
  const seen = new Map<number, number>()
  await fc.assert(
    fc.asyncProperty(headers, fc.boolean(), async (h, evictFirst) => {
      // Half the runs start from a miss, so the fill's path sees the same headers.
      if (evictFirst) await p.proxy.server.inject({ method: 'DELETE', url: `/cache/${w.layerDigest}`, headers: cacheTokenHeader(p.cacheDirectory) })
      const { extra, ...named } = h
      const sent: Record<string, string> = { ...named }
      if (extra && !['host', 'content-length', 'transfer-encoding', 'connection'].includes(extra[0])) sent[extra[0]] = extra[1]
      const res = await p.proxy.server.inject({ url: packageUrl({ digest: w.manifestDigest }), headers: sent })
      seen.set(res.statusCode, (seen.get(res.statusCode) ?? 0) + 1)
      const body = res.rawPayload
      switch (res.statusCode) {
        case 200:
          return body.equals(data) && res.headers['content-length'] === String(size) && res.headers.etag === etag
        case 206: {
          const m = /^bytes (\d+)-(\d+)\/(\d+)$/.exec(String(res.headers['content-range']))
          if (!m || sent.range === undefined) return false
          const [s, e, total] = [Number(m[1]), Number(m[2]), Number(m[3])]
          return total === size && s <= e && e < size && body.equals(data.subarray(s, e + 1)) && res.headers['content-length'] === String(e - s + 1)
        }
        case 304:
          return sent['if-none-match'] !== undefined && body.length === 0
        case 416:
          return sent.range !== undefined && res.headers['content-range'] === `bytes */${size}` && jsonError(416, res.headers['content-type'], res.payload)
        default:
          return false
      }
    }),
    params(),
  )
  t.comment(`statuses seen: ${JSON.stringify(Object.fromEntries(seen))}`)
  t.pass('every 200 was the whole layer, every 206 exactly the announced range')
  await assertContained(t, w)
})

void t.test('the cache API under any digest, sort, order and limit: 200/400/404, and only exact digests delete', async (t) => {
  const w = await world(t)
  const { p } = w
  const digest = fc.oneof(
    fc.constantFrom(w.layerDigest, w.manifestDigest, w.layerDigest.toUpperCase(), w.layerDigest.slice(7), `${w.layerDigest}/..`, `..%2f${w.layerDigest}`),
    hexDigest,
    fc.constantFrom(...NASTY),
    fc.string({ maxLength: 70 }).map(encodeURIComponent),
  )
  const listQuery = fc.record(
    {
      sort: fc.oneof(
        fc.constantFrom('lastAccess', 'size', 'hits', 'createdAt', 'digest', '__proto__', 'constructor', 'toString'),
        fc.string({ maxLength: 10 }),
      ),
      order: fc.oneof(fc.constantFrom('asc', 'desc', 'ASC', ''), fc.string({ maxLength: 5 })),
      limit: fc.oneof(fc.integer({ min: -5, max: 200_000 }).map(String), fc.constantFrom('1e3', '0x10', 'NaN', 'Infinity', '1.5', '', ' 1')),
    },
    { requiredKeys: [] },
  )
  const op = fc.oneof(
    fc.tuple(fc.constantFrom('GET', 'DELETE'), digest).map(([m, d]) => ({ method: m, url: `/cache/${d}`, target: d })),
    listQuery.map((q) => ({ method: 'GET', url: `/cache?${new URLSearchParams(q).toString()}`, target: undefined })),
  )
  await fc.assert(
    fc.asyncProperty(op, async ({ method, url, target }) => {
      const cachedBefore = p.proxy.packages.index?.blob(w.layerDigest) !== undefined
      const res = await p.proxy.server.inject({ method, url, headers: cacheTokenHeader(p.cacheDirectory) })
      if (![200, 400, 404].includes(res.statusCode) || !jsonError(res.statusCode, res.headers['content-type'], res.payload)) return false
      const cachedAfter = p.proxy.packages.index?.blob(w.layerDigest) !== undefined
      const exact = target === w.layerDigest || target === w.manifestDigest
      // Only a DELETE naming the entry exactly (by layer or manifest digest) removes it.
      if (cachedBefore && !cachedAfter && !(method === 'DELETE' && exact)) return false
      if (method === 'DELETE' && exact && res.statusCode === 200) {
        // Put it back for the next run.
        const again = await p.proxy.server.inject(packageUrl({ digest: w.manifestDigest }))
        if (again.statusCode !== 200) return false
        await eventually(() => p.proxy.packages.index?.blob(w.layerDigest) !== undefined, 'cached again')
      }
      if (res.statusCode === 200 && method === 'GET' && target === undefined) {
        const body = JSON.parse(res.payload) as { items?: Array<{ digest: string }> }
        return Array.isArray(body.items) && body.items.every((i) => /^sha256:[0-9a-f]{64}$/.test(i.digest))
      }
      return true
    }),
    params(200),
  )
  t.pass('the cache API answered every input within its contract')
  await assertContained(t, w)
})

/** Sends raw bytes, resolves with what came back before the server closed or `waitMs` passed. */
function rawExchange(port: number, payload: string, waitMs: number): Promise<{ text: string; closed: boolean }> {
  return new Promise((resolve) => {
    const socket = connect(port, '127.0.0.1')
    let text = ''
    let done = false
    const finish = (closed: boolean): void => {
      if (done) return
      done = true
      clearTimeout(timer)
      socket.destroy()
      resolve({ text, closed })
    }
    const timer = setTimeout(() => finish(false), waitMs)
    socket.on('connect', () => socket.write(payload, 'latin1'))
    socket.on('data', (d: Buffer) => {
      text += d.toString('latin1')
      // The status line is all this property needs.
      if (text.includes('\r\n')) finish(false)
    })
    socket.on('error', () => finish(true))
    socket.on('close', () => finish(true))
  })
}

void t.test('raw request heads over a socket: smuggling, absolute URIs, CONNECT, bad framing: no 5xx, no outbound connection', async (t) => {
  const w = await world(t)
  const { p, canary } = w
  await p.proxy.server.start()
  const port = Number(p.proxy.server.info.port)
  const pkg = packageUrl({ digest: w.manifestDigest })
  // Weighted towards heads a parser accepts, so the router and handlers see them too.
  const method = fc.oneof(
    { weight: 4, arbitrary: fc.constantFrom('GET', 'HEAD') },
    { weight: 2, arbitrary: fc.constantFrom('POST', 'CONNECT', 'OPTIONS', 'TRACE', 'DELETE', 'PUT') },
    { weight: 1, arbitrary: fc.constantFrom('PRI', 'get', 'G\tET', 'GET GET', '\u00ff') },
  )
  const target = fc.oneof(
    fc.constantFrom(
      pkg,
      '/healthz',
      `/cache/${w.layerDigest}`,
      `http://127.0.0.1:${canary.port}${pkg}`,
      `127.0.0.1:${canary.port}`,
      `//127.0.0.1:${canary.port}/x`,
      'http://169.254.169.254/latest/meta-data/',
      '*',
      '',
      '/../../../../etc/passwd',
      '/%2e%2e/%2e%2e/etc/passwd',
      `/package?digest=${w.manifestDigest}&repository=127.0.0.1:${canary.port}/x`,
    ),
    fc.webPath(),
  )
  const version = fc.oneof(
    { weight: 6, arbitrary: fc.constantFrom('HTTP/1.1', 'HTTP/1.0') },
    { weight: 1, arbitrary: fc.constantFrom('HTTP/2.0', 'HTTP/1.1x', 'HTTP/0.9', '') },
  )
  const header = fc.oneof(
    {
      weight: 6,
      arbitrary: fc.constantFrom(
        'Accept: */*',
        'Connection: close',
        'Connection: keep-alive',
        'Range: bytes=0-10',
        'If-None-Match: *',
        'Accept-Encoding: gzip',
      ),
    },
    fc.constantFrom(
      'Host: 127.0.0.1',
      `Host: 127.0.0.1:${canary.port}`,
      'Host: a\r\nHost: b',
      'Content-Length: 5',
      'Content-Length: -1',
      'Content-Length: 1, 2',
      'Content-Length: 99999999999999999999',
      'Content-Length: 0\r\nContent-Length: 3',
      'Transfer-Encoding: chunked',
      'Transfer-Encoding: chunked\r\nContent-Length: 3',
      'Transfer-Encoding: xchunked',
      'Transfer-Encoding: chunked, identity',
      'Expect: 100-continue',
      'Connection: Upgrade\r\nUpgrade: websocket',
      'Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA',
      'X-Folded: a\r\n b',
      'Bad Header: x',
      'X-Nul: a\u0000b',
      ': empty-name',
      `Range: bytes=0-10`,
      'X-Forwarded-Host: evil.example.com',
    ),
    fc.tuple(fc.stringMatching(/^[A-Za-z-]{1,12}$/), fc.string({ unit: 'binary-ascii', maxLength: 30 })).map(([n, v]) => `${n}: ${v.replace(/[\r\n]/g, '')}`),
  )
  const body = fc.oneof(
    { weight: 4, arbitrary: fc.constant('') },
    fc.constantFrom('abc', '0\r\n\r\n', '3\r\nabc\r\n0\r\n\r\n', `GET ${pkg} HTTP/1.1\r\nHost: x\r\n\r\n`),
  )
  const allowed = new Set([200, 204, 206, 304, 400, 404, 405, 408, 413, 414, 416, 431, 501, 505])
  const seen = new Map<string, number>()
  await fc.assert(
    fc.asyncProperty(
      method,
      target,
      version,
      fc.array(header, { maxLength: 3 }),
      body,
      fc.double({ min: 0, max: 1, noNaN: true }),
      async (m, tgt, v, extra, b, r) => {
        // HTTP/1.1 requires Host: most heads carry one, so they reach the router.
        const hs = r < 0.8 ? ['Host: 127.0.0.1', ...extra] : extra
        const head = `${m} ${tgt} ${v}\r\n${hs.join('\r\n')}${hs.length ? '\r\n' : ''}\r\n${b}`
        const reply = await rawExchange(port, head, 300)
        const status = /^HTTP\/1\.[01] (\d{3}) /.exec(reply.text)?.[1]
        const key = status ?? (reply.closed ? 'closed' : 'waiting')
        seen.set(key, (seen.get(key) ?? 0) + 1)
        // No answer (the server closed, or is waiting for bytes the head promised) is fine; a
        // 5xx never is (501/505 are Node's words for a method or version it does not speak).
        return status === undefined ? reply.text === '' : allowed.has(Number(status))
      },
    ),
    params(150),
  )
  t.comment(`outcomes seen: ${JSON.stringify(Object.fromEntries(seen))}`)
  t.pass('every raw request got a non-5xx answer or none')
  await assertContained(t, w)
})

void t.test('request parsing admits no traversal, and the blob store builds no path outside its directory', (t) => {
  const store = new BlobStore(join(t.testdir(), 'cache'))
  const component = fc.oneof(fc.constantFrom(...NASTY), fc.stringMatching(/^[a-z0-9._-]{1,8}$/), fc.string({ maxLength: 6 }))
  const name = fc.array(component, { minLength: 1, maxLength: 5 }).map((c) => c.join('/'))
  fc.assert(
    fc.property(
      fc.oneof(
        hexDigest,
        fc.string({ maxLength: 80 }),
        name.map((n) => `sha256:${n}`),
      ),
      name,
      name,
      (digest, repository, path) => {
        try {
          const q = parsePackageQuery({ digest, repository: `127.0.0.1:5000/${repository}`, path })
          // Accepted: every segment is a plain OCI name component.
          const segments = [...(q.repository?.split('/').slice(1) ?? []), ...(q.path?.split('/') ?? [])]
          if (segments.some((s) => s === '' || s === '.' || s === '..' || !/^[a-z0-9]+(?:[._-]+[a-z0-9]+)*$/.test(s))) return false
        } catch (err) {
          if ((err as { status?: number }).status !== 400) return false
        }
        try {
          const file = store.pathFor(digest)
          const rel = relative(store.blobsDir, resolve(file))
          return HEX.test(digest.slice(7)) && !rel.startsWith('..') && /^[0-9a-f]{2}\/[0-9a-f]{64}$/.test(rel)
        } catch {
          return !/^sha256:[0-9a-f]{64}$/.test(digest)
        }
      },
    ),
    params(2000),
  )
  t.pass('2000 inputs: accepted names are plain components; blob paths stay in blobs/sha256/<2>/<64>')
  t.end()
})

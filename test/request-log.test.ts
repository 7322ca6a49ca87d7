/**
 * The request line written past pino (request-log.ts) is byte for byte the line pino writes for
 * the same fields through the process's own logger (logger.ts), whatever the facts: hapi's
 * requests and the fast path's hits, cut-off bodies, errors, repeated query parameters, strings
 * that need escaping; and at the level pino would choose, or not at all.
 */
import t from 'tap'
import type { Test } from 'tap'
import fc from 'fast-check'
import type { Logger } from 'pino'
import { pino } from 'pino'
import { createLogger } from '../logger.js'
import { RequestLog, type RequestFacts } from '../request-log.js'

/** A logger whose lines are kept, as written. */
function kept(level: string, make: (level: string, sink: { write(s: string): void }) => Logger = createLogger): { log: Logger; lines: string[] } {
  const lines: string[] = []
  return { log: make(level, { write: (s: string) => void lines.push(s) }), lines }
}

/** The reference: the fields as an object, logged through pino (what request-log.ts did before). */
function throughPino(log: Logger, f: RequestFacts): void {
  const aborted = f.bytes === undefined
  const line = {
    req: f.id,
    method: f.method,
    path: f.path,
    status: f.status,
    ...(aborted ? { aborted: true, sentStatus: f.sentStatus } : { bytes: f.bytes }),
    ms: f.ms,
    ...(f.pkg
      ? {
          digest: f.pkg.digest,
          repository: f.pkg.repository,
          source: f.pkg.source,
          pkgPath: f.pkg.path,
          result: f.result,
          ...(f.pkg.peer ? { peer: f.pkg.peer } : {}),
        }
      : {}),
    ...(f.route ? { route: f.route, result: f.result } : {}),
    ...(f.err ? { err: f.err } : {}),
  }
  if (['/healthz', '/readyz', '/metrics'].includes(f.path)) log.debug(line, 'request')
  else if (f.status >= 500 || aborted) log.warn(line, 'request')
  else log.info(line, 'request')
}

/** True when a string anywhere in `v` has a surrogate without its pair. */
const hasLoneSurrogate = (v: unknown): boolean =>
  typeof v === 'string' ? /[\ud800-\udfff]/u.test(v) : typeof v === 'object' && v !== null ? Object.values(v).some(hasLoneSurrogate) : false

/** Lines with their times made equal (the two are written microseconds apart). */
const sameTime = (lines: string[]): string[] => lines.map((l) => l.replace(/"time":\d+/, '"time":0'))

function compare(t: Test, f: RequestFacts, level = 'debug', make?: (level: string, sink: { write(s: string): void }) => Logger): void {
  const ours = kept(level, make)
  const theirs = kept(level, make)
  new RequestLog(ours.log).write(f)
  throughPino(theirs.log, f)
  t.same(sameTime(ours.lines), sameTime(theirs.lines), `${f.method} ${f.path} ${f.status} at ${level}`)
}

const DIGEST = `sha256:${'ab'.repeat(32)}`
const hit: RequestFacts = {
  id: 'fast:1:1',
  method: 'get',
  path: '/package',
  status: 200,
  bytes: 65536,
  sentStatus: 200,
  ms: 0,
  pkg: { digest: DIGEST, repository: undefined, source: 'default', path: 'pkg/a' },
  result: 'hit',
}

void t.test('the cases the proxy writes, line for line', (t) => {
  const cases: RequestFacts[] = [
    hit,
    { ...hit, pkg: { digest: DIGEST, repository: 'registry.example:5000/a/b', source: 'module-x', path: undefined, peer: 'peer-1' }, result: 'peer' },
    { ...hit, status: 499, bytes: undefined },
    {
      ...hit,
      status: 500,
      bytes: undefined,
      sentStatus: 200,
      ms: undefined,
      err: { type: 'DigestMismatchError', code: 'EDIGEST', message: 'layer "x" \\ did not match' },
    },
    { ...hit, pkg: { digest: ['a', 'b'], repository: 'x"y', source: undefined, path: 'é/ü/\u0001' }, status: 400, result: 'error' },
    { id: 'q1', method: 'get', path: '/healthz', status: 200, bytes: 2, ms: 1 },
    { id: 'q2', method: 'get', path: '/metrics', status: 503, bytes: 10, ms: 1 },
    { id: 'q3', method: 'get', path: '/v1/images/{name}', route: '/v1/images/{name}', status: 404, bytes: 90, ms: 3, result: 'error' },
    { id: 'q4', method: 'delete', path: '/cache', status: 204, bytes: 0, ms: 12 },
  ]
  for (const level of ['debug', 'info', 'warn', 'error', 'silent']) for (const f of cases) compare(t, f, level)
  // Any pino logger, not only ours: the default one (pid and hostname bindings), and a child.
  for (const f of cases) {
    compare(t, f, 'debug', (level, sink) => pino({ level, serializers: { err: (e: unknown) => e } }, sink))
    compare(t, f, 'info', (level, sink) => createLogger(level, sink).child({ component: 'x' }))
  }
  t.end()
})

void t.test('any facts: the same bytes as pino writes, and valid JSON', (t) => {
  const text = fc.oneof(fc.string(), fc.string({ unit: 'binary' }), fc.constantFrom('/healthz', '/package', '/v1/x'))
  const maybe = <T>(a: fc.Arbitrary<T>): fc.Arbitrary<T | undefined> => fc.option(a, { nil: undefined })
  const facts: fc.Arbitrary<RequestFacts> = fc.record({
    id: fc.string(),
    method: fc.constantFrom('get', 'head', 'delete'),
    path: text,
    status: fc.integer({ min: 100, max: 599 }),
    bytes: maybe(fc.nat()),
    sentStatus: maybe(fc.integer({ min: 100, max: 599 })),
    ms: maybe(fc.nat()),
    pkg: maybe(
      fc.record({
        digest: fc.oneof(text, fc.array(text)),
        repository: maybe(text),
        source: maybe(text),
        path: maybe(fc.oneof(text, fc.array(text))),
        peer: maybe(text),
      }),
    ),
    route: maybe(text),
    result: maybe(fc.constantFrom('hit', 'miss', 'error', 'coalesced')),
    err: maybe(fc.record({ type: text, code: maybe(text), message: text })) as fc.Arbitrary<RequestFacts['err']>,
  })
  let compared = 0
  fc.assert(
    fc.property(facts, (f) => {
      const ours = kept('debug')
      const theirs = kept('debug')
      new RequestLog(ours.log).write(f)
      throughPino(theirs.log, f)
      const [line] = ours.lines
      // Valid JSON, one line, ending the way pino ends a line.
      if (ours.lines.length !== 1 || line === undefined || !line.endsWith('}\n') || line.slice(0, -1).includes('\n')) return false
      JSON.parse(line)
      compared++
      // pino writes a string under 42 characters without escaping its lone surrogates, which
      // JSON.stringify escapes (so our line is the valid one); the rest is the same.
      return hasLoneSurrogate(f) || sameTime(ours.lines)[0] === sameTime(theirs.lines)[0]
    }),
    { numRuns: 2000 },
  )
  t.equal(compared, 2000, 'every generated line was compared')
  t.end()
})

void t.test("a hit's line (writeHit) is write()'s line for the same hit, through any sequence of hits", (t) => {
  // writeHit keeps the fixed parts of a line per package object: a later hit of the same package
  // from another source, or of another size, must not get the earlier line's parts.
  const text = fc.oneof(fc.string(), fc.constantFrom('pkg/a', 'a"b', 'é\u0001'))
  const maybe = <T>(a: fc.Arbitrary<T>): fc.Arbitrary<T | undefined> => fc.option(a, { nil: undefined })
  const packages = fc.array(fc.record({ digest: text, repository: maybe(text), path: maybe(text) }), { minLength: 1, maxLength: 3 })
  const hits = fc.array(
    fc.record({ which: fc.nat(), id: fc.string(), source: fc.constantFrom('default', 'module-x', 'q"'), bytes: fc.constantFrom(0, 1, 65536), ms: fc.nat(50) }),
    { minLength: 1, maxLength: 12 },
  )
  let lines = 0
  fc.assert(
    fc.property(packages, hits, fc.constantFrom('debug', 'info', 'warn'), (pkgs, sequence, level) => {
      const ours = kept(level)
      const theirs = kept(level)
      const log = new RequestLog(ours.log)
      const reference = new RequestLog(theirs.log)
      for (const h of sequence) {
        const pkg = pkgs[h.which % pkgs.length] as (typeof pkgs)[number]
        log.writeHit(h.id, pkg, h.source, h.bytes, h.ms)
        const { digest, repository, path } = pkg
        reference.write({
          id: h.id,
          method: 'get',
          path: '/package',
          status: 200,
          bytes: h.bytes,
          sentStatus: 200,
          ms: h.ms,
          pkg: { digest, repository, source: h.source, path },
          result: 'hit',
        })
      }
      lines += ours.lines.length
      return ours.lines.length === theirs.lines.length && sameTime(ours.lines).every((l, i) => l === sameTime(theirs.lines)[i])
    }),
    { numRuns: 500 },
  )
  t.ok(lines > 0, `lines were compared (${lines})`)
  t.end()
})

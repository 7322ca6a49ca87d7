import { symbols, type Logger } from 'pino'
import type { describe } from './plugins/packages/log.js'

/** What one request was and how it ended, from hapi's lifecycle or from the fast path. */
export interface RequestFacts {
  id: string
  method: string
  path: string
  status: number
  /** Bytes of a body that went out whole; undefined when it was cut off (see `sentStatus`). */
  bytes: number | undefined
  /** The status the client saw when the body was cut off (hapi reports its own 500/499). */
  sentStatus?: number | undefined
  ms: number | undefined
  /** `/package` only: what was asked and where it came from. */
  pkg?: { digest: unknown; repository: unknown; source: string | undefined; path: unknown; peer?: string | undefined } | undefined
  /** `/v1/...` only: the route pattern (never the raw path). */
  route?: string | undefined
  result?: string | undefined
  err?: ReturnType<typeof describe> | undefined
}

/** What {@link RequestLog.writeHit} logs of the package asked for. */
export interface HitPackage {
  digest: string
  repository?: string | undefined
  path?: string | undefined
}

interface HitParts {
  source: string
  bytes: number
  /** `{"level":30` */
  level: string
  /** From `,"method"` to `"ms":` */
  fixed: string
  /** From `,"digest"` to the line's end. */
  tail: string
}

const QUIET = new Set(['/healthz', '/readyz', '/metrics'])

/** pino's internals this writer reads, so that its lines are the logger's own (see RequestLog). */
interface PinoInternals {
  [symbols.streamSym]: { write(line: string): unknown }
  [symbols.chindingsSym]: string
  [symbols.timeSym]: () => string
  [symbols.messageKeySym]: string
  /** `{"level":30` and the like, by level number. */
  [symbols.lsCacheSym]: Record<number, string>
  /** `}` and the line's end. */
  [symbols.endSym]: string
}

/** A JSON value, or undefined for a field left out (as JSON.stringify and pino leave it out). */
function json(value: unknown): string | undefined {
  if (value === undefined) return undefined
  if (typeof value === 'number') return Number.isFinite(value) ? String(value) : 'null'
  return JSON.stringify(value)
}

/** `,"key":value`, or nothing for an undefined value. */
function field(key: string, value: unknown): string {
  const v = json(value)
  return v === undefined ? '' : `,"${key}":${v}`
}

/**
 * The one JSON line per request, written the same way for hapi's routes and for the hits the
 * fast path answers: probes and scrapes at debug, failures and cut-off bodies at warn.
 *
 * The line is built here as a string and handed to the logger's own destination, the bytes pino
 * would write for `log.info({...}, 'request')`: its level number, its time, its bindings (the
 * `name`), the fields in order, then the message. A hit's line went through pino's generic
 * object walk, serializer lookups and three intermediate objects, a tenth of a memory hit's CPU;
 * these fields are few and known (no headers, errors already made log-safe by describe()), so
 * none of that is needed. test/request-log.test.ts holds the two byte for byte to each other.
 */
export class RequestLog {
  private readonly log: Logger
  private readonly internals: PinoInternals
  /** The fixed parts of {@link writeHit}'s lines, by the package asked for (the fast path's remembered query). */
  readonly #hitParts = new WeakMap<HitPackage, HitParts>()

  constructor(log: Logger) {
    this.log = log
    this.internals = log as unknown as PinoInternals
  }

  write(f: RequestFacts): void {
    const aborted = f.bytes === undefined
    const level = QUIET.has(f.path) ? 'debug' : f.status >= 500 || aborted ? 'warn' : 'info'
    if (!this.log.isLevelEnabled(level)) return
    const p = this.internals
    let line = `${p[symbols.lsCacheSym][this.log.levels.values[level] ?? 30]}${p[symbols.timeSym]()}${p[symbols.chindingsSym]}`
    line += `,"req":${json(f.id)},"method":${json(f.method)},"path":${json(f.path)},"status":${json(f.status)}`
    line += aborted ? `,"aborted":true${field('sentStatus', f.sentStatus)}` : `,"bytes":${json(f.bytes)}`
    line += field('ms', f.ms)
    const pkg = f.pkg
    if (pkg) {
      line += field('digest', pkg.digest) + field('repository', pkg.repository) + field('source', pkg.source)
      line += field('pkgPath', pkg.path) + field('result', f.result)
      if (pkg.peer) line += field('peer', pkg.peer)
    }
    // One `result` (a /package request has no route pattern in its line; this keeps it so if it did).
    if (f.route) line += field('route', f.route) + (pkg ? '' : field('result', f.result))
    if (f.err) line += field('err', f.err)
    p[symbols.streamSym].write(`${line},"${p[symbols.messageKeySym]}":"request"${p[symbols.endSym]}`)
  }

  /**
   * The line {@link write} makes for a cache hit the fast path sent whole, `bytes` long, of
   * `pkg` from `source`, `ms` after it was asked. Everything in it but the time, the id and `ms`
   * is the same for every hit of one package, so that is made once and kept with `pkg`, the
   * fast path's remembered query (a weak key: a query it forgets is forgotten here too). The
   * request log was a tenth of a 64 KiB hit's CPU.
   */
  writeHit(id: string, pkg: HitPackage, source: string, bytes: number, ms: number): void {
    if (!this.log.isLevelEnabled('info')) return
    const p = this.internals
    let parts = this.#hitParts.get(pkg)
    if (parts === undefined || parts.source !== source || parts.bytes !== bytes) {
      const level = p[symbols.lsCacheSym][this.log.levels.values.info ?? 30] ?? ''
      const fixed = `,"method":"get","path":"/package","status":200,"bytes":${json(bytes)},"ms":`
      let tail = field('digest', pkg.digest) + field('repository', pkg.repository) + field('source', source)
      tail += `${field('pkgPath', pkg.path)},"result":"hit","${p[symbols.messageKeySym]}":"request"${p[symbols.endSym]}`
      parts = { source, bytes, level, fixed, tail }
      this.#hitParts.set(pkg, parts)
    }
    p[symbols.streamSym].write(`${parts.level}${p[symbols.timeSym]()}${p[symbols.chindingsSym]},"req":${json(id)}${parts.fixed}${json(ms)}${parts.tail}`)
  }
}

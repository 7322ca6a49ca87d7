import { readFile, stat } from 'node:fs/promises'
import type { Logger } from 'pino'
import type { Metrics } from '../metrics/metrics.js'
import { describe } from '../packages/log.js'
import { parseRegistryConfigText } from './file-source.js'
import type { SourceSet } from './source-set.js'
import { SourceError, type RegistrySource } from './source.js'

export interface FileSourceWatcherOptions {
  /** The `--registry-config` path. */
  path: string
  sources: SourceSet
  metrics: Metrics
  log: Logger
  /** How often the file is checked for a change (default 1 s). */
  intervalMs?: number
}

const PROVIDER = 'file'

/**
 * The `file` provider: reads `--registry-config` at start (a bad file fails start-up) and
 * again whenever it changes, or on {@link reload} (SIGHUP). Changes are found by polling `stat`
 * (following symlinks) once a second and comparing device, inode, size, mtime and ctime: that
 * sees an editor's write-to-temp-then-rename and a Kubernetes ConfigMap's symlink swap, which
 * `fs.watch` on the file itself misses. A new version that does not parse is logged and
 * counted, and the previous sources stay in use; a file that disappears changes nothing.
 */
export class FileSourceWatcher {
  readonly #o: FileSourceWatcherOptions
  #timer: NodeJS.Timeout | undefined
  #stopped = false
  /** Checks and reloads run one at a time, in order, so an older read never wins. */
  #queue: Promise<unknown> = Promise.resolve()
  #signature: string | undefined
  #text: string | undefined
  #lastSync: number | undefined
  /** False while the file holds a version that was rejected (the previous one is in use). */
  #lastGood = true
  #missing = false

  constructor(o: FileSourceWatcherOptions) {
    this.#o = o
    o.sources.expect(PROVIDER)
    o.metrics.sourceSynced.set({ provider: PROVIDER }, 0)
    o.metrics.sourceSyncClock(PROVIDER, () => this.#lastSync)
  }

  /** The first read. Throws a {@link SourceError} naming the file and key at fault. */
  async load(): Promise<RegistrySource[]> {
    const what = `--registry-config ${this.#o.path}`
    let signature: string
    let text: string
    try {
      signature = await this.#stat()
      text = await readFile(this.#o.path, 'utf8')
    } catch (err) {
      throw new SourceError(`${what}: cannot read (${(err as NodeJS.ErrnoException).code ?? 'error'})`)
    }
    const sources = parseRegistryConfigText(text, what)
    this.#apply(sources, text, signature)
    return sources
  }

  /** Starts polling for changes. */
  start(): void {
    if (this.#stopped || this.#timer) return
    this.#schedule()
  }

  stop(): void {
    this.#stopped = true
    clearTimeout(this.#timer)
    this.#timer = undefined
  }

  /** When the file was last read or checked and found good (ms since epoch). */
  lastSync(): number | undefined {
    return this.#lastSync
  }

  /**
   * Re-reads the file now, whatever its stat says (SIGHUP). Resolves true when new sources
   * took effect, false when the file is unchanged, unreadable or invalid (logged). Never rejects.
   */
  reload(reason = 'reload requested'): Promise<boolean> {
    return this.#serialized(() => this.#read(reason, true)).catch((err: unknown) => {
      this.#o.log.error({ file: this.#o.path, reason, err: describe(err) }, 'registry config reload failed')
      return false
    })
  }

  #schedule(): void {
    if (this.#stopped) return
    this.#timer = setTimeout(() => {
      void this.#serialized(() => this.#check()).finally(() => this.#schedule())
    }, this.#o.intervalMs ?? 1000)
    this.#timer.unref()
  }

  #serialized<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.#queue.then(fn)
    this.#queue = run.catch(() => undefined)
    return run
  }

  async #stat(): Promise<string> {
    const s = await stat(this.#o.path)
    return `${s.dev}:${s.ino}:${s.size}:${s.mtimeMs}:${s.ctimeMs}`
  }

  async #check(): Promise<boolean> {
    if (this.#stopped) return false
    let signature: string
    try {
      signature = await this.#stat()
    } catch (err) {
      this.#unreadable(err)
      return false
    }
    if (signature === this.#signature) {
      // Unchanged since the last read; in sync only if that read was good.
      if (this.#lastGood) this.#lastSync = Date.now()
      return false
    }
    return this.#read('file changed', false)
  }

  async #read(reason: string, forced: boolean): Promise<boolean> {
    const { log, metrics, path } = this.#o
    let signature: string
    let text: string
    try {
      // stat before read: if the file changes in between, the next check sees a new signature.
      signature = await this.#stat()
      text = await readFile(path, 'utf8')
    } catch (err) {
      this.#unreadable(err)
      return false
    }
    if (this.#missing) log.info({ file: path }, 'registry config is back')
    this.#missing = false
    this.#signature = signature
    if (text === this.#text) {
      this.#lastGood = true
      this.#lastSync = Date.now()
      if (forced) log.info({ file: path, reason }, 'registry config unchanged')
      return false
    }
    let parsed: RegistrySource[]
    try {
      parsed = parseRegistryConfigText(text, `--registry-config ${path}`)
    } catch (err) {
      if (!(err instanceof SourceError)) throw err
      this.#lastGood = false
      metrics.sourceErrors.inc({ provider: PROVIDER })
      log.error({ file: path, reason, err: { message: err.message } }, 'registry config rejected; keeping the previous sources')
      return false
    }
    this.#apply(parsed, text, signature)
    log.info({ file: path, reason, sources: parsed.map((s) => ({ name: s.name, repository: s.repository, scheme: s.scheme })) }, 'registry config reloaded')
    return true
  }

  #apply(parsed: RegistrySource[], text: string, signature: string): void {
    this.#o.sources.replace(PROVIDER, parsed)
    this.#text = text
    this.#signature = signature
    this.#lastGood = true
    this.#lastSync = Date.now()
    this.#o.metrics.sourceSynced.set({ provider: PROVIDER }, 1)
  }

  #unreadable(err: unknown): void {
    if (this.#missing) return
    this.#missing = true
    this.#signature = undefined
    this.#o.metrics.sourceErrors.inc({ provider: PROVIDER })
    this.#o.log.warn({ file: this.#o.path, err: describe(err) }, 'registry config cannot be read; keeping the previous sources')
  }
}

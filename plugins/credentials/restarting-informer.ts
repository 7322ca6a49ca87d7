import { ListWatch, Watch, type KubeConfig, type KubernetesListObject, type KubernetesObject } from '@kubernetes/client-node'
import type { Logger } from 'pino'
import type { Metrics } from '../metrics/metrics.js'
import { describeKubeError, WatchClosedEarlyError, WatchErrorEvent } from './kube-errors.js'

/** How an informer retries. Tests shorten every one of these. */
export interface InformerTiming {
  /** First delay after a failure; it doubles on every failure in a row. */
  initialBackoffMs: number
  maxBackoffMs: number
  /**
   * A LIST that has not answered, or a WATCH that has not sent its response headers, by then
   * is aborted and counts as a failure (an open watch may then stay quiet as long as it likes).
   */
  requestTimeoutMs: number
  /**
   * A watch that stayed open this long before it ended is healthy: a restart after it starts
   * from the initial delay (or, after a clean close, at once). One that ends sooner, cleanly or
   * not, with events or without, is a failure with backoff: a server (or a proxy in front of
   * it) that ends every watch at once, after an event or a bookmark or nothing, gets backoff
   * instead of a tight reconnect loop. Real API servers end watches after `timeoutSeconds`
   * (minutes).
   */
  stableWatchMs: number
  /**
   * Each watch asks the API server to end it after between this and twice this long
   * (`timeoutSeconds`, randomised like client-go's), and is then resumed from the last
   * resourceVersion. A connection that died without a FIN or RST (a vanished load balancer or
   * node) would otherwise look like a quiet watch forever, and no change would ever arrive.
   */
  watchTimeoutMs: number
  /** A watch still open this long after its `timeoutSeconds` is presumed dead and aborted. */
  watchTimeoutGraceMs: number
}

export const DEFAULT_INFORMER_TIMING: InformerTiming = Object.freeze({
  initialBackoffMs: 500,
  maxBackoffMs: 30_000,
  requestTimeoutMs: 30_000,
  stableWatchMs: 10_000,
  watchTimeoutMs: 300_000,
  watchTimeoutGraceMs: 30_000,
})

export interface RestartingInformerOptions<T extends KubernetesObject> {
  /** `secret` or `modulesources`: a metric label and a log field. */
  provider: string
  kubeConfig: KubeConfig
  /** The collection's API path, e.g. `/api/v1/namespaces/d8-system/secrets`. */
  path: string
  fieldSelector?: string
  /** A label selector for the LIST and WATCH (the LIST in `list` must use the same). */
  labelSelector?: string
  /** One LIST of the collection; must honour `signal`. */
  list: (signal: AbortSignal) => Promise<KubernetesListObject<T>>
  /**
   * The whole collection as the informer now knows it. Called after every successful LIST
   * (even an empty one) and after each burst of watch events, coalesced to one call per turn
   * of the event loop, so a re-list is seen as one consistent state, never half applied.
   */
  onChange: (objects: readonly T[]) => void
  log: Logger
  metrics: Metrics
  timing?: Partial<InformerTiming>
  /** Clock for the last-sync time (ms since epoch). */
  now?: () => number
}

interface WatchHooks {
  stopped(): boolean
  opened(): void
  event(): void
  closed(err: unknown): unknown
  presumedDead(timeoutSeconds: number): void
}

/**
 * The same cluster and credentials, with node-fetch's `timeout` on every request Watch makes.
 * That timeout ends at the response headers, so it bounds connecting (an API server that
 * accepts and never answers) without cutting a long, quiet watch stream. Watch builds its
 * request from `applyToFetchOptions({})` and offers no other way to bound it.
 */
function withHeadersTimeout(kubeConfig: KubeConfig, ms: number): KubeConfig {
  const config = Object.create(kubeConfig) as KubeConfig
  config.applyToFetchOptions = async (opts) => ({ ...(await kubeConfig.applyToFetchOptions(opts)), timeout: ms })
  return config
}

/**
 * client-node's Watch, observed: when a watch stream is open, when events arrive and when it
 * ends. It also never rejects (an auth plugin that throws while building the request is passed
 * to `done` like any other failure), because ListWatch calls it from a callback whose promise
 * nobody awaits: a rejection there would be an unhandled one.
 */
class ObservedWatch extends Watch {
  readonly #hooks: WatchHooks
  readonly #timing: InformerTiming

  constructor(kubeConfig: KubeConfig, timing: InformerTiming, hooks: WatchHooks) {
    super(withHeadersTimeout(kubeConfig, timing.requestTimeoutMs))
    this.#timing = timing
    this.#hooks = hooks
  }

  override async watch(
    path: string,
    queryParams: Record<string, string | number | boolean | undefined>,
    callback: (phase: string, apiObj: unknown, watchObj?: unknown) => void,
    done: (err: unknown) => void,
  ): Promise<AbortController> {
    // A LIST that finished after stop() must not open a new watch behind our back.
    if (this.#hooks.stopped()) return new AbortController()
    let ended = false
    let presumedDead = false
    let deadline: NodeJS.Timeout | undefined
    let controller: AbortController | undefined
    // An ERROR event ends the watch as a failure. client-node would ignore it (bar a 410) and
    // re-watch at once from the same resourceVersion: against an API server that ends every
    // watch that way, some 1,700 requests a second, without a log line or a metric.
    let errorEvent: WatchErrorEvent | undefined
    const unusableVersion = (event: WatchErrorEvent): void => {
      // ListWatch forgets its resourceVersion, so its restart lists again, only when an ERROR
      // event says code 410: say so for every form of "the resourceVersion is unusable".
      if (event.relist) callback('ERROR', { kind: 'Status', code: 410, reason: event.reason ?? 'Expired' })
    }
    const onDone = (err: unknown): void => {
      ended = true
      clearTimeout(deadline)
      // HTTP 410 on the watch request: the same as the event. (ListWatch alone would re-list
      // at once, with no backoff, however often the API server says it.)
      if (!errorEvent && (err as { statusCode?: unknown } | null)?.statusCode === 410) {
        errorEvent = new WatchErrorEvent(410, 'Gone', true, 'the watch request was answered 410')
        unusableVersion(errorEvent)
      }
      // Our own abort of a watch that outlived its timeout: a clean end, resumed at once from
      // the last resourceVersion (not a failure with backoff).
      done(this.#hooks.closed(errorEvent ?? (presumedDead ? null : err)))
    }
    const timeoutSeconds = Math.max(1, Math.round((this.#timing.watchTimeoutMs * (1 + Math.random())) / 1000))
    try {
      controller = await super.watch(
        path,
        { ...queryParams, timeoutSeconds },
        (phase, obj, watchObj) => {
          if (phase === 'ERROR') {
            if (errorEvent) return
            errorEvent = WatchErrorEvent.from(obj)
            unusableVersion(errorEvent)
            // The API server ends the stream after an ERROR; one that does not is ended here.
            controller?.abort()
            return
          }
          this.#hooks.event()
          callback(phase, obj, watchObj)
        },
        onDone,
      )
      // stop() came while the request was under way: ListWatch had nothing to abort yet. An
      // ERROR event that came before the controller did ends the watch now.
      if (this.#hooks.stopped() || (errorEvent && !ended)) controller.abort()
      else if (!ended) {
        this.#hooks.opened()
        const running = controller
        deadline = setTimeout(
          () => {
            presumedDead = true
            this.#hooks.presumedDead(timeoutSeconds)
            running.abort()
          },
          timeoutSeconds * 1000 + this.#timing.watchTimeoutGraceMs,
        )
        deadline.unref()
      }
      return controller
    } catch (err) {
      if (!ended) onDone(err)
      return new AbortController()
    }
  }
}

/**
 * A client-node informer (LIST, then WATCH from the list's resourceVersion) that keeps going.
 * client-node's ListWatch re-watches after a clean close, but after any other error (API
 * server unreachable, connection dropped, 5xx, 403) it emits `error` once and stops for good.
 * This class restarts it with exponential backoff; a restart resumes the watch from the last
 * resourceVersion seen, so nothing is missed. A watch the API server ends with an ERROR event
 * (or HTTP 410) is such a failure too, and when it says the resourceVersion is unusable (410
 * Gone, `Expired`, "too old resource version", as client-go reads it) the restart re-lists.
 */
export class RestartingInformer<T extends KubernetesObject> {
  readonly #o: RestartingInformerOptions<T>
  readonly #timing: InformerTiming
  readonly #now: () => number
  readonly #informer: ListWatch<T>
  readonly #lists = new Set<AbortController>()
  #stopped = false
  #started = false
  #retry: NodeJS.Timeout | undefined
  #notify: NodeJS.Immediate | undefined
  #failures = 0
  #listed = false
  #watching = false
  #watchOpenedAt = 0
  #watchEvents = 0
  #lastSync: number | undefined

  constructor(o: RestartingInformerOptions<T>) {
    this.#o = o
    this.#timing = { ...DEFAULT_INFORMER_TIMING, ...o.timing }
    this.#now = o.now ?? Date.now
    const watch = new ObservedWatch(o.kubeConfig, this.#timing, {
      stopped: () => this.#stopped,
      opened: () => {
        this.#watching = true
        this.#watchOpenedAt = this.#now()
        this.#watchEvents = 0
        this.#lastSync = this.#now()
      },
      event: () => {
        this.#watchEvents++
        this.#lastSync = this.#now()
      },
      closed: (err) => this.#watchClosed(err),
      presumedDead: (timeoutSeconds) => {
        this.#o.log.warn({ provider: this.#o.provider, timeoutSeconds }, 'Kubernetes watch outlived its timeout without closing: presumed dead, watching again')
      },
    })
    this.#informer = new ListWatch<T>(o.path, watch, () => this.#list(), false, o.labelSelector, o.fieldSelector)
    const changed = (): void => this.#scheduleNotify()
    this.#informer.on('add', changed)
    this.#informer.on('update', changed)
    this.#informer.on('delete', changed)
    this.#informer.on('error', (err?: unknown) => this.#failed(err))
  }

  /** Starts listing and watching; failures are retried until {@link stop}. */
  start(): void {
    if (this.#started || this.#stopped) return
    this.#started = true
    this.#run()
  }

  /** Stops for good: no retry, no notification, open requests aborted. */
  async stop(): Promise<void> {
    if (this.#stopped) return
    this.#stopped = true
    clearTimeout(this.#retry)
    if (this.#notify) clearImmediate(this.#notify)
    for (const list of this.#lists) list.abort()
    this.#watching = false
    await this.#informer.stop()
  }

  /** True once a LIST succeeded: {@link RestartingInformerOptions.onChange} has been called. */
  get listed(): boolean {
    return this.#listed
  }

  /**
   * When the informer was last known to be in sync (ms since epoch): now while a watch is open,
   * else the last LIST, watch event or watch opening. Undefined before the first LIST.
   */
  lastSync(): number | undefined {
    if (!this.#listed) return undefined
    return this.#watching ? this.#now() : this.#lastSync
  }

  #run(): void {
    if (this.#stopped) return
    // ListWatch reports its failures through `error`; this catch is for anything else.
    this.#informer.start().catch((err: unknown) => this.#failed(err))
  }

  async #list(): Promise<KubernetesListObject<T>> {
    const controller = new AbortController()
    this.#lists.add(controller)
    const timer = setTimeout(() => controller.abort(), this.#timing.requestTimeoutMs)
    try {
      const list = await this.#o.list(controller.signal)
      if (!this.#stopped) {
        // The backoff is not reset here: an API server that answers LISTs and fails every watch
        // (a 410 storm forces a LIST each time) must see the delay grow. A watch that stays
        // open resets it (see #watchClosed).
        this.#listed = true
        this.#lastSync = this.#now()
        // The informer stores the items only after this promise resolves: notify after that.
        this.#scheduleNotify()
      }
      return list
    } finally {
      clearTimeout(timer)
      this.#lists.delete(controller)
    }
  }

  #watchClosed(err: unknown): unknown {
    const openFor = this.#watching ? this.#now() - this.#watchOpenedAt : 0
    const wasOpen = this.#watching
    this.#watching = false
    if (wasOpen && openFor >= this.#timing.stableWatchMs) this.#failures = 0
    if (err === null || err === undefined) {
      if (wasOpen && openFor < this.#timing.stableWatchMs && !this.#stopped) {
        return new WatchClosedEarlyError(`the API server closed the watch after ${openFor} ms (${this.#watchEvents} events)`)
      }
      return null
    }
    return err
  }

  #failed(err: unknown): void {
    this.#watching = false
    if (this.#stopped || this.#retry) return
    const delay = Math.min(this.#timing.maxBackoffMs, this.#timing.initialBackoffMs * 2 ** Math.min(this.#failures, 30))
    this.#failures++
    // +-20 % jitter: replicas that lost the API server together do not come back in lockstep.
    const jittered = Math.round(delay * (0.8 + 0.4 * Math.random()))
    this.#o.metrics.sourceRestarts.inc({ provider: this.#o.provider })
    const relist = err instanceof WatchErrorEvent && err.relist ? { relist: true } : {}
    this.#o.log.warn(
      { provider: this.#o.provider, err: { message: describeKubeError(err) }, failures: this.#failures, retryInMs: jittered, synced: this.#listed, ...relist },
      this.#listed ? 'Kubernetes watch failed; serving the last known sources and retrying' : 'Kubernetes list failed; not ready until it succeeds, retrying',
    )
    this.#retry = setTimeout(() => {
      this.#retry = undefined
      this.#run()
    }, jittered)
  }

  #scheduleNotify(): void {
    if (this.#notify || this.#stopped) return
    this.#notify = setImmediate(() => {
      this.#notify = undefined
      if (this.#stopped || !this.#listed) return
      try {
        this.#o.onChange(this.#informer.list())
      } catch (err) {
        this.#o.log.error({ provider: this.#o.provider, err: { message: describeKubeError(err) } }, 'applying Kubernetes sources failed')
      }
    })
  }
}

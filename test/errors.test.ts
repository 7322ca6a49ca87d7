import { setTimeout as delay } from 'node:timers/promises'
import t from 'tap'
import {
  BusyError,
  MethodNotAllowedError,
  NotCachedError,
  RangeNotSatisfiableError,
  SourcesNotSyncedError,
  TimeoutError,
  UpstreamError,
  toBoom,
} from '../errors.js'

/** The rejection `fn` produces (these are real aborts, not hand-made look-alikes). */
async function rejection(fn: () => Promise<unknown>): Promise<unknown> {
  return fn().then(
    () => {
      throw new Error('expected a rejection')
    },
    (err: unknown) => err,
  )
}

void t.test('our errors map to their status, message and code; a wrapped one maps as itself', (t) => {
  const upstream = toBoom(new UpstreamError('registry answered 500 for the manifest', 500))
  t.equal(upstream.output.statusCode, 502)
  t.equal(upstream.output.payload.message, 'registry answered 500 for the manifest')
  t.same(
    upstream.output.payload,
    { statusCode: 502, error: 'Bad Gateway', message: 'registry answered 500 for the manifest', code: 'EUPSTREAM' },
    'the code is in the body',
  )
  t.equal(toBoom(new Error('outer', { cause: new TimeoutError('idle', 10) })).output.statusCode, 504, 'found in the cause chain')
  const busy = toBoom(new BusyError('busy', 7))
  t.equal(busy.output.headers['Retry-After'], '7')
  t.end()
})

void t.test('the edge errors: their headers and codes', (t) => {
  const range = toBoom(new RangeNotSatisfiableError(100))
  t.equal(range.output.statusCode, 416)
  t.match(range.output.headers, { 'Content-Range': 'bytes */100', 'Accept-Ranges': 'bytes' })
  t.equal(range.output.payload.code, 'ERANGE')
  const method = toBoom(new MethodNotAllowedError('only GET', ['GET']))
  t.equal(method.output.statusCode, 405)
  t.equal(method.output.headers.Allow, 'GET')
  const missing = toBoom(new NotCachedError('sha256:00'))
  t.same([missing.output.statusCode, missing.output.payload.code], [404, 'ENOTCACHED'])
  t.equal(toBoom(new TimeoutError('fill', 5)).output.payload.message, 'the layer download did not finish within 5 ms')
  t.end()
})

void t.test('not synced yet: 503 with Retry-After, naming the providers', (t) => {
  const boom = toBoom(new SourcesNotSyncedError('r.example/x', ['secret', 'modulesources']))
  t.equal(boom.output.statusCode, 503)
  t.equal(boom.output.headers['Retry-After'], '5')
  t.match(boom.output.payload.message, /not synced yet \(secret, modulesources\)/)
  t.end()
})

void t.test('a DOMException TimeoutError (AbortSignal.timeout) is a 504, not a bare 500', async (t) => {
  // What AbortSignal.timeout() aborts with (made here directly: its timer does not keep the
  // test's event loop alive).
  const reason = new DOMException('The operation was aborted due to timeout', 'TimeoutError')
  const boom = toBoom(reason)
  t.equal(boom.output.statusCode, 504, 'the bare reason, as code that rethrows signal.reason has it')
  t.equal(boom.output.payload.code, 'ETIMEOUT')
  const controller = new AbortController()
  controller.abort(reason)
  const wrapped = await rejection(() => delay(1000, undefined, { signal: controller.signal }))
  t.equal((wrapped as Error).name, 'AbortError', 'node wraps the reason in an AbortError')
  t.equal(toBoom(wrapped).output.statusCode, 504, 'wrapped: still a timeout')
})

void t.test('an AbortError that is not ours is a 503 with Retry-After; anything else a 500', async (t) => {
  const controller = new AbortController()
  controller.abort()
  t.equal((controller.signal.reason as Error).name, 'AbortError')
  const boom = toBoom(controller.signal.reason)
  t.equal(boom.output.statusCode, 503)
  t.equal(boom.output.headers['Retry-After'], '5')
  const wrapped = await rejection(() => delay(1000, undefined, { signal: controller.signal }))
  t.equal(toBoom(wrapped).output.statusCode, 503)
  // An abort whose reason is one of ours keeps its own status.
  const ours = new AbortController()
  ours.abort(new UpstreamError('the proxy is shutting down'))
  t.equal(toBoom(await rejection(() => delay(1000, undefined, { signal: ours.signal }))).output.statusCode, 502)
  t.equal(toBoom(new Error('a bug')).output.statusCode, 500)
})

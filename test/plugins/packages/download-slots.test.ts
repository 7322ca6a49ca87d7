/** The download semaphore behind the bound on concurrent fills (plugins/packages/download-slots.ts). */
import t from 'tap'
import { BusyError } from '../../../errors.js'
import { DEFAULT_DOWNLOAD_SLOTS, DEFAULT_LOOKUP_SLOTS, DownloadSlots } from '../../../plugins/packages/download-slots.js'

const settled = async (p: Promise<void>): Promise<'resolved' | 'pending' | Error> => {
  const pending = Symbol('pending')
  const r = await Promise.race([
    p.then(
      () => 'resolved' as const,
      (err: Error) => err,
    ),
    new Promise<typeof pending>((resolve) => setImmediate(() => resolve(pending))),
  ])
  return r === pending ? 'pending' : r
}

void t.test('slots are granted up to max, then in arrival order as they are released', async (t) => {
  const slots = new DownloadSlots({ max: 2, maxQueued: 10, queueTimeoutMs: 60_000 })
  const a = slots.enter()
  const b = slots.enter()
  const c = slots.enter()
  const d = slots.enter()
  t.equal(await settled(a.ready), 'resolved')
  t.equal(await settled(b.ready), 'resolved')
  t.equal(await settled(c.ready), 'pending', 'the third waits')
  t.same({ running: slots.running, queued: slots.queued }, { running: 2, queued: 2 })
  a.release()
  a.release()
  t.equal(await settled(c.ready), 'resolved', 'the longest waiter gets the freed slot')
  t.equal(await settled(d.ready), 'pending', 'a second release of the same ticket frees nothing')
  t.same({ running: slots.running, queued: slots.queued }, { running: 2, queued: 1 })
  d.release()
  t.same({ running: slots.running, queued: slots.queued }, { running: 2, queued: 0 }, 'a waiter that gives up leaves the queue')
  b.release()
  c.release()
  t.same({ running: slots.running, queued: slots.queued }, { running: 0, queued: 0 })
})

void t.test('a full queue refuses at once; a wait past the timeout is refused too', async (t) => {
  const slots = new DownloadSlots({ max: 1, maxQueued: 1, queueTimeoutMs: 50, retryAfterSeconds: 7 })
  const running = slots.enter()
  const waiting = slots.enter()
  try {
    slots.enter()
    t.fail('the queue was full')
  } catch (err) {
    t.ok(err instanceof BusyError)
    t.match(err, { status: 503, code: 'EBUSY', retryAfterSeconds: 7, kind: 'layer', message: /layer downloads are running/ })
  }
  const outcome = await waiting.ready.then(
    () => 'granted',
    (err: unknown) => err,
  )
  t.ok(outcome instanceof BusyError, 'refused after the queue timeout')
  t.equal(slots.queued, 0, 'and out of the queue')
  waiting.release()
  t.equal(slots.running, 1, 'releasing a refused ticket frees nothing')
  running.release()
  t.equal(slots.running, 0)
})

void t.test('shutdown rejects every waiter', async (t) => {
  const controller = new AbortController()
  const slots = new DownloadSlots({ max: 1 }, controller.signal)
  const running = slots.enter()
  const waiting = [slots.enter(), slots.enter()]
  controller.abort(new Error('shutting down'))
  for (const w of waiting) t.match(await settled(w.ready), { message: 'shutting down' })
  t.equal(slots.queued, 0)
  running.release()
  t.equal(slots.running, 0)
})

void t.test('defaults: as many downloads as the registry agent has sockets, a bounded queue, Retry-After 5', (t) => {
  t.same(DEFAULT_DOWNLOAD_SLOTS, { max: 64, maxQueued: 256, queueTimeoutMs: 30_000, retryAfterSeconds: 5 })
  t.end()
})

void t.test('manifest lookups: their own defaults, and refusals that say what was full', async (t) => {
  t.same(DEFAULT_LOOKUP_SLOTS, { max: 32, maxQueued: 1024, queueTimeoutMs: 30_000, retryAfterSeconds: 5 })
  const lookups = new DownloadSlots({}, undefined, 'manifest')
  const held = Array.from({ length: 32 + 1024 }, () => lookups.enter())
  t.same({ running: lookups.running, queued: lookups.queued }, { running: 32, queued: 1024 }, 'the defaults apply')
  t.throws(() => lookups.enter(), { status: 503, kind: 'manifest', message: /32 manifest lookups are running and 1024 waiting/ })
  for (const h of held) h.release()
  t.same({ running: lookups.running, queued: lookups.queued }, { running: 0, queued: 0 })
  const one = new DownloadSlots({ max: 1, queueTimeoutMs: 20 }, undefined, 'manifest')
  const first = one.enter()
  const outcome = await one.enter().ready.then(
    () => 'granted',
    (err: unknown) => err,
  )
  t.match(outcome, { kind: 'manifest', message: /no manifest lookup slot became free within 20 ms/ })
  first.release()
})

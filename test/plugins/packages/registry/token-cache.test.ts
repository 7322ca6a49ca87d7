import t from 'tap'
import { MAX_TOKENS, TokenCache } from '../../../../plugins/packages/registry/token-cache.js'

void t.test('tokens are reused until shortly before they expire', async (t) => {
  let now = 1_000_000
  const cache = new TokenCache(() => now)
  let fetches = 0
  const fetch = (): Promise<{ token: string; expiresIn: number }> => Promise.resolve({ token: `t${++fetches}`, expiresIn: 300 })
  t.equal(await cache.get('k', fetch), 't1')
  t.equal(await cache.get('k', fetch), 't1')
  t.equal(cache.peek('k'), 't1')
  now += 269_000
  t.equal(await cache.get('k', fetch), 't1', 'still valid 31 s before expiry')
  now += 2_000
  t.equal(cache.peek('k'), undefined, 'refreshed 30 s early')
  t.equal(await cache.get('k', fetch), 't2')
  t.equal(await cache.get('other', fetch), 't3', 'keys are separate')
})

void t.test('the refresh margin is 10 % of the lifetime, at least one second', async (t) => {
  let now = 0
  const cache = new TokenCache(() => now)
  await cache.get('a', () => Promise.resolve({ token: 'a', expiresIn: 60 }))
  now = 53_999
  t.equal(cache.peek('a'), 'a')
  now = 54_000
  t.equal(cache.peek('a'), undefined)
  now = 0
  await cache.get('b', () => Promise.resolve({ token: 'b', expiresIn: 5 }))
  now = 3_999
  t.equal(cache.peek('b'), 'b')
  now = 4_000
  t.equal(cache.peek('b'), undefined)
  now = 0
  await cache.get('c', () => Promise.resolve({ token: 'c', expiresIn: 0 }))
  t.equal(cache.peek('c'), undefined, 'a zero lifetime is never reused')
})

void t.test('concurrent misses share one fetch; failures are not cached', async (t) => {
  const cache = new TokenCache()
  let fetches = 0
  let release!: () => void
  const gate = new Promise<void>((resolve) => (release = resolve))
  const fetch = async (): Promise<{ token: string; expiresIn: number }> => {
    fetches++
    await gate
    return { token: 'shared', expiresIn: 300 }
  }
  const all = Promise.all([cache.get('k', fetch), cache.get('k', fetch), cache.get('k', fetch)])
  release()
  t.same(await all, ['shared', 'shared', 'shared'])
  t.equal(fetches, 1)

  await t.rejects(
    cache.get('bad', async () => Promise.reject(new Error('token server down'))),
    /token server down/,
  )
  t.equal(await cache.get('bad', () => Promise.resolve({ token: 'ok', expiresIn: 300 })), 'ok', 'the next call fetches again')
})

void t.test('drop forgets only the refused token; clear forgets all', async (t) => {
  const cache = new TokenCache()
  await cache.get('k', () => Promise.resolve({ token: 'one', expiresIn: 300 }))
  cache.drop('k', 'stale-other')
  t.equal(cache.peek('k'), 'one', 'a token refreshed meanwhile is kept')
  cache.drop('k', 'one')
  t.equal(cache.peek('k'), undefined)
  await cache.get('k', () => Promise.resolve({ token: 'two', expiresIn: 300 }))
  cache.clear()
  t.equal(cache.peek('k'), undefined)
})

void t.test('a caller that gives up ends only its own wait: the shared fetch goes on for the others', async (t) => {
  const cache = new TokenCache()
  let fetches = 0
  let release!: () => void
  const gate = new Promise<void>((resolve) => (release = resolve))
  const fetch = async (): Promise<{ token: string; expiresIn: number }> => {
    fetches++
    await gate
    return { token: 'shared', expiresIn: 300 }
  }
  const quitter = new AbortController()
  const first = cache.get('k', fetch, quitter.signal)
  const second = cache.get('k', fetch, new AbortController().signal)
  quitter.abort(new Error('client went away'))
  await t.rejects(first, /client went away/, 'the caller that gave up hears its own reason at once')
  release()
  t.equal(await second, 'shared', 'the other caller gets the token')
  t.equal(fetches, 1, 'one fetch')
  t.equal(cache.peek('k'), 'shared', 'and it is cached for later')
  const aborted = new AbortController()
  aborted.abort(new Error('already gone'))
  await t.rejects(cache.get('other', fetch, aborted.signal), /already gone/)
})

void t.test('bounded: the least recently used go first, and expired tokens are swept', async (t) => {
  let now = 0
  const cache = new TokenCache(() => now, 3)
  const token =
    (value: string, expiresIn = 300) =>
    (): Promise<{ token: string; expiresIn: number }> =>
      Promise.resolve({ token: value, expiresIn })
  await cache.get('a', token('a'))
  await cache.get('b', token('b'))
  await cache.get('c', token('c'))
  t.equal(cache.peek('a'), 'a', 'a is used again: now the most recent')
  await cache.get('d', token('d'))
  t.equal(cache.size, 3, 'never more than the bound')
  t.equal(cache.peek('b'), undefined, 'the least recently used went')
  t.same(
    ['a', 'c', 'd'].map((k) => cache.peek(k)),
    ['a', 'c', 'd'],
  )

  // Expired tokens go before live ones, and every minute anyway.
  await cache.get('short', token('short', 60))
  now += 60_000
  await cache.get('e', token('e', 600))
  t.equal(cache.size, 3, 'the expired one went first, the live ones stay')
  t.equal(cache.peek('d'), 'd')
  now += 300_000
  await cache.get('f', token('f', 600))
  t.equal(cache.size, 2, 'a minute later every expired token was swept')
  t.same([cache.peek('e'), cache.peek('f')], ['e', 'f'])
  t.equal(MAX_TOKENS, 1024, 'the default bound')

  // Under the bound, expired tokens are still swept once a minute (a replaced source's tokens
  // are never asked for again, so peek would never drop them).
  const roomy = new TokenCache(() => now, 10)
  await roomy.get('old', token('old', 60))
  now += 61_000
  await roomy.get('new', token('new', 300))
  t.equal(roomy.size, 1, 'the expired token was swept without being asked for')
})

void t.test('distinct keys (one per client-chosen path) cannot grow the cache past its bound', async (t) => {
  const cache = new TokenCache(Date.now, 50)
  for (let i = 0; i < 1000; i++)
    await cache.get(`source\nrealm\nservice\nrepository:prefix/path-${i}:pull`, () => Promise.resolve({ token: `t${i}`, expiresIn: 300 }))
  t.equal(cache.size, 50)
})

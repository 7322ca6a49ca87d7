import t from 'tap'
import { TokenCache } from '../../../plugins/packages/token-cache.js'

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

  await t.rejects(cache.get('bad', async () => Promise.reject(new Error('token server down'))), /token server down/)
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

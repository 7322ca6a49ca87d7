/**
 * The fast path's memo of parsed /package URLs (handlers/package-fast-path.ts, QueryMemo), over
 * arbitrary sequences of valid and invalid URLs: every answer is the one parsing that URL afresh
 * gives (the same query, or the same 400), whatever came before; it never holds more than its
 * bound, never an invalid URL, and what it hands out cannot be changed by a caller.
 */
import t from 'tap'
import fc from 'fast-check'
import { QueryMemo } from '../../handlers/package-fast-path.js'
import { parsePackageQuery, queryOf, type PackageQuery } from '../../handlers/package-request.js'

const fresh = (url: string): PackageQuery | string => {
  try {
    return parsePackageQuery(queryOf(url.slice('/package?'.length)))
  } catch (err) {
    return (err as Error).message
  }
}

const DIGESTS = [`sha256:${'a'.repeat(64)}`, `sha256:${'a'.repeat(63)}b`, `sha256:${'A'.repeat(64)}`, 'sha256:abc', '']
const REPOSITORIES = [
  undefined,
  '',
  'registry.example/deckhouse',
  'registry.example/deckhouse/',
  'registry.example:5000/a/b',
  'Registry.example/x',
  'registry.example//a',
  '%72egistry.example/x',
]
const PATHS = [undefined, '', 'pkg/a', '/pkg/a', '//pkg', 'pkg/../a', 'pkg%2Fa', 'a+b']

const url: fc.Arbitrary<string> = fc
  .record({
    digest: fc.constantFrom(...DIGESTS),
    repeatDigest: fc.boolean(),
    repository: fc.constantFrom(...REPOSITORIES),
    path: fc.constantFrom(...PATHS),
    extra: fc.constantFrom('', '&x=1', '&', '&digest'),
    reversed: fc.boolean(),
  })
  .map((u) => {
    const parts = [`digest=${u.digest}`]
    if (u.repeatDigest) parts.push(`digest=${u.digest}`)
    if (u.repository !== undefined) parts.push(`repository=${u.repository}`)
    if (u.path !== undefined) parts.push(`path=${u.path}`)
    if (u.reversed) parts.reverse()
    return `/package?${parts.join('&')}${u.extra}`
  })

void t.test('any sequence of URLs: the answer parsing afresh gives, within the bound', (t) => {
  let asked = 0
  let remembered = 0
  fc.assert(
    fc.property(fc.integer({ min: 1, max: 6 }), fc.array(url, { minLength: 10, maxLength: 60 }), (max, urls) => {
      const memo = new QueryMemo(max)
      for (const u of urls) {
        let got: PackageQuery | string
        let sent: unknown
        try {
          const r = memo.get(u)
          got = r.query
          sent = r.asked
          // What the request log shows: the parameters as sent (as hapi's request.query has them).
          const raw = queryOf(u.slice('/package?'.length))
          const want = { digest: raw.digest, repository: raw.repository, path: raw.path }
          if (JSON.stringify(sent) !== JSON.stringify(want)) throw new Error(`${u}: asked ${JSON.stringify(sent)}, sent ${JSON.stringify(want)}`)
          if (!Object.isFrozen(r) || !Object.isFrozen(r.asked)) throw new Error('a remembered query can be changed by whoever holds it')
        } catch (err) {
          got = (err as Error).message
        }
        asked++
        const want = fresh(u)
        if (JSON.stringify(got) !== JSON.stringify(want)) throw new Error(`${u}: ${JSON.stringify(got)} where parsing gives ${JSON.stringify(want)}`)
        if (memo.size > max) throw new Error(`${memo.size} remembered, over the bound ${max}`)
        if (typeof got === 'string' && memo.size > 0) {
          // An invalid URL is never remembered: asking again parses again (and throws again).
          const before = memo.size
          try {
            memo.get(u)
          } catch {
            // expected
          }
          if (memo.size !== before) throw new Error(`${u} (invalid) was remembered`)
        }
        if (typeof got !== 'string') {
          remembered++
          if (!Object.isFrozen(got)) throw new Error('a remembered query can be changed by whoever holds it')
        }
      }
    }),
    { numRuns: 500 },
  )
  t.ok(asked > 5000, `${asked} URLs asked`)
  t.ok(remembered > 300, `${remembered} of them valid`)
  t.end()
})

void t.test('a long URL is answered but not remembered; past the bound the memo starts over', (t) => {
  const memo = new QueryMemo(2)
  const long = `/package?digest=sha256:${'a'.repeat(64)}&path=pkg&x=${'y'.repeat(1100)}`
  t.same(memo.get(long).query, { digest: `sha256:${'a'.repeat(64)}`, path: 'pkg' })
  t.equal(memo.size, 0, 'a URL over 1 KiB is not kept')
  memo.get(`/package?digest=sha256:${'a'.repeat(64)}`)
  memo.get(`/package?digest=sha256:${'b'.repeat(64)}`)
  t.equal(memo.size, 2)
  memo.get(`/package?digest=sha256:${'c'.repeat(64)}`)
  t.equal(memo.size, 1, 'the third started it over')
  t.end()
})

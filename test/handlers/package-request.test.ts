import t from 'tap'
import { matchesIfNoneMatch, parsePackageQuery, parseRange } from '../../handlers/package-request.js'

const D = `sha256:${'0123456789abcdef'.repeat(4)}`

void t.test('parsePackageQuery accepts the contract forms', (t) => {
  t.same(parsePackageQuery({ digest: D }), { digest: D })
  t.same(parsePackageQuery({ digest: D, repository: '', path: '' }), { digest: D }, 'empty optional fields are absent')
  t.same(parsePackageQuery({ digest: D, repository: 'registry.example.com:5000/a/b-c/d_e/f.g', path: 'x/y__z' }), {
    digest: D,
    repository: 'registry.example.com:5000/a/b-c/d_e/f.g',
    path: 'x/y__z',
  })
  t.same(parsePackageQuery({ digest: D, repository: 'registry.example.com' }), { digest: D, repository: 'registry.example.com' }, 'a bare host')
  t.same(parsePackageQuery({ digest: D, repository: '[::1]:5000/a' }), { digest: D, repository: '[::1]:5000/a' }, 'an IPv6 host')
  t.same(parsePackageQuery({ digest: D, path: '/x/y' }), { digest: D, path: 'x/y' }, 'one leading slash on path is dropped')
  t.same(parsePackageQuery({ digest: D, path: '/' }), { digest: D }, 'a path of just / is no path')
  t.same(
    parsePackageQuery({ digest: D, repository: 'r.example.com/a/b/' }),
    { digest: D, repository: 'r.example.com/a/b' },
    'one trailing slash on repository is dropped',
  )
  t.same(parsePackageQuery({ digest: D, repository: 'r.example.com/' }), { digest: D, repository: 'r.example.com' }, 'a bare host with a trailing slash')
  t.end()
})

void t.test('parsePackageQuery refuses with a 400 naming the field', (t) => {
  const cases: Array<[Record<string, unknown>, RegExp]> = [
    [{}, /"digest" is required/],
    [{ digest: '' }, /"digest" is required/],
    [{ digest: [D, D] }, /"digest" must be given once/],
    [{ digest: D.toUpperCase() }, /"digest" must be sha256/],
    [{ digest: `${D} ` }, /"digest" must be sha256/],
    [{ digest: D, repository: [D] }, /"repository" must be given once/],
    [{ digest: D, repository: 'a/../b' }, /"repository"/],
    [{ digest: D, repository: 'host/A' }, /"repository"/],
    [{ digest: D, repository: 'host:port/a' }, /"repository"/],
    [{ digest: D, repository: '-host/a' }, /"repository"/],
    [{ digest: D, repository: `h/${'a'.repeat(600)}` }, /"repository"/],
    [{ digest: D, path: '.' }, /"path"/],
    [{ digest: D, path: '..' }, /"path"/],
    [{ digest: D, path: 'a/./b' }, /"path"/],
    [{ digest: D, path: '-a' }, /"path"/],
    [{ digest: D, path: 'a--' }, /"path"/],
    [{ digest: D, path: `${'a'.repeat(256)}` }, /"path"/],
    [{ digest: D, path: ['a', 'b'] }, /"path" must be given once/],
    [{ digest: D, path: '//a' }, /"path"/],
    [{ digest: D, path: 'a/' }, /"path"/],
    [{ digest: D, repository: 'r.example.com/a//' }, /"repository"/],
  ]
  for (const [query, message] of cases) {
    t.throws(() => parsePackageQuery(query), { code: 'EBADREQUEST', status: 400, message }, JSON.stringify(query).slice(0, 80))
  }
  t.end()
})

void t.test('parseRange', (t) => {
  t.equal(parseRange(undefined, 100), undefined)
  t.equal(parseRange('', 100), undefined)
  t.same(parseRange('bytes=0-0', 100), { start: 0, end: 0 })
  t.same(parseRange('bytes=10-19', 100), { start: 10, end: 19 })
  t.same(parseRange('bytes=10-', 100), { start: 10, end: 99 })
  t.same(parseRange('bytes=-5', 100), { start: 95, end: 99 })
  t.same(parseRange('bytes=-500', 100), { start: 0, end: 99 }, 'a suffix longer than the object is the whole object')
  t.same(parseRange('bytes=90-500', 100), { start: 90, end: 99 }, 'the end is clipped')
  t.same(parseRange('bytes= 1 - 2 ', 100), { start: 1, end: 2 })
  t.equal(parseRange('bytes=100-', 100), 'unsatisfiable')
  t.equal(parseRange('bytes=100-200', 100), 'unsatisfiable')
  t.equal(parseRange('bytes=-0', 100), 'unsatisfiable')
  t.equal(parseRange('bytes=-1', 0), 'unsatisfiable')
  for (const ignored of ['bytes=5-1', 'bytes=-', 'bytes=0-1,5-6', 'items=0-1', 'bytes=a-b', 'bytes 0-1']) {
    t.equal(parseRange(ignored, 100), undefined, `${ignored} is ignored`)
  }
  t.end()
})

void t.test('matchesIfNoneMatch', (t) => {
  const etag = `"${D}"`
  t.ok(matchesIfNoneMatch(etag, etag))
  t.ok(matchesIfNoneMatch(`W/${etag}`, etag), 'weak comparison')
  t.ok(matchesIfNoneMatch(`"other", ${etag}`, etag))
  t.notOk(matchesIfNoneMatch('*', etag), '* is no shortcut: unknown whether the package exists')
  t.ok(matchesIfNoneMatch('*', etag, true), '* matches once the package is known to exist')
  t.ok(matchesIfNoneMatch(`"other", *`, etag, true))
  t.notOk(matchesIfNoneMatch('"other"', etag, true), 'existence does not make another ETag match')
  t.notOk(matchesIfNoneMatch(undefined, etag))
  t.notOk(matchesIfNoneMatch('', etag))
  t.notOk(matchesIfNoneMatch(D, etag), 'an unquoted value is not the tag')
  t.notOk(matchesIfNoneMatch('"other"', etag))
  t.end()
})

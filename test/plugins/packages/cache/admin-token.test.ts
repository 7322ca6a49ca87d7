import { readdirSync, statSync } from 'node:fs'
import { join } from 'node:path'
import t from 'tap'
import { ADMIN_TOKEN_FILE, adminTokenMatches, newAdminToken, readAdminToken, writeAdminToken } from '../../../../plugins/packages/cache/admin-token.js'

void t.test('written atomically with mode 0600, replacing the last one; a crash leftover is removed', async (t) => {
  const dir = t.testdir({ [`${ADMIN_TOKEN_FILE}.0123456789ab.partial`]: 'half', 'index.sqlite': '' })
  const first = newAdminToken()
  t.match(first, /^[0-9a-f]{64}$/)
  t.not(newAdminToken(), first, 'random per call')
  await writeAdminToken(dir, first)
  const path = join(dir, ADMIN_TOKEN_FILE)
  t.equal(readAdminToken(path), first)
  t.equal(statSync(path).mode & 0o777, 0o600)
  t.same(readdirSync(dir).sort(), [ADMIN_TOKEN_FILE, 'index.sqlite'], 'no temp file left, nothing else touched')
  const second = newAdminToken()
  await writeAdminToken(dir, second)
  t.equal(readAdminToken(path), second, 'the next start replaces it')
  t.throws(() => readAdminToken(join(dir, 'missing')), { code: 'ENOENT' })
})

void t.test('matches only the exact token', (t) => {
  const token = newAdminToken()
  t.ok(adminTokenMatches(token, token))
  t.ok(adminTokenMatches(token, ` ${token}\n`), 'surrounding whitespace (a file read as is) is ignored')
  for (const presented of [undefined, '', token.slice(1), `${token}0`, token.toUpperCase(), [token]]) {
    t.notOk(adminTokenMatches(token, presented), JSON.stringify(presented)?.slice(0, 20) ?? 'undefined')
  }
  t.notOk(adminTokenMatches(undefined, token), 'no token configured: nothing matches')
  t.notOk(adminTokenMatches('', ''), 'an empty token never matches')
  t.end()
})

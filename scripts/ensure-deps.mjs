// Installs the locked dependencies when node_modules is missing or older than the lock file,
// so `npm run demo` and `npm test` are each a complete set-up on a fresh clone.
// sqlite3 (under @keyv/sqlite) has no reachable prebuilt binary here: build it from source,
// against Debian's libsqlite3 when its headers are installed (3x faster than the bundled copy).
import { existsSync, statSync } from 'node:fs'
import { spawnSync } from 'node:child_process'

const marker = 'node_modules/.package-lock.json'
const lock = 'package-lock.json'
const fresh = existsSync(marker) && existsSync(lock) && statSync(marker).mtimeMs >= statSync(lock).mtimeMs
if (!fresh) {
  const env = { ...process.env, npm_config_build_from_source: 'true' }
  if (existsSync('/usr/include/sqlite3.h')) env.npm_config_sqlite = '/usr'
  const args = existsSync(lock) ? ['ci', '--no-audit', '--no-fund'] : ['install', '--no-audit', '--no-fund']
  console.error(`ensure-deps: running npm ${args[0]} (sqlite3 builds from source${env.npm_config_sqlite ? ' against /usr' : ''})`)
  const r = spawnSync('npm', args, { stdio: 'inherit', env })
  if (r.status !== 0) process.exit(r.status ?? 1)
}

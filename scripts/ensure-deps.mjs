// Installs the locked dependencies when node_modules is missing or older than the lock file,
// so `npm run demo` and `npm test` are each a complete set-up on a fresh clone.
// sqlite3 (under @keyv/sqlite) has no reachable prebuilt binary here: build it from source,
// against Debian's libsqlite3 when its headers are installed (3x faster than the bundled copy).
// The options reach sqlite3's install script without the npm_config_* variables npm 11 reports
// as "Unknown env config": .prebuild-installrc (project root) skips the prebuilt download, gyp
// reads binding.gyp's `sqlite` variable from GYP_DEFINES, and node-gyp builds against the
// running Node's own headers (npm_config_nodedir, a key npm knows), so it never downloads them
// (a fresh HOME has no ~/.npmrc naming them).
import { existsSync, statSync } from 'node:fs'
import { spawnSync } from 'node:child_process'
import { dirname, join } from 'node:path'

const marker = 'node_modules/.package-lock.json'
const lock = 'package-lock.json'
const fresh = existsSync(marker) && existsSync(lock) && statSync(marker).mtimeMs >= statSync(lock).mtimeMs
if (!fresh) {
  // The newcomer's first screen is the demo's own: no npm upgrade notice either (a known key).
  const env = { ...process.env, npm_config_update_notifier: 'false' }
  const nodedir = dirname(dirname(process.execPath))
  if (existsSync(join(nodedir, 'include', 'node', 'node_api.h'))) env.npm_config_nodedir = nodedir
  const system = existsSync('/usr/include/sqlite3.h')
  if (system) env.GYP_DEFINES = [process.env.GYP_DEFINES, 'sqlite=/usr'].filter(Boolean).join(' ')
  const args = existsSync(lock) ? ['ci', '--no-audit', '--no-fund'] : ['install', '--no-audit', '--no-fund']
  console.error(`ensure-deps: running npm ${args[0]} (sqlite3 builds from source${system ? ' against /usr' : ''})`)
  const r = spawnSync('npm', args, { stdio: 'inherit', env })
  if (r.status !== 0) process.exit(r.status ?? 1)
}

// Installs the locked dependencies when node_modules is missing or older than the lock file,
// so `npm run demo` and `npm test` are each a complete set-up on a fresh clone.
// sqlite3 (under @keyv/sqlite) has no reachable prebuilt binary here: it is built from source,
// against Debian's libsqlite3 when its headers are installed (3x faster than the bundled copy).
// Its options go to node-gyp alone: as npm_config_* variables or npm flags, npm itself would
// warn `Unknown env config "sqlite"` on a newcomer's first screen. sqlite3 is the only locked
// package with an install script (package-lock.json: hasInstallScript), so npm runs none.
import { existsSync, statSync } from 'node:fs'
import { join } from 'node:path'
import { spawnSync } from 'node:child_process'

const marker = 'node_modules/.package-lock.json'
const lock = 'package-lock.json'
const fresh = existsSync(marker) && existsSync(lock) && statSync(marker).mtimeMs >= statSync(lock).mtimeMs
if (!fresh) {
  const run = (command, args, options = {}) => {
    const r = spawnSync(command, args, { stdio: 'inherit', ...options })
    if (r.status !== 0) process.exit(r.status ?? 1)
  }
  const args = existsSync(lock) ? ['ci', '--ignore-scripts', '--no-audit', '--no-fund'] : ['install', '--ignore-scripts', '--no-audit', '--no-fund']
  const system = existsSync('/usr/include/sqlite3.h')
  console.error(`ensure-deps: running npm ${args[0]}, then building sqlite3 from source${system ? ' against /usr' : ''}`)
  run('npm', args)
  // npm names its own node-gyp to scripts it runs; run directly, ask npm where it is installed.
  const gyp = process.env.npm_config_node_gyp ?? join(spawnSync('npm', ['root', '-g'], { encoding: 'utf8' }).stdout.trim(), 'npm', 'node_modules', 'node-gyp', 'bin', 'node-gyp.js')
  run(process.execPath, [gyp, 'rebuild', ...(system ? ['--sqlite=/usr'] : [])], { cwd: 'node_modules/sqlite3' })
}

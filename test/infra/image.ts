/**
 * Builds the runtime image's file set in a folder, without a Docker engine, by following the
 * Dockerfile: each runtime-stage `COPY --from=<build stage> <path>` is produced the way the build
 * stage makes that path, `dist` by the same `tsc -p` (into the folder), `node_modules` as
 * `npm prune --omit=dev` leaves it (the package-lock entries not marked `dev`, taken from the
 * installed tree), anything else from the build context. A path it does not know how the build
 * stage produces is an error, so a Dockerfile change cannot slip past the test.
 */
import { spawn } from 'node:child_process'
import { cpSync, existsSync, mkdirSync, readFileSync } from 'node:fs'
import { builtinModules } from 'node:module'
import { dirname, join, posix, resolve } from 'node:path'
import { copies, runs, workdir, type Stage } from './dockerfile.js'
import { ROOT } from './manifests.js'

interface LockEntry {
  dev?: boolean
  link?: boolean
}

/** The `node_modules` paths `npm prune --omit=dev` keeps: lock entries not marked dev. */
export function productionPackages(root = ROOT): string[] {
  const lock = JSON.parse(readFileSync(join(root, 'package-lock.json'), 'utf8')) as { packages: Record<string, LockEntry> }
  return Object.entries(lock.packages)
    .filter(([path, entry]) => path.startsWith('node_modules/') && !entry.dev && !entry.link)
    .map(([path]) => path)
}

/**
 * Lays out the production tree under `appDir/node_modules`: every top-level package the lock
 * keeps, whole (a kept package's nested packages are its own dependencies, so kept too). Hard
 * links when `link` (fast, no data copied; the caller must then never change those files),
 * else copies.
 */
async function copyProductionModules(appDir: string, link: boolean): Promise<number> {
  const top = productionPackages().filter((p) => /^node_modules\/(@[^/]+\/)?[^/]+$/.test(p) && existsSync(join(ROOT, p)))
  mkdirSync(appDir, { recursive: true })
  const result = await run('cp', [link ? '-al' : '-a', '--parents', ...top, appDir], ROOT)
  if (result.code !== 0) {
    if (link) return copyProductionModules(appDir, false)
    throw new Error(`copying the production tree failed: ${result.output}`)
  }
  return top.length
}

function run(command: string, args: string[], cwd: string): Promise<{ code: number | null; output: string }> {
  return new Promise((resolvePromise, reject) => {
    const child = spawn(command, args, { cwd, stdio: ['ignore', 'pipe', 'pipe'] })
    let output = ''
    child.stdout.on('data', (c: Buffer) => (output += c.toString('utf8')))
    child.stderr.on('data', (c: Buffer) => (output += c.toString('utf8')))
    child.on('error', reject)
    child.on('close', (code) => resolvePromise({ code, output }))
  })
}

/**
 * Lays the runtime stage's copies out under `root` (an image path `/app/x` becomes
 * `<root>/app/x`). Returns a log of what was produced how.
 */
export async function assembleRuntime(stages: readonly Stage[], root: string, o: { link: boolean }): Promise<string[]> {
  const runtime = stages.at(-1)
  if (!runtime) throw new Error('the Dockerfile has no stage')
  const log: string[] = []
  // tsc and the module copy are independent: run them side by side.
  const tasks: Array<Promise<void>> = []
  for (const copy of copies(runtime)) {
    const build = stages.find((s) => s.name !== undefined && s.name === copy.from)
    if (!build || build === runtime) throw new Error(`Dockerfile line ${copy.line}: the runtime stage copies from ${copy.from ?? 'the build context'}, not a build stage`)
    const buildRuns = runs(build).join('\n')
    const buildDir = workdir(build)
    if (!copies(build).some((c) => c.from === undefined && c.sources.includes('.') && c.dest === buildDir)) {
      throw new Error(`the build stage does not COPY . into its WORKDIR ${buildDir}`)
    }
    for (const source of copy.sources) {
      const rel = posix.relative(buildDir, source)
      const dest = join(root, copy.sources.length > 1 || copy.dest.endsWith('/') ? posix.join(copy.dest, posix.basename(source)) : copy.dest)
      if (rel === '' || rel.startsWith('..')) throw new Error(`Dockerfile line ${copy.line}: ${source} is outside the build stage's ${buildDir}`)
      mkdirSync(dirname(dest), { recursive: true })
      if (rel === 'dist') {
        const tsc = /(?:npx )?tsc -p (\S+)/.exec(buildRuns)?.[1]
        if (!tsc) throw new Error('the build stage copies dist but runs no `tsc -p`')
        tasks.push(
          run(process.execPath, [join(ROOT, 'node_modules/typescript/bin/tsc'), '-p', tsc, '--outDir', dest], ROOT).then((result) => {
            if (result.code !== 0) throw new Error(`tsc -p ${tsc} failed (the image build would too):\n${result.output}`)
            log.push(`${copy.dest}: tsc -p ${tsc}`)
          }),
        )
      } else if (rel === 'node_modules') {
        if (!/npm ci\b/.test(buildRuns) || !/npm prune --omit=dev\b/.test(buildRuns)) throw new Error('the build stage does not `npm ci` then `npm prune --omit=dev`')
        if (posix.basename(copy.dest) !== 'node_modules') throw new Error(`Dockerfile line ${copy.line}: node_modules copied to ${copy.dest}`)
        tasks.push(
          copyProductionModules(dirname(dest), o.link).then((count) => {
            log.push(`${copy.dest}: ${count} packages of the production tree${o.link ? ' (hard links)' : ''}`)
          }),
        )
      } else if (!rel.includes('/') && existsSync(join(ROOT, rel))) {
        cpSync(join(ROOT, rel), dest, { recursive: true })
        log.push(`${copy.dest}: ${rel} from the build context`)
      } else {
        throw new Error(`Dockerfile line ${copy.line}: this test does not know how the build stage produces ${source}`)
      }
    }
  }
  await Promise.all(tasks)
  return log
}

/** A bare specifier's package name: `@hapi/hapi/lib/x` -> `@hapi/hapi`, `pino/file` -> `pino`. */
export function packageName(specifier: string): string {
  const parts = specifier.split('/')
  return specifier.startsWith('@') ? parts.slice(0, 2).join('/') : (parts[0] ?? specifier)
}

const IMPORTS = [/\bfrom\s*['"]([^'"]+)['"]/g, /\bimport\s*\(\s*['"]([^'"]+)['"]\s*\)/g, /^\s*import\s*['"]([^'"]+)['"]/gm]

/**
 * Walks the ES module graph from `entry` (static and literal dynamic imports) and returns a
 * problem for each bare import that is not a Node built-in, not a `dependencies` entry of
 * `packageJson`, or not installed under `nodeModules`.
 */
export function checkRuntimeImports(entry: string, packageJson: string, nodeModules: string): { problems: string[]; packages: string[]; files: number } {
  const deps = Object.keys((JSON.parse(readFileSync(packageJson, 'utf8')) as { dependencies?: Record<string, string> }).dependencies ?? {})
  const seen = new Set<string>()
  const packages = new Set<string>()
  const problems: string[] = []
  const queue = [resolve(entry)]
  while (queue.length > 0) {
    const file = queue.pop() as string
    if (seen.has(file)) continue
    seen.add(file)
    if (!existsSync(file)) {
      problems.push(`${file}: imported but missing`)
      continue
    }
    const text = readFileSync(file, 'utf8')
    for (const re of IMPORTS) {
      for (const m of text.matchAll(re)) {
        const spec = m[1] ?? ''
        if (spec.startsWith('.') || spec.startsWith('/')) {
          queue.push(resolve(dirname(file), spec))
          continue
        }
        if (spec.startsWith('node:') || builtinModules.includes(spec)) continue
        const name = packageName(spec)
        packages.add(name)
        if (!deps.includes(name)) problems.push(`${file} imports ${spec}: ${name} is not in package.json dependencies`)
        else if (!existsSync(join(nodeModules, name, 'package.json'))) problems.push(`${file} imports ${spec}: ${name} is not installed in the image`)
      }
    }
  }
  return { problems, packages: [...packages].sort(), files: seen.size }
}

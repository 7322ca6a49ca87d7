/**
 * `npm run bench:memory`: peak RSS of the real binary (`--log-level info`, as deployed) from
 * /proc/<pid>/status (VmHWM, reset before each scenario) in the two herds a master meets:
 * - 100 concurrent first hits on a cached 8 MiB package right after a restart;
 * - 150 clients that stop reading a cached 24 MiB package (a restart first, so the package is
 *   a file from before the start, as on a master that has run for a while).
 * Each scenario runs `--rounds N` times (default 3) on a fresh process; the median is reported.
 * Not a test and not in CI: figures depend on the machine.
 */
import { createHash } from 'node:crypto'
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import type { Socket } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { FakeRegistry } from '../tools/sample-registry.js'
import { freePort } from '../tools/net.js'
import { stalledClient } from '../tools/stalled-client.js'
import { Children, memoryOf, MiB, option, pseudoRandom, resetPeakRss, sleep, startProxy } from './lib.js'

const children = new Children()

async function fetchWhole(url: string): Promise<string> {
  const res = await fetch(url)
  const hash = createHash('sha256')
  for await (const chunk of res.body ?? []) hash.update(chunk)
  return `sha256:${hash.digest('hex')}`
}

/** A cache directory holding `data` (filled by one proxy), then a fresh proxy on it. */
async function restartedWith(
  registry: FakeRegistry,
  data: Buffer,
  path: string,
): Promise<{ pid: number; base: string; port: number; url: string; stop: () => Promise<void> }> {
  const dir = mkdtempSync(join(tmpdir(), 'rpp-bench-mem-'))
  const configPath = join(dir, 'registry.json')
  writeFileSync(configPath, JSON.stringify({ default: { address: registry.host, path: '/deckhouse/ce', scheme: 'http' } }))
  const image = registry.addImage(`deckhouse/ce/${path}`, [data])
  const url = `/package?digest=${image.manifestDigest}&path=${path}`
  const start = async () => {
    const port = await freePort()
    const child = await startProxy(children, { configPath, cacheDir: join(dir, 'cache'), port, logFile: join(dir, 'proxy.log'), logLevel: 'info' })
    return { child, port, base: `http://127.0.0.1:${port}` }
  }
  const first = await start()
  if ((await fetchWhole(`${first.base}${url}`)) !== image.lastLayer.digest) throw new Error('wrong bytes')
  while ((await fetch(`${first.base}/cache/${image.lastLayer.digest}`)).status !== 200) await sleep(50)
  await children.stop(first.child)
  const second = await start()
  return {
    pid: second.child.pid ?? -1,
    base: second.base,
    port: second.port,
    url,
    stop: async () => {
      await children.stop(second.child)
      rmSync(dir, { recursive: true, force: true })
    },
  }
}

async function herd(registry: FakeRegistry, round: number): Promise<{ before: number; peak: number }> {
  const p = await restartedWith(registry, pseudoRandom(8 * MiB, `herd-${round}`), `herd${round}`)
  resetPeakRss(p.pid)
  const before = memoryOf(p.pid).rssKiB * 1024
  await Promise.all(Array.from({ length: 100 }, () => fetchWhole(`${p.base}${p.url}`)))
  const peak = memoryOf(p.pid).hwmKiB * 1024
  await p.stop()
  return { before, peak }
}

async function stalledReaders(registry: FakeRegistry, round: number): Promise<{ before: number; peak: number }> {
  const p = await restartedWith(registry, pseudoRandom(24 * MiB, `stall-${round}`), `stall${round}`)
  resetPeakRss(p.pid)
  const before = memoryOf(p.pid).rssKiB * 1024
  const sockets: Socket[] = []
  for (let i = 0; i < 150; i++) sockets.push(await stalledClient(p.port, p.url))
  let peak = 0
  for (let i = 0; i < 20; i++) {
    peak = Math.max(peak, memoryOf(p.pid).hwmKiB * 1024)
    await sleep(100)
  }
  for (const s of sockets) s.destroy()
  await p.stop()
  return { before, peak }
}

const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)] ?? NaN
const mib = (n: number): string => (n / MiB).toFixed(0)

const rounds = option('rounds', 3)
const registry = await FakeRegistry.start()
try {
  const results: Record<string, Array<{ before: number; peak: number }>> = { herd: [], stalled: [] }
  for (let r = 0; r < rounds; r++) {
    results.herd?.push(await herd(registry, r))
    results.stalled?.push(await stalledReaders(registry, r))
  }
  console.log(`| scenario (real binary, --log-level info, ${rounds} rounds, median) | RSS before | peak RSS (VmHWM) |`)
  console.log('|---|---|---|')
  for (const [name, label] of [
    ['herd', '100 concurrent first hits on a cached 8 MiB package after a restart'],
    ['stalled', '150 clients that stop reading a cached 24 MiB package'],
  ] as const) {
    const rs = results[name] ?? []
    console.log(
      `| ${label} | ${mib(median(rs.map((x) => x.before)))} MiB | ${mib(median(rs.map((x) => x.peak)))} MiB (runs: ${rs.map((x) => mib(x.peak)).join(', ')}) |`,
    )
  }
} finally {
  await registry.close()
  await children.stopAll()
}

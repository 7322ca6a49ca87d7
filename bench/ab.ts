/**
 * Two builds of the proxy, A and B, serving the same cache hits in alternating wrk runs: for
 * telling whether a change to the hit path moved its CPU per request, which one `npm run bench`
 * round cannot (its rounds vary by more than most single changes save).
 *
 *   npm run build && node dist/bench/ab.js --a /path/to/other/checkout [--b .] [--size 64k] [--runs 8] [--seconds 5]
 *     [--a-log-level info] [--b-log-level info]
 *
 * Each side is a checkout with its own `dist/main.js` (built), or `node-memory`: the benchmark's
 * plain `node:http` server (`res.end(buffer)`), the runtime's floor. Both run at once, the
 * proxies at `--log-level info` unless told otherwise, with their caches filled from one sample
 * registry; runs alternate A, B, B, A, A, B, ... so that drift falls on both alike. Prints each
 * run's requests/s and CPU per request (from /proc/<pid>/stat, all threads), both sides'
 * medians, and the median of B/A over adjacent runs: this machine's speed moves by up to 2x
 * within minutes, and a ratio of two runs seconds apart is the figure that survives it. A host
 * probe (lib.ts) is timed before and after every run, and the median over the pairs that ran in
 * one phase of the host is printed too: a pair that straddles a change of pace says nothing.
 */
import { chmodSync, mkdtempSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join, resolve } from 'node:path'
import { FakeRegistry } from '../tools/sample-registry.js'
import { freePort } from '../tools/net.js'
import {
  Children,
  fetchHashed,
  fmt,
  hostProbeMs,
  KiB,
  median,
  MiB,
  option,
  pseudoRandom,
  ROOT,
  runWrk,
  startBaseline,
  startProxy,
  textOption,
  waitForHit,
} from './lib.js'

async function main(): Promise<void> {
  const sizes: Record<string, number> = { '64k': 64 * KiB, '4m': 4 * MiB, '32m': 32 * MiB }
  const size = textOption('size', '64k')
  const bytes = sizes[size]
  if (bytes === undefined) throw new Error(`--size must be one of ${Object.keys(sizes).join(', ')}`)
  const a = textOption('a', '')
  if (!a) throw new Error('--a <checkout> is required (a built checkout to compare with)')
  const sideOf = (given: string): string => (given === 'node-memory' ? given : resolve(given, 'dist/main.js'))
  const sides = { A: sideOf(a), B: sideOf(textOption('b', ROOT)) }
  const levels = { A: textOption('a-log-level', 'info'), B: textOption('b-log-level', 'info') }
  const runs = option('runs', 8)
  const seconds = option('seconds', 5)
  const children = new Children()
  const tmp = mkdtempSync(join(tmpdir(), 'rpp-ab-'))
  chmodSync(tmp, 0o755)
  const registry = await FakeRegistry.start()
  try {
    const body = pseudoRandom(bytes, `ab ${size}`)
    const image = registry.addImage('bench/pkg/ab', [body])
    const bodyFile = join(tmp, 'body.bin')
    writeFileSync(bodyFile, body)
    const configPath = join(tmp, 'registry-config.json')
    writeFileSync(configPath, JSON.stringify({ default: { address: registry.host, path: '/bench', scheme: 'http' } }))
    const proxies: Record<'A' | 'B', { pid: number; url: string }> = { A: { pid: -1, url: '' }, B: { pid: -1, url: '' } }
    for (const side of ['A', 'B'] as const) {
      const port = await freePort()
      if (sides[side] === 'node-memory') {
        const child = await startBaseline(children, 'node-memory', port, bodyFile, join(tmp, `node-${side}.log`))
        proxies[side] = { pid: child.pid ?? -1, url: `http://127.0.0.1:${port}/` }
        continue
      }
      const child = await startProxy(children, {
        configPath,
        cacheDir: join(tmp, `cache-${side}`),
        port,
        logFile: join(tmp, `proxy-${side}.log`),
        logLevel: levels[side],
        main: sides[side],
      })
      const url = `http://127.0.0.1:${port}/package?digest=${image.manifestDigest}&path=pkg/ab`
      const first = await fetchHashed(url)
      if (first.status !== 200 || first.digest !== image.lastLayer.digest) throw new Error(`${side} warm-up: HTTP ${first.status}`)
      await waitForHit(url, image.lastLayer.digest)
      proxies[side] = { pid: child.pid ?? -1, url }
    }
    const describe = (side: 'A' | 'B'): string =>
      sides[side] === 'node-memory' ? 'plain node:http (node-memory)' : `${sides[side]} --log-level ${levels[side]}`
    console.log(`A = ${describe('A')}\nB = ${describe('B')}\n${size} hits, wrk -t1 -c32 -d${seconds}s, ${runs} runs each, alternating`)
    const results: Record<'A' | 'B', { rps: number; us: number }[]> = { A: [], B: [] }
    const ratios: number[] = []
    // Pairs whose runs both fell in one phase of the host: the probes timed just before and just
    // after each of the two runs agree within 15%.
    const steady: number[] = []
    let previous: { side: 'A' | 'B'; us: number; probes: number[] } | undefined
    for (let i = 0; i < runs * 2; i++) {
      // A B B A A B B A ...: each side runs first as often as second.
      const side = i % 4 === 0 || i % 4 === 3 ? 'A' : 'B'
      const p = proxies[side]
      await runWrk(children, { url: p.url, threads: 1, connections: 32, seconds: 1, serverPids: [p.pid] })
      const before = hostProbeMs()
      const r = await runWrk(children, { url: p.url, threads: 1, connections: 32, seconds, serverPids: [p.pid], quiet: { maxMs: 30_000, threshold: 0.25 } })
      const after = hostProbeMs()
      const us = (r.serverCpu / r.requestsPerSec) * 1e6
      results[side].push({ rps: r.requestsPerSec, us })
      // Runs 0-1, 2-3, ... are one A and one B each: a pair.
      if (i % 2 === 1 && previous) {
        const ratio = side === 'B' ? us / previous.us : previous.us / us
        ratios.push(ratio)
        const probes = [...previous.probes, before, after]
        if (Math.max(...probes) <= 1.15 * Math.min(...probes)) steady.push(ratio)
      }
      previous = { side, us, probes: [before, after] }
      console.log(`${side}: ${fmt(r.requestsPerSec)} req/s, ${fmt(us, 1)} µs CPU per request (host probe ${fmt(before)} / ${fmt(after)} ms)`)
    }
    for (const side of ['A', 'B'] as const) {
      const rs = results[side]
      console.log(
        `${side} median: ${fmt(median(rs.map((r) => r.rps)))} req/s, ${fmt(median(rs.map((r) => r.us)), 1)} µs per request (runs: ${rs.map((r) => fmt(r.us, 1)).join(', ')})`,
      )
    }
    console.log(
      `B/A CPU per request, median of ${ratios.length} adjacent pairs: ${fmt(median(ratios), 3)}x (pairs: ${ratios.map((r) => fmt(r, 2)).join(', ')})`,
    )
    console.log(
      steady.length > 0
        ? `B/A in a steady host (the four probes around a pair within 15%), median of ${steady.length}: ${fmt(median(steady), 3)}x (${steady.map((r) => fmt(r, 2)).join(', ')})`
        : 'B/A in a steady host: no pair had its four probes within 15%',
    )
  } finally {
    await children.stopAll()
    await registry.close()
  }
}

await main()

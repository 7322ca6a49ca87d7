/**
 * Load against the real binary (a child process, so its descriptors and memory are its own):
 * 1,000 concurrent keep-alive connections on cache hits, then 100 concurrent cold fills, every
 * response byte-exact; afterwards the child's descriptors return to their baseline and its
 * memory does not grow from one identical round to the next. Bounded to fit CI; the longer,
 * mixed version is `npm run soak` (bench/soak.ts).
 */
import { existsSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import t from 'tap'
import { FakeRegistry, type FakeImage } from '../fixtures/fake-registry.js'
import { bytes } from '../fixtures/proxy-harness.js'
import { ProcSampler, keepAliveLoad, percentile, readProc, settleFds, settleRss, startBinary, sleep } from '../fixtures/load-driver.js'
import { openFilesLimit } from '../fixtures/listening-proxy.js'

const MAIN = join(import.meta.dirname, '../../dist/main.js')
const MiB = 1024 * 1024

// Both this process (the clients) and the child (the server) need one descriptor per
// connection, plus their own. A low `ulimit -n` would make the test fail for the wrong reason:
// scale down instead, and say so loudly.
const WANTED = 1000
const limit = openFilesLimit()
const CONNECTIONS = Math.min(WANTED, limit - 300)
if (CONNECTIONS < WANTED) {
  t.comment(`!!! LOAD TEST SCALED DOWN: ulimit -n is ${limit}, so ${CONNECTIONS} connections instead of ${WANTED} !!!`)
}
const COLD = 100
/** Noise allowed between a reading after a full GC and the baseline. */
const HEAP_SLACK = 4 * MiB
const RSS_SLACK = 48 * MiB

const mib = (n: number): string => `${(n / MiB).toFixed(1)} MiB`

if (!existsSync(MAIN)) {
  t.fail('dist/main.js is missing: npm test and npm run test:reliability build it before tap')
} else {
  void t.test(`${CONNECTIONS} concurrent connections on hits, ${COLD} concurrent cold fills: all byte-exact, descriptors and memory return`, async (t) => {
    const registry = await FakeRegistry.start()
    t.teardown(() => registry.close())
    const hot = registry.addImage('deckhouse/ce/hot', [bytes(16 * 1024, 1)])
    const cold: FakeImage[] = Array.from({ length: COLD }, (_, i) => registry.addImage('deckhouse/ce/cold', [bytes(32 * 1024 + i * 1024, 1000 + i)]))
    const dir = t.testdir()
    const configPath = join(dir, 'registry.json')
    writeFileSync(configPath, JSON.stringify({ default: { address: registry.host, path: '/deckhouse/ce', scheme: 'http' } }))
    const proxy = await startBinary({ main: MAIN, configPath, cacheDir: join(dir, 'cache'), limit: '256Mi', memoryProbe: join(dir, 'memory.json') })
    t.teardown(() => proxy.stop(2000))
    const pid = proxy.pid
    const hotUrl = `${proxy.base}/package?digest=${hot.manifestDigest}&path=hot`
    const expectHot = (): string => hot.lastLayer.digest

    // Warm up: the miss, a few hits, and a small load round, so the baseline is a server that
    // has served, not one that has not yet loaded its code paths.
    await keepAliveLoad({ urls: [hotUrl], expect: expectHot, connections: 50, perConnection: 2 })
    await sleep(500)
    /** What the child still holds after a full GC: the JS heap and Buffers. */
    const held = async (): Promise<{ heap: number; rss: number }> => {
      const m = await proxy.memory()
      return { heap: m.heapUsed + m.external, rss: m.rss }
    }
    const heldBaseline = await held()
    const baseline = readProc(pid)
    t.comment(`baseline: ${baseline.fds} descriptors, RSS ${mib(baseline.rssBytes)}, held after GC ${mib(heldBaseline.heap)}`)

    const rss: number[] = []
    const heldAfter: Array<{ heap: number; rss: number }> = []
    for (let round = 1; round <= 2; round++) {
      const sampler = new ProcSampler(pid)
      const started = Date.now()
      const r = await keepAliveLoad({ urls: [hotUrl], expect: expectHot, connections: CONNECTIONS, perConnection: 3 })
      sampler.stop()
      t.comment(
        `hits round ${round}: ${r.requests} requests over ${r.sockets} connections in ${Date.now() - started} ms, ` +
          `p50 ${percentile(r.latencies, 50).toFixed(0)} ms, p99 ${percentile(r.latencies, 99).toFixed(0)} ms; ` +
          `server peak ${sampler.peakFds} descriptors, RSS ${mib(sampler.peakRss)}`,
      )
      t.same(
        { ok: r.ok, wrong: r.wrong, failed: r.failed, errors: r.errors },
        { ok: r.requests, wrong: 0, failed: 0, errors: [] },
        `round ${round}: all ${r.requests} byte-exact`,
      )
      t.ok(r.sockets >= CONNECTIONS, `round ${round}: ${r.sockets} connections were open at once`)
      // The server really held them all: one descriptor each (keep-alive lasts 5 s, the round less).
      t.ok(sampler.peakFds >= baseline.fds + CONNECTIONS * 0.9, `round ${round}: the server held ${sampler.peakFds - baseline.fds} connections at the peak`)
      const fds = await settleFds(pid, baseline.fds, 15_000)
      t.ok(fds <= baseline.fds, `round ${round}: descriptors back to ${fds} (baseline ${baseline.fds})`)
      heldAfter.push(await held())
      rss.push(await settleRss(pid, baseline.rssBytes + RSS_SLACK, 5_000))
    }

    // Cold fills: distinct layers at once; the registry is slow enough that they overlap.
    registry.faults = { blobChunkSize: 16 * 1024, blobChunkDelayMs: 10 }
    registry.resetCounts()
    const urls = cold.map((img) => `${proxy.base}/package?digest=${img.manifestDigest}&path=cold`)
    const layerOf = new Map(cold.map((img, i) => [urls[i] ?? '', img.lastLayer.digest]))
    const sampler = new ProcSampler(pid)
    const started = Date.now()
    const r = await keepAliveLoad({ urls, expect: (url) => layerOf.get(url) ?? '', connections: COLD, perConnection: 1 })
    sampler.stop()
    t.comment(
      `cold fills: ${r.requests} in ${Date.now() - started} ms, p99 ${percentile(r.latencies, 99).toFixed(0)} ms; server peak ${sampler.peakFds} descriptors, RSS ${mib(sampler.peakRss)}`,
    )
    t.same(
      { ok: r.ok, wrong: r.wrong, failed: r.failed, errors: r.errors },
      { ok: COLD, wrong: 0, failed: 0, errors: [] },
      `all ${COLD} cold packages byte-exact`,
    )
    t.equal(registry.counts.blob, COLD, 'one upstream blob GET per package')
    t.equal(registry.counts.manifest, COLD, 'one upstream manifest GET per package')
    // Fills commit after their responses end; then nothing may stay open.
    const fds = await settleFds(pid, baseline.fds, 15_000)
    t.ok(fds <= baseline.fds, `descriptors back to ${fds} after the fills (baseline ${baseline.fds})`)
    heldAfter.push(await held())
    rss.push(await settleRss(pid, baseline.rssBytes + RSS_SLACK, 5_000))
    // Served again, they are hits: the fills were committed.
    registry.resetCounts()
    const again = await keepAliveLoad({ urls, expect: (url) => layerOf.get(url) ?? '', connections: COLD, perConnection: 1 })
    t.equal(again.ok, COLD, 'all served again')
    t.equal(registry.counts.total, 0, 'from the cache, without the registry')
    t.ok((await settleFds(pid, baseline.fds, 15_000)) <= baseline.fds, 'descriptors back after the hits')

    const phases = ['hits round 1', 'hits round 2', 'cold fills']
    t.comment(`after each phase, held after GC: ${heldAfter.map((h, i) => `${phases[i]} ${mib(h.heap)}`).join(', ')} (baseline ${mib(heldBaseline.heap)})`)
    t.comment(
      `RSS after a GC: ${heldAfter.map((h, i) => `${phases[i]} ${mib(h.rss)}`).join(', ')}; idle RSS: ${rss.map((r) => mib(r)).join(', ')} (baseline ${mib(baseline.rssBytes)})`,
    )
    // A leak is what a full GC cannot free: the heap and Buffers held must be back at the
    // baseline (plus noise; the memory cache holds the one 16 KiB hot layer from the start, and
    // the cold layers are measured before they are read back, which puts them in that cache).
    for (const [i, phase] of phases.entries()) {
      t.ok((heldAfter[i]?.heap ?? Infinity) <= heldBaseline.heap + HEAP_SLACK, `${phase}: held memory back within ${mib(HEAP_SLACK)} of the baseline`)
    }
    // RSS is the OS's view: V8 and the allocator keep some pages they grew into (this varies
    // from run to run), so the check is that it does not grow with the work done: no more
    // after the second identical round than after the first, and a bounded distance overall.
    const [r1, r2, r3] = heldAfter.map((h) => h.rss)
    t.ok((r2 ?? Infinity) <= (r1 ?? 0) + 8 * MiB, `RSS after round 2 (${mib(r2 ?? 0)}) is not above round 1 (${mib(r1 ?? 0)})`)
    t.ok(
      Math.max(r1 ?? Infinity, r2 ?? Infinity, r3 ?? Infinity) <= baseline.rssBytes + RSS_SLACK,
      `RSS after a GC stays within ${mib(RSS_SLACK)} of the baseline`,
    )
    t.equal(proxy.child.exitCode, null, 'the proxy is still running')
  })
}

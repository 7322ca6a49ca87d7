/**
 * `npm run bench:peers`: peer fill across three replicas (issue 14, item 6). Three real binaries
 * with `--peers` naming each other and three without, one fake registry in this process. Each
 * round adds a new 32 MiB layer (cold everywhere) and requests it on all three replicas of one
 * trio at once; the two trios alternate, so drift on a shared machine hits both alike. Reports,
 * per mode and registry speed, the registry GETs of the layer and the median time to last byte.
 */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { Agent } from 'node:http'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { FakeRegistry, type FakeImage } from '../tools/sample-registry.js'
import { freePort } from '../tools/net.js'
import { Children, fetchHashed, fmt, KiB, median, MiB, option, pseudoRandom, startProxy } from './lib.js'

type Mode = 'peers' | 'no peers'

/** A per-connection limit like a registry across a WAN: 64 KiB every 2 ms, about 1 s for 32 MiB. */
const SPEEDS = {
  'throttled (64 KiB / 2 ms per connection)': { blobChunkSize: 64 * KiB, blobChunkDelayMs: 2 },
  'full speed (loopback)': {},
} as const
type Speed = keyof typeof SPEEDS

interface Round {
  mode: Mode
  speed: Speed
  /** Registry GETs of the round's layer blob. */
  layerGets: number
  /** Time to last byte of each of the three requests. */
  ttlbMs: number[]
  verified: boolean
}

/** The three replicas of `bases` asked for `image` at the same moment. */
async function round(registry: FakeRegistry, bases: string[], image: FakeImage, path: string, mode: Mode, speed: Speed): Promise<Round> {
  registry.faults = { ...SPEEDS[speed] }
  const blobPath = `/blobs/${image.lastLayer.digest}`
  const before = registry.requests.filter((r) => r.method === 'GET' && r.url.includes(blobPath)).length
  const agent = new Agent({ keepAlive: false })
  try {
    const results = await Promise.all(bases.map((base) => fetchHashed(`${base}/package?digest=${image.manifestDigest}&path=${path}`, agent)))
    return {
      mode,
      speed,
      layerGets: registry.requests.filter((r) => r.method === 'GET' && r.url.includes(blobPath)).length - before,
      ttlbMs: results.map((r) => r.ms),
      verified: results.every((r) => r.status === 200 && r.digest === image.lastLayer.digest),
    }
  } finally {
    registry.faults = {}
    agent.destroy()
  }
}

async function main(): Promise<void> {
  const rounds = option('rounds', 5)
  const children = new Children()
  const tmp = mkdtempSync(join(tmpdir(), 'rpp-bench-peers-'))
  const registry = await FakeRegistry.start()
  try {
    const configPath = join(tmp, 'registry-config.json')
    writeFileSync(configPath, JSON.stringify({ default: { address: registry.host, path: '/bench', scheme: 'http' } }))
    const trios: Record<Mode, string[]> = { peers: [], 'no peers': [] }
    for (const mode of ['peers', 'no peers'] as const) {
      const ports = await Promise.all([freePort(), freePort(), freePort()])
      const members = ports.map((p) => `127.0.0.1:${p}`)
      await Promise.all(
        ports.map((port) =>
          startProxy(children, {
            configPath,
            cacheDir: join(tmp, `cache-${port}`),
            port,
            logFile: join(tmp, `proxy-${port}.log`),
            args: mode === 'peers' ? [`--peers=${members.join(',')}`] : [],
          }),
        ),
      )
      trios[mode] = members.map((m) => `http://${m}`)
    }
    console.log(`6 replicas up, registry on ${registry.url}, scratch in ${tmp}; ${rounds} rounds per mode and speed`)
    const results: Round[] = []
    let n = 0
    for (const speed of Object.keys(SPEEDS) as Speed[]) {
      for (let i = 0; i < rounds; i++) {
        // Alternate which mode goes first, so neither always runs on a warmer machine.
        const order: Mode[] = i % 2 === 0 ? ['peers', 'no peers'] : ['no peers', 'peers']
        for (const mode of order) {
          // Under the registry config's `/bench` path: the package path is the rest.
          const image = registry.addImage(`bench/peers/${n}`, [pseudoRandom(32 * MiB, `bench peers 32 MiB #${n}`)])
          const r = await round(registry, trios[mode], image, `peers/${n}`, mode, speed)
          n++
          results.push(r)
          console.log(
            `${speed}, ${mode}: layer GETs ${r.layerGets}, TTLB ${r.ttlbMs.map((ms) => fmt(ms)).join(' / ')} ms${r.verified ? '' : ' (A BODY DID NOT VERIFY)'}`,
          )
        }
      }
    }
    const lines = [
      '| registry | mode | rounds | registry layer GETs per round (median, max) | median TTLB, all requests (ms) | median TTLB, slowest of the three (ms) | all verified |',
      '|---|---|---|---|---|---|---|',
    ]
    for (const speed of Object.keys(SPEEDS) as Speed[]) {
      for (const mode of ['no peers', 'peers'] as const) {
        const rs = results.filter((r) => r.mode === mode && r.speed === speed)
        const gets = rs.map((r) => r.layerGets)
        lines.push(
          `| ${speed} | ${mode} | ${rs.length} | ${fmt(median(gets), 1)}, ${Math.max(...gets)} | ${fmt(median(rs.flatMap((r) => r.ttlbMs)))} | ${fmt(median(rs.map((r) => Math.max(...r.ttlbMs))))} | ${rs.every((r) => r.verified) ? 'yes' : 'NO'} |`,
        )
      }
    }
    console.log(`\n${lines.join('\n')}`)
  } finally {
    await children.stopAll()
    await registry.close()
    rmSync(tmp, { recursive: true, force: true })
  }
}

main().catch((err: unknown) => {
  console.error(err)
  process.exit(1)
})

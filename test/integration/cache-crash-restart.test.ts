/**
 * kill -9 of the real binary at random moments of mixed cold/hot traffic, many times over the
 * same cache directory. After every restart: no temp file survives, every package is served
 * byte-exact, and the bytes on disk stay within the limit.
 */
import { spawn, type ChildProcess } from 'node:child_process'
import { createHash, createCipheriv } from 'node:crypto'
import { existsSync, readdirSync, statSync, writeFileSync } from 'node:fs'
import { request } from 'node:http'
import { join } from 'node:path'
import t from 'tap'
import { eventually } from '../fixtures/eventually.js'
import { FakeRegistry, type FakeImage } from '../fixtures/fake-registry.js'
import { freePort } from '../fixtures/net.js'

const MAIN = join(import.meta.dirname, '../../dist/main.js')

function bytes(seed: number, size: number): Buffer {
  const key = Buffer.alloc(16, seed)
  return createCipheriv('aes-128-ctr', key, Buffer.alloc(16, 0)).update(Buffer.alloc(size))
}

function get(port: number, path: string): Promise<{ status: number; body: Buffer }> {
  return new Promise((resolve, reject) => {
    const req = request({ host: '127.0.0.1', port, path, agent: false }, (res) => {
      const chunks: Buffer[] = []
      res.on('data', (c: Buffer) => chunks.push(c))
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks) }))
      res.on('error', reject)
      res.on('aborted', () => reject(new Error('aborted')))
    })
    req.on('error', reject)
    req.end()
  })
}

async function waitReady(port: number, child: ChildProcess): Promise<void> {
  await eventually(
    async () => {
      if (child.exitCode !== null) throw new Error(`proxy exited with ${child.exitCode}`)
      return get(port, '/readyz').then(
        (r) => r.status === 200,
        () => false,
      )
    },
    'the proxy is ready',
    { timeoutMs: 15_000, intervalMs: 50 },
  )
}

function diskBytes(dir: string): { blobs: number; temp: number; tempFiles: number } {
  let blobs = 0
  const root = join(dir, 'blobs', 'sha256')
  if (existsSync(root)) {
    for (const shard of readdirSync(root)) for (const f of readdirSync(join(root, shard))) blobs += statSync(join(root, shard, f)).size
  }
  let temp = 0
  let tempFiles = 0
  const tmp = join(dir, 'tmp')
  if (existsSync(tmp)) {
    for (const f of readdirSync(tmp)) {
      temp += statSync(join(tmp, f)).size
      tempFiles++
    }
  }
  return { blobs, temp, tempFiles }
}

if (!existsSync(MAIN)) {
  t.fail('dist/main.js is missing: npm test builds it before tap')
} else {
  void t.test('kill -9 at random moments, then restart and read everything byte-exact', async (t) => {
    const registry = await FakeRegistry.start()
    t.teardown(() => registry.close())
    // Slow enough that most kills land mid-fill on a fast machine too: 64 KiB every 20 ms
    // (~3 MB/s), so a 1 MB layer takes ~300 ms to fill.
    registry.faults.blobChunkDelayMs = 20
    registry.faults.blobChunkSize = 64 * 1024
    const sizes = [150_000, 400_000, 700_000, 1_000_000, 1_300_000, 250_000, 900_000, 600_000]
    const images: FakeImage[] = sizes.map((size, i) => registry.addImage(`deckhouse/ce/p${i}`, [bytes(i + 1, size)]))
    const limit = 3_000_000
    const dir = t.testdir()
    const cache = join(dir, 'cache')
    const config = join(dir, 'config.json')
    writeFileSync(config, JSON.stringify({ default: { address: registry.host, path: '/deckhouse/ce', scheme: 'http' } }))
    let child: ChildProcess | undefined
    t.teardown(() => {
      child?.kill('SIGKILL')
    })
    const start = async (): Promise<number> => {
      const port = await freePort()
      child = spawn(
        process.execPath,
        [
          MAIN,
          `--listen-address=127.0.0.1:${port}`,
          `--cache-directory=${cache}`,
          `--cache-retention-size=${limit}`,
          `--registry-config=${config}`,
          '--log-level=error',
        ],
        {
          stdio: ['ignore', 'ignore', 'pipe'],
          // Never in-cluster mode, even when the tests themselves run in a pod.
          env: Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('KUBERNETES_') && !k.startsWith('RPP_'))),
        },
      )
      await waitReady(port, child)
      return port
    }
    const url = (img: FakeImage, i: number): string => `/package?digest=${img.manifestDigest}&path=p${i}`
    // At least 10 rounds, and more (up to 40) until 4 kills have landed mid-fill: the moment
    // is random, so how many land in a fill depends on the machine's speed.
    const minRounds = 10
    const minKillsMidFill = 4
    let seed = 12345
    const random = (): number => {
      seed = (seed * 1103515245 + 12345) % 2 ** 31
      return seed / 2 ** 31
    }
    let killsMidFill = 0
    let round = 0
    for (; round < minRounds || (killsMidFill < minKillsMidFill && round < 40); round++) {
      const port = await start()
      // Reconciliation ran before ready: no partial file may survive a crash.
      t.equal(diskBytes(cache).tempFiles, 0, `round ${round}: no temp files after restart`)
      // Mixed traffic: a few concurrent requests over random packages, then a kill at a random moment.
      const inflight = Array.from({ length: 5 }, () => {
        const i = Math.floor(random() * images.length)
        const img = images[i]!
        return get(port, url(img, i)).then(
          (r) => {
            // A response that completed must be exactly right.
            if (r.status === 200) t.ok(r.body.equals(img.lastLayer.data), `round ${round}: p${i} complete and exact`)
          },
          () => undefined,
        )
      })
      await new Promise((r) => setTimeout(r, Math.floor(random() * 400)))
      const killed = child!
      killed.kill('SIGKILL')
      await new Promise((r) => killed.once('exit', r))
      await Promise.all(inflight)
      const d = diskBytes(cache)
      if (d.tempFiles > 0) killsMidFill++
      t.ok(d.blobs + d.temp <= limit, `round ${round}: ${d.blobs + d.temp} bytes on disk <= ${limit} at the kill`)
    }
    // Otherwise the test proves nothing about crashes during fills.
    t.ok(killsMidFill >= minKillsMidFill, `${killsMidFill} of ${round} kills landed while a fill was writing`)
    // Final restart: every package byte-exact, sequentially, with the cap checked after each.
    const port = await start()
    t.equal(diskBytes(cache).tempFiles, 0, 'no temp files after the last restart')
    for (const [i, img] of images.entries()) {
      const r = await get(port, url(img, i))
      t.equal(r.status, 200, `p${i} status`)
      t.equal(createHash('sha256').update(r.body).digest('hex'), img.lastLayer.digest.slice(7), `p${i} byte-exact`)
      const d = diskBytes(cache)
      t.ok(d.blobs + d.temp <= limit, `cap holds after p${i}: ${d.blobs + d.temp}`)
    }
    child?.kill('SIGTERM')
    await new Promise((r) => child?.once('exit', r))
  })
}

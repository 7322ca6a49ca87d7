/**
 * The package core's promises, tried on the real binary the way an SRE would: a herd right
 * after a restart, clients that stop reading, eviction and DELETE under readers, a file damaged
 * while the proxy was down, and clients of layers that cannot be cached. Memory comes from
 * /proc/<pid>/status; the cache folder's bytes include deleted files the process holds open.
 * The memory bounds here are the deployment's safety margins (limit 512Mi), not benchmarks:
 * BENCHMARKS.md has the measured figures.
 */
import { createHash, randomBytes } from 'node:crypto'
import { closeSync, openSync, readFileSync, readSync, utimesSync, writeFileSync, writeSync } from 'node:fs'
import * as http from 'node:http'
import type { Socket } from 'node:net'
import { join } from 'node:path'
import t from 'tap'
import { eventually } from '../fixtures/eventually.js'
import { FakeRegistry } from '../fixtures/fake-registry.js'
import { bytes, packageUrl, sha256 } from '../fixtures/proxy-harness.js'
import { cacheFolderBytes, memoryOf, resetPeak, stalledClient, startProxyProcess, type ProxyProcess } from '../fixtures/proxy-process.js'

const MiB = 1024 * 1024
/** Well under the Deployment's 512Mi limit: the old code reached 883 MiB and 412 MiB here. */
const RSS_BOUND = 250 * MiB

/** GETs `path`, hashing the body; `complete` is false when the connection broke before its end. */
async function fetchHashed(base: string, path: string): Promise<{ status: number; digest: string; length: number; complete: boolean; cache: string | null }> {
  const res = await fetch(`${base}${path}`)
  const hash = createHash('sha256')
  let length = 0
  let complete = true
  try {
    for await (const chunk of res.body ?? []) {
      hash.update(chunk)
      length += chunk.length
    }
  } catch {
    complete = false
  }
  return { status: res.status, digest: `sha256:${hash.digest('hex')}`, length, complete, cache: res.headers.get('x-cache') }
}

async function cacheState(p: ProxyProcess): Promise<Record<string, number>> {
  return (await (await fetch(`${p.base}/cache?limit=0`)).json()) as Record<string, number>
}

/** Waits on the child through its HTTP API: less often, and longer, than the default. */
const WAIT = { timeoutMs: 15_000, intervalMs: 50 }

async function cached(p: ProxyProcess, layerDigest: string): Promise<boolean> {
  return (await fetch(`${p.base}/cache/${layerDigest}`)).status === 200
}

void t.test('100 concurrent first hits right after a restart: one read of the file, bounded memory, every body exact', async (t) => {
  const registry = await FakeRegistry.start()
  t.teardown(() => registry.close())
  const image = registry.addImage('deckhouse/ce/herd', [bytes(8 * MiB, 501)])
  const url = packageUrl({ digest: image.manifestDigest, path: 'herd' })
  const cacheDirectory = join(t.testdirName, 'cache')
  t.testdir()
  const first = await startProxyProcess(t, { registry, cacheDirectory })
  t.equal((await fetchHashed(first.base, url)).digest, image.lastLayer.digest)
  await eventually(() => cached(first, image.lastLayer.digest), 'the layer is cached', WAIT)
  await first.stop()

  const p = await startProxyProcess(t, { registry, cacheDirectory })
  registry.resetCounts()
  const peakResettable = resetPeak(p.pid)
  const before = memoryOf(p.pid).rss
  const replies = await Promise.all(Array.from({ length: 100 }, () => fetchHashed(p.base, url)))
  const peak = memoryOf(p.pid).peak
  t.ok(
    replies.every((r) => r.status === 200 && r.complete && r.digest === image.lastLayer.digest),
    'all 100 bodies complete and exact',
  )
  t.equal(registry.counts.blob, 0, 'all hits: the registry saw no layer request')
  t.comment(`RSS ${(before / MiB).toFixed(0)} MiB before, peak ${(peak / MiB).toFixed(0)} MiB during the herd (peak reset: ${peakResettable})`)
  t.ok(peak < RSS_BOUND, `peak RSS ${(peak / MiB).toFixed(0)} MiB < ${RSS_BOUND / MiB} MiB`)
})

void t.test('150 clients that stop reading a cached 24 MiB package: memory stays bounded; they cost no more once gone', async (t) => {
  const registry = await FakeRegistry.start()
  t.teardown(() => registry.close())
  const image = registry.addImage('deckhouse/ce/stall', [bytes(24 * MiB, 502)])
  const url = packageUrl({ digest: image.manifestDigest, path: 'stall' })
  t.testdir()
  const cacheDirectory = join(t.testdirName, 'cache')
  const first = await startProxyProcess(t, { registry, cacheDirectory })
  t.equal((await fetchHashed(first.base, url)).digest, image.lastLayer.digest)
  await eventually(() => cached(first, image.lastLayer.digest), 'the layer is cached', WAIT)
  await first.stop()
  // The package is cached, as it is on a master that has run for a while.
  const p = await startProxyProcess(t, { registry, cacheDirectory })
  resetPeak(p.pid)
  t.comment(`RSS before the stalled readers: ${(memoryOf(p.pid).rss / MiB).toFixed(0)} MiB`)
  const sockets: Socket[] = []
  t.teardown(() => sockets.forEach((s) => s.destroy()))
  for (let i = 0; i < 150; i++) sockets.push(await stalledClient(p.port, url))
  // Every response has filled its socket and stopped at its stream's backpressure; watch the
  // process for a while as monitoring would.
  let peak = 0
  for (let i = 0; i < 20; i++) {
    peak = Math.max(peak, memoryOf(p.pid).peak)
    await new Promise((r) => setTimeout(r, 100))
  }
  t.comment(`peak RSS with 150 stalled readers: ${(peak / MiB).toFixed(0)} MiB`)
  t.ok(peak < RSS_BOUND, `peak RSS ${(peak / MiB).toFixed(0)} MiB < ${RSS_BOUND / MiB} MiB`)
  for (const s of sockets) s.destroy()
  await eventually(async () => (await cacheState(p)).heldBytes === 0, 'the readers are gone', WAIT)
  t.equal((await fetchHashed(p.base, url)).digest, image.lastLayer.digest, 'still served exactly')
})

void t.test('eviction under a slow reader: the reader keeps its entry, the folder never holds more than the cap', async (t) => {
  const registry = await FakeRegistry.start()
  t.teardown(() => registry.close())
  const a = registry.addImage('deckhouse/ce/a', [bytes(20 * MiB, 503)])
  const b = registry.addImage('deckhouse/ce/b', [bytes(20 * MiB, 504)])
  t.testdir()
  const cacheDirectory = join(t.testdirName, 'cache')
  const p = await startProxyProcess(t, { registry, cacheDirectory, retention: '30Mi' })
  const cap = 30 * MiB
  let worst = 0
  const sampler = setInterval(() => {
    const { files, deletedOpen } = cacheFolderBytes(p.pid, cacheDirectory)
    worst = Math.max(worst, files + deletedOpen)
  }, 5)
  t.teardown(() => clearInterval(sampler))
  // A reads slowly, following its fill; it is still reading when the fill commits.
  const slow = await stalledClient(p.port, packageUrl({ digest: a.manifestDigest, path: 'a' }))
  t.teardown(() => slow.destroy())
  await eventually(() => cached(p, a.lastLayer.digest), 'A is committed while its reader is still on it', WAIT)
  const replyB = await fetchHashed(p.base, packageUrl({ digest: b.manifestDigest, path: 'b' }))
  t.same([replyB.status, replyB.complete, replyB.digest], [200, true, b.lastLayer.digest], 'B is served exactly')
  t.equal(replyB.cache, 'BYPASS', 'without caching: the only room is held by a reader')
  t.ok(await cached(p, a.lastLayer.digest), 'A stays: it is being read')
  slow.resume()
  await new Promise((resolve) => slow.once('end', resolve).once('close', resolve))
  clearInterval(sampler)
  t.ok(worst <= cap, `the folder held at most ${(worst / MiB).toFixed(1)} MiB (files and deleted-but-open) <= 30 MiB`)
  const state = await cacheState(p)
  t.equal(state.usedBytes, 20 * MiB, 'the books hold A alone')
})

void t.test('DELETE during a read, then a refill: exact books, the removal counted, the old bytes freed when the reader goes', async (t) => {
  const registry = await FakeRegistry.start()
  t.teardown(() => registry.close())
  const image = registry.addImage('deckhouse/ce/del', [bytes(12 * MiB, 505)])
  const url = packageUrl({ digest: image.manifestDigest, path: 'del' })
  t.testdir()
  const cacheDirectory = join(t.testdirName, 'cache')
  const p = await startProxyProcess(t, { registry, cacheDirectory })
  t.equal((await fetchHashed(p.base, url)).digest, image.lastLayer.digest)
  await eventually(() => cached(p, image.lastLayer.digest), 'cached', WAIT)
  const reader = await stalledClient(p.port, url)
  t.teardown(() => reader.destroy())
  const token = readFileSync(join(cacheDirectory, 'admin-token'), 'utf8').trim()
  const del = await fetch(`${p.base}/cache/${image.lastLayer.digest}`, { method: 'DELETE', headers: { 'x-cache-token': token } })
  t.equal(del.status, 200, 'deleted')
  let state = await cacheState(p)
  t.same([state.usedBytes, state.heldBytes, state.entries], [0, 12 * MiB, 0], 'out of service, its bytes still held for the reader')
  const again = await fetchHashed(p.base, url)
  t.same([again.status, again.digest, again.cache], [200, image.lastLayer.digest, 'MISS'], 'the refill is a miss, exact')
  await eventually(() => cached(p, image.lastLayer.digest), 'refilled', WAIT)
  state = await cacheState(p)
  t.same([state.usedBytes, state.heldBytes], [12 * MiB, 12 * MiB], 'both files on disk, both counted')
  const onDisk = cacheFolderBytes(p.pid, cacheDirectory)
  t.equal(onDisk.files + onDisk.deletedOpen, 24 * MiB, 'and that is what the folder holds')
  reader.destroy()
  await eventually(async () => (await cacheState(p)).heldBytes === 0, 'the old file is released', WAIT)
  state = await cacheState(p)
  t.same([state.usedBytes, state.entries], [12 * MiB, 1], 'one entry, counted once')
  const metrics = await (await fetch(`${p.base}/metrics`)).text()
  t.match(metrics, /registry_packages_proxy_evictions_total\{reason="deleted"\} 1\b/, 'the removal is counted')
  t.match(metrics, new RegExp(`registry_packages_proxy_evicted_bytes_total\\{reason="deleted"\\} ${12 * MiB}\\b`))
  t.match(metrics, /registry_packages_proxy_cache_held_bytes 0\b/)
})

void t.test('a file damaged while the proxy was down is never served whole, and is replaced', async (t) => {
  const registry = await FakeRegistry.start()
  t.teardown(() => registry.close())
  // One for the memory path (read whole and hashed), one for the disk path (hashed as it streams).
  const small = registry.addImage('deckhouse/ce/small', [bytes(1 * MiB, 506)])
  const large = registry.addImage('deckhouse/ce/large', [bytes(12 * MiB, 507)])
  t.testdir()
  const cacheDirectory = join(t.testdirName, 'cache')
  const first = await startProxyProcess(t, { registry, cacheDirectory })
  for (const [image, path] of [
    [small, 'small'],
    [large, 'large'],
  ] as const) {
    t.equal((await fetchHashed(first.base, packageUrl({ digest: image.manifestDigest, path }))).digest, image.lastLayer.digest)
    await eventually(() => cached(first, image.lastLayer.digest), `${path} cached`, WAIT)
  }
  await first.stop()
  // A torn write: the right size, other bytes in the middle.
  for (const image of [small, large]) {
    const hex = image.lastLayer.digest.slice('sha256:'.length)
    const file = join(cacheDirectory, 'blobs', 'sha256', hex.slice(0, 2), hex)
    const data = readFileSync(file)
    data.fill(0, 4096, 8192)
    writeFileSync(file, data)
    t.not(sha256(data), image.lastLayer.digest, 'the file no longer matches')
  }
  const p = await startProxyProcess(t, { registry, cacheDirectory })
  const s = await fetchHashed(p.base, packageUrl({ digest: small.manifestDigest, path: 'small' }))
  t.same([s.status, s.complete, s.digest], [200, true, small.lastLayer.digest], 'small: the damage is found before a byte goes out; served from the registry')
  registry.resetCounts()
  const l1 = await fetchHashed(p.base, packageUrl({ digest: large.manifestDigest, path: 'large' }))
  t.same(
    [l1.status, l1.complete, l1.digest, l1.cache],
    [200, true, large.lastLayer.digest, 'MISS'],
    'large: hashed before its first byte, found damaged, served from the registry',
  )
  t.equal(registry.counts.blob, 1, 'one registry download replaced it')
  await eventually(() => cached(p, large.lastLayer.digest), 'cached again', WAIT)
  const l2 = await fetchHashed(p.base, packageUrl({ digest: large.manifestDigest, path: 'large' }))
  t.same([l2.status, l2.complete, l2.digest, l2.cache], [200, true, large.lastLayer.digest, 'HIT'], 'large, next read: an exact hit')
  const metrics = await (await fetch(`${p.base}/metrics`)).text()
  t.match(metrics, /registry_packages_proxy_evictions_total\{reason="corrupt"\} 2\b/, 'both removals counted as corrupt')
})

void t.test('a cached file written to while the proxy runs is hashed again before it is served, and replaced', async (t) => {
  const registry = await FakeRegistry.start()
  t.teardown(() => registry.close())
  const image = registry.addImage('deckhouse/ce/live', [bytes(12 * MiB, 510)])
  const url = packageUrl({ digest: image.manifestDigest, path: 'live' })
  t.testdir()
  const cacheDirectory = join(t.testdirName, 'cache')
  const p = await startProxyProcess(t, { registry, cacheDirectory })
  t.equal((await fetchHashed(p.base, url)).digest, image.lastLayer.digest, 'a miss')
  await eventually(() => cached(p, image.lastLayer.digest), 'cached', WAIT)
  t.same((await fetchHashed(p.base, url)).cache, 'HIT', 'a hit from the file')
  // A stray hand (or a tool) changes bytes in place: same size, same inode.
  const hex = image.lastLayer.digest.slice('sha256:'.length)
  const file = join(cacheDirectory, 'blobs', 'sha256', hex.slice(0, 2), hex)
  const data = readFileSync(file)
  data[6 * MiB] = (data[6 * MiB] ?? 0) ^ 0xff
  writeFileSync(file, data)
  registry.resetCounts()
  const after = await fetchHashed(p.base, url)
  t.same(
    [after.status, after.complete, after.digest, after.cache],
    [200, true, image.lastLayer.digest, 'MISS'],
    'never the changed bytes: found before a byte went out, fetched again',
  )
  t.equal(registry.counts.blob, 1)
})

/**
 * GETs `url` (optionally a Range) reading one chunk, then nothing until `whilePaused` is done,
 * then the rest: whether the body came whole and its sha256.
 */
function pausedGet(
  base: string,
  url: string,
  whilePaused: () => void,
  range?: string,
): Promise<{ status: number; complete: boolean; digest: string; length: number }> {
  return new Promise((resolve, reject) => {
    const req = http.get(`${base}${url}`, { agent: false, headers: range ? { range } : {} }, (res) => {
      const hash = createHash('sha256')
      let length = 0
      let paused = false
      res.on('data', (c: Buffer) => {
        hash.update(c)
        length += c.length
        if (paused) return
        paused = true
        res.pause()
        // Long enough for the proxy to fill the socket and wait on it.
        setTimeout(() => {
          whilePaused()
          res.resume()
        }, 300)
      })
      let settled = false
      const done = (): void => {
        if (settled) return
        settled = true
        resolve({ status: res.statusCode ?? 0, complete: res.complete, digest: `sha256:${hash.digest('hex')}`, length })
      }
      res.on('end', done)
      res.on('error', done)
      res.on('close', done)
    })
    req.on('error', reject)
  })
}

void t.test('a cached file written to in place while it is being sent: the response is cut off, never a whole 200 of other bytes', async (t) => {
  const registry = await FakeRegistry.start()
  t.teardown(() => registry.close())
  const layer = bytes(12 * MiB, 511)
  const image = registry.addImage('deckhouse/ce/sent', [layer])
  const url = packageUrl({ digest: image.manifestDigest, path: 'sent' })
  t.testdir()
  const cacheDirectory = join(t.testdirName, 'cache')
  const p = await startProxyProcess(t, { registry, cacheDirectory })
  t.equal((await fetchHashed(p.base, url)).digest, image.lastLayer.digest, 'a miss')
  await eventually(() => cached(p, image.lastLayer.digest), 'cached', WAIT)
  const hex = image.lastLayer.digest.slice('sha256:'.length)
  const file = join(cacheDirectory, 'blobs', 'sha256', hex.slice(0, 2), hex)
  // One byte near the end, changed in place (same inode, same size) while the client waits.
  const flip = (at: number): void => {
    const fd = openSync(file, 'r+')
    const b = Buffer.alloc(1)
    readSync(fd, b, 0, 1, at)
    b[0] = (b[0] ?? 0) ^ 0xff
    writeSync(fd, b, 0, 1, at)
    closeSync(fd)
  }
  for (const [name, range] of [
    ['a whole GET (the fast path)', undefined],
    ['a Range GET (the hapi route)', `bytes=0-${12 * MiB - 2}`],
  ] as const) {
    // Put the file right again (and stamped again by a hit that hashes it) before each round.
    const pristine = await fetchHashed(p.base, url)
    t.equal(pristine.digest, image.lastLayer.digest, `${name}: starts from exact bytes`)
    const r = await pausedGet(p.base, url, () => flip(12 * MiB - 1000), range)
    t.ok(r.status === 200 || r.status === 206, `${name}: the response started (${r.status})`)
    t.notOk(r.complete, `${name}: cut off before its end (${r.length} bytes), never completed`)
    const after = await fetchHashed(p.base, url)
    t.same(
      [after.status, after.complete, after.digest],
      [200, true, image.lastLayer.digest],
      `${name}: the next GET hashes the file again and serves exact bytes`,
    )
  }
})

void t.test('a Range of a large cached file to a client that pauses: whole and exact, never cut off by the end-of-send check', async (t) => {
  const registry = await FakeRegistry.start()
  t.teardown(() => registry.close())
  const layer = bytes(12 * MiB, 513)
  const image = registry.addImage('deckhouse/ce/pause', [layer])
  const url = packageUrl({ digest: image.manifestDigest, path: 'pause' })
  t.testdir()
  const p = await startProxyProcess(t, { registry, cacheDirectory: join(t.testdirName, 'cache') })
  t.equal((await fetchHashed(p.base, url)).digest, image.lastLayer.digest, 'a miss')
  await eventually(() => cached(p, image.lastLayer.digest), 'cached', WAIT)
  const want = `sha256:${createHash('sha256')
    .update(layer.subarray(0, 12 * MiB - 1))
    .digest('hex')}`
  for (let i = 0; i < 3; i++) {
    // The file is read to its end and closed while the last chunks wait for the client.
    const r = await pausedGet(p.base, url, () => undefined, `bytes=0-${12 * MiB - 2}`)
    t.same([r.status, r.complete, r.length, r.digest], [206, true, 12 * MiB - 1, want], `round ${i + 1}: a whole, exact 206`)
  }
})

void t.test('a request that joins a hash begun before the file was written to is never sent the changed bytes whole', async (t) => {
  const registry = await FakeRegistry.start()
  t.teardown(() => registry.close())
  const layer = bytes(32 * MiB, 512)
  const image = registry.addImage('deckhouse/ce/race', [layer])
  const url = packageUrl({ digest: image.manifestDigest, path: 'race' })
  t.testdir()
  const cacheDirectory = join(t.testdirName, 'cache')
  const p = await startProxyProcess(t, { registry, cacheDirectory })
  const hex = image.lastLayer.digest.slice('sha256:'.length)
  const file = join(cacheDirectory, 'blobs', 'sha256', hex.slice(0, 2), hex)
  const writeAt0 = (data: Buffer): void => {
    const fd = openSync(file, 'r+')
    writeSync(fd, data, 0, data.length, 0)
    closeSync(fd)
  }
  let wrong = 0
  let rounds = 0
  for (const delayMs of [5, 10, 20, 5, 10, 20]) {
    // A cached, exact file whose times say "hash me before serving" (found from outside).
    if ((await fetchHashed(p.base, url)).digest !== image.lastLayer.digest) t.fail('the set-up GET is exact')
    await eventually(() => cached(p, image.lastLayer.digest), 'cached', WAIT)
    const old = new Date(Date.now() - 10_000)
    utimesSync(file, old, old)
    // A opens and starts the hash; the first 4 KiB, already hashed, then change; B opens after.
    const a = fetchHashed(p.base, url)
    await new Promise((r) => setTimeout(r, delayMs))
    writeAt0(randomBytes(4096))
    const b = fetchHashed(p.base, url)
    for (const r of await Promise.all([a, b])) {
      if (r.status === 200 && r.complete && r.digest !== image.lastLayer.digest) wrong++
    }
    rounds++
    // Put the bytes right for the next round (the proxy may also have removed the file).
    try {
      writeAt0(layer.subarray(0, 4096))
    } catch {
      // removed as corrupt: the next round's GET fetches it again
    }
  }
  t.equal(wrong, 0, `${rounds} rounds of two requests: no complete 200 of changed bytes`)
})

for (const mode of ['bigger than the cache', '--disable-cache'] as const) {
  void t.test(`clients of a layer that cannot be cached (${mode}) share one registry download`, async (t) => {
    const registry = await FakeRegistry.start()
    t.teardown(() => registry.close())
    const image = registry.addImage('deckhouse/ce/big', [bytes(4 * MiB, 508)])
    // The registry answers the layer only after 1.5 s, so every client has joined before its first
    // byte (a loaded CI machine spreads 20 connections over more than the window's 160 ms).
    registry.faults = { blobDelayMs: 1500, blobChunkSize: 256 * 1024, blobChunkDelayMs: 20 }
    t.testdir()
    const args = mode === '--disable-cache' ? ['--disable-cache'] : []
    const p = await startProxyProcess(t, { registry, cacheDirectory: join(t.testdirName, 'cache'), retention: '1Mi', args })
    const url = packageUrl({ digest: image.manifestDigest, path: 'big' })
    const replies = await Promise.all(Array.from({ length: 20 }, () => fetchHashed(p.base, url)))
    t.ok(
      replies.every((r) => r.status === 200 && r.complete && r.digest === image.lastLayer.digest),
      'all 20 bodies complete and exact',
    )
    t.equal(registry.counts.blob, 1, 'one registry download for all of them')
    t.equal(replies.filter((r) => r.cache === 'BYPASS').length, 1, 'one started it; the others joined')
  })
}

void t.test('a stalled client of a shared uncached download is cut off; the others finish', async (t) => {
  const registry = await FakeRegistry.start()
  t.teardown(() => registry.close())
  const image = registry.addImage('deckhouse/ce/lag', [bytes(16 * MiB, 509)])
  // The layer's headers come after 1.5 s: both clients have joined the one download by then
  // (a loaded machine must not make the second one start its own).
  registry.faults = { blobDelayMs: 1500, blobChunkSize: 256 * 1024, blobChunkDelayMs: 5 }
  t.testdir()
  const p = await startProxyProcess(t, { registry, cacheDirectory: join(t.testdirName, 'cache'), args: ['--disable-cache'] })
  const url = packageUrl({ digest: image.manifestDigest, path: 'lag' })
  const began = Date.now()
  const stalling = stalledClient(p.port, url)
  const reading = fetchHashed(p.base, url)
  const stalled = await stalling
  t.teardown(() => stalled.destroy())
  let received = 0
  stalled.on('data', (c: Buffer) => (received += c.length))
  const closed = new Promise<void>((resolve) => stalled.once('close', () => resolve()))
  const reader = await reading
  t.same([reader.status, reader.complete, reader.digest], [200, true, image.lastLayer.digest], 'the reading client gets every byte')
  const ms = Date.now() - began
  t.ok(ms < 30_000, `it waited ${ms} ms for the stalled one: bounded (10 s cut-off)`)
  // Reading again, it finds what the kernel buffered and then the end of a cut connection.
  stalled.resume()
  await closed
  t.ok(received < image.lastLayer.data.length, `the stalled client was cut off after ${received} bytes (of ${image.lastLayer.data.length} and headers)`)
  t.equal(registry.counts.blob, 1, 'still one registry download')
})

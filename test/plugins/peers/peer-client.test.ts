/**
 * The peer client's bounds on plain HTTP: a peer that answers, but too slowly to be worth
 * waiting for (a byte a second), is given up within a total deadline and counted as a
 * `timeout`, for layers and manifests alike; an address that cannot be a URL is a peer that
 * failed, never an exception.
 */
import { createHash } from 'node:crypto'
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http'
import type { Socket } from 'node:net'
import t, { type Test } from 'tap'
import type { TempFile } from '../../../plugins/packages/cache/blob-store.js'
import { PeerClient, type PeerResult } from '../../../plugins/peers/peer-client.js'

/** A peer stand-in; `serve` decides what it does with each request. */
async function fakePeer(t: Test, serve: (req: IncomingMessage, res: ServerResponse) => void): Promise<string> {
  const sockets = new Set<Socket>()
  const timers = new Set<NodeJS.Timeout>()
  const server: Server = createServer(serve)
  server.on('connection', (s: Socket) => {
    sockets.add(s)
    s.once('close', () => sockets.delete(s))
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  t.teardown(async () => {
    for (const timer of timers) clearInterval(timer)
    for (const s of sockets) s.destroy()
    await new Promise<void>((resolve) => server.close(() => resolve()))
  })
  const address = server.address()
  if (!address || typeof address === 'string') throw new Error('no address')
  return `127.0.0.1:${address.port}`
}

/** Sends `length` in the headers, then one byte every `everyMs` (never the whole body in time). */
function trickle(res: ServerResponse, length: number, everyMs: number, headers: Record<string, string> = {}): void {
  res.writeHead(200, { 'Content-Length': String(length), ...headers })
  const timer = setInterval(() => {
    if (res.destroyed) clearInterval(timer)
    else res.write(Buffer.from('{'))
  }, everyMs)
  res.once('close', () => clearInterval(timer))
}

/** A temp file in memory. */
function memoryFile(): TempFile {
  return {
    write: (buffer, offset, length) => Promise.resolve({ bytesWritten: Math.min(length, buffer.length - offset) }),
    read: () => Promise.resolve({ bytesRead: 0 }),
    sync: () => Promise.resolve(),
    close: () => Promise.resolve(),
  }
}

/** `promise`, or 'hung' after `ms`. */
function within<T>(promise: Promise<T>, ms: number): Promise<T | 'hung'> {
  let timer: NodeJS.Timeout | undefined
  return Promise.race([promise, new Promise<'hung'>((resolve) => (timer = setTimeout(() => resolve('hung'), ms)))]).finally(() => clearTimeout(timer))
}

const LAYER = { digest: `sha256:${'a'.repeat(64)}`, size: 64 * 1024, mediaType: '' }
const REQUEST = { digest: `sha256:${'b'.repeat(64)}`, from: 'client' as const }

void t.test('a peer that trickles a layer (a byte every 50 ms) is given up within a total deadline, as a timeout', async (t) => {
  const member = await fakePeer(t, (_req, res) => trickle(res, LAYER.size, 50))
  const client = new PeerClient({ firstByteMs: 300, idleMs: 300 })
  t.teardown(() => client.close())
  const began = Date.now()
  const result = await within(client.layer(member, REQUEST, 'fill', LAYER, memoryFile(), new AbortController().signal), 5000)
  t.equal(result, 'timeout', 'counted as a timeout, not a hang')
  t.ok(Date.now() - began < 3000, `given up in ${Date.now() - began} ms`)
})

void t.test('the total deadline grows with the size: a peer sending at a fair rate is not cut', async (t) => {
  const body = Buffer.alloc(256 * 1024, 1)
  const digest = `sha256:${createHash('sha256').update(body).digest('hex')}`
  // 16 KiB every 50 ms: ~320 KiB/s, 0.8 s for the layer, well past the 300 ms bounds alone.
  const member = await fakePeer(t, (_req, res) => {
    res.writeHead(200, { 'Content-Length': String(body.length) })
    let at = 0
    const timer = setInterval(() => {
      res.write(body.subarray(at, at + 16 * 1024))
      at += 16 * 1024
      if (at >= body.length) {
        clearInterval(timer)
        res.end()
      }
    }, 50)
    res.once('close', () => clearInterval(timer))
  })
  const client = new PeerClient({ firstByteMs: 300, idleMs: 300, minBytesPerSecond: 128 * 1024 })
  t.teardown(() => client.close())
  const result = await client.layer(member, REQUEST, 'fill', { digest, size: body.length, mediaType: '' }, memoryFile(), new AbortController().signal)
  t.equal(result, 'ok')
})

void t.test('no peer transfer runs longer than maxTransferMs, however large the layer', async (t) => {
  const member = await fakePeer(t, (_req, res) => trickle(res, 1024 * 1024 * 1024, 50))
  const client = new PeerClient({ firstByteMs: 300, idleMs: 300, maxTransferMs: 800 })
  t.teardown(() => client.close())
  const began = Date.now()
  const result = await within(client.layer(member, REQUEST, 'fill', { ...LAYER, size: 1024 * 1024 * 1024 }, memoryFile(), new AbortController().signal), 5000)
  t.equal(result, 'timeout')
  t.ok(Date.now() - began < 2000, `given up in ${Date.now() - began} ms`)
})

void t.test('a peer that trickles a manifest is given up within --peer-timeout bounds, as a timeout', async (t) => {
  const member = await fakePeer(t, (_req, res) => trickle(res, 4096, 50, { 'Content-Type': 'application/vnd.oci.image.manifest.v1+json' }))
  const client = new PeerClient({ firstByteMs: 300, idleMs: 300 })
  t.teardown(() => client.close())
  const began = Date.now()
  // No signal at all, as the package core asked before.
  const answer = await within(client.manifest(member, `sha256:${'c'.repeat(64)}`), 5000)
  t.same(answer, { result: 'timeout' })
  t.ok(Date.now() - began < 2000, `given up in ${Date.now() - began} ms`)
})

void t.test('a member that cannot be a URL is a peer that failed, not an exception', async (t) => {
  const client = new PeerClient({ firstByteMs: 300, idleMs: 300 })
  t.teardown(() => client.close())
  for (const member of ['10.0.0.256:5080', '1.2.3.4.5:80']) {
    const results: PeerResult[] = [
      await client.layer(member, REQUEST, 'fill', LAYER, memoryFile(), new AbortController().signal),
      (await client.manifest(member, `sha256:${'c'.repeat(64)}`)).result,
    ]
    t.same(results, ['unreachable', 'unreachable'], member)
  }
})

import { createHash } from 'node:crypto'
import { closeSync, openSync, writeFileSync } from 'node:fs'
import { createServer, get, type Server } from 'node:http'
import type { AddressInfo } from 'node:net'
import { join } from 'node:path'
import t from 'tap'
import { ReadBuffers, sendFile } from '../../../plugins/packages/file-sender.js'

const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex')

function pattern(size: number, seed: number): Buffer {
  const b = Buffer.allocUnsafe(size)
  for (let i = 0; i < size; i++) b[i] = (i * 31 + seed * 7 + (i >> 11)) & 0xff
  return b
}

/** A server that sends `file` bytes start..end with sendFile; `done` tells how each send ended. */
async function serve(
  t: { teardown: (fn: () => unknown) => void },
  file: string,
  start: number,
  end: number,
  buffers: ReadBuffers,
  declared = end - start + 1,
  unchanged?: () => boolean,
) {
  const ends: Array<Error | undefined> = []
  const server: Server = createServer((_req, res) => {
    const fd = openSync(file, 'r')
    res.writeHead(200, { 'content-length': String(declared) })
    sendFile(
      res,
      (f) => res.once('close', f),
      fd,
      start,
      end,
      buffers,
      (err) => {
        ends.push(err)
        closeSync(fd)
      },
      unchanged,
    )
  })
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r))
  t.teardown(() => new Promise<void>((r) => server.close(() => r())))
  return { url: `http://127.0.0.1:${(server.address() as AddressInfo).port}/`, ends }
}

function fetch(url: string): Promise<{ body: Buffer; complete: boolean }> {
  return new Promise((resolve, reject) => {
    get(url, (res) => {
      const chunks: Buffer[] = []
      res.on('data', (c: Buffer) => chunks.push(c))
      res.on('end', () => resolve({ body: Buffer.concat(chunks), complete: res.complete }))
      res.on('error', () => resolve({ body: Buffer.concat(chunks), complete: false }))
    }).on('error', reject)
  })
}

void t.test('sends the exact bytes of a range, in large and small reads, and gives every buffer back', async (t) => {
  t.teardown(() => undefined)
  const dir = t.testdir()
  const data = pattern(5 * 1024 * 1024 + 12_345, 1)
  const file = join(dir, 'blob')
  writeFileSync(file, data)
  // Two large buffers of 256 KiB for eight concurrent responses: most read into small ones.
  const buffers = new ReadBuffers(256 * 1024, 2)
  const whole = await serve(t, file, 0, data.length - 1, buffers)
  const results = await Promise.all(Array.from({ length: 8 }, () => fetch(whole.url)))
  for (const r of results) t.equal(sha(r.body), sha(data), 'byte-exact')
  t.equal(buffers.inUse, 0, 'every large buffer is back in the pool')
  t.same(whole.ends, Array(8).fill(undefined), 'every send ended cleanly')
  const part = await serve(t, file, 1000, 3 * 1024 * 1024 + 7, buffers)
  const r = await fetch(part.url)
  t.ok(r.body.equals(data.subarray(1000, 3 * 1024 * 1024 + 8)), 'a range, byte-exact')
})

void t.test('a file shorter than its range is a cut connection, never a short complete body', async (t) => {
  t.teardown(() => undefined)
  const dir = t.testdir()
  const data = pattern(300_000, 2)
  const file = join(dir, 'short')
  writeFileSync(file, data)
  const buffers = new ReadBuffers(64 * 1024, 4)
  // The response promises 500,000 bytes; the file has 300,000.
  const s = await serve(t, file, 0, 499_999, buffers)
  const r = await fetch(s.url)
  t.notOk(r.complete, 'the client sees an incomplete response')
  t.ok(r.body.length <= 300_000)
  t.match(String(s.ends[0]), /ended at byte 300000/)
  t.equal(buffers.inUse, 0)
})

void t.test('a client that goes away stops the reads; its buffers are accounted for', async (t) => {
  t.teardown(() => undefined)
  const dir = t.testdir()
  const data = pattern(16 * 1024 * 1024, 3)
  const file = join(dir, 'big')
  writeFileSync(file, data)
  const buffers = new ReadBuffers(1024 * 1024, 4)
  const s = await serve(t, file, 0, data.length - 1, buffers)
  // Clients that read a little, then vanish.
  await Promise.all(
    Array.from(
      { length: 6 },
      () =>
        new Promise<void>((resolve) => {
          const req = get(s.url, (res) => {
            res.once('data', () => {
              req.destroy()
              resolve()
            })
          })
          req.on('error', () => resolve())
        }),
    ),
  )
  const deadline = Date.now() + 5000
  while (s.ends.length < 6 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20))
  t.equal(s.ends.length, 6, 'every send ended')
  t.ok(
    s.ends.every((e) => e instanceof Error),
    'as cut short',
  )
  t.ok(buffers.inUse <= 4, 'never more large buffers than the pool allows')
  // The pool still serves: a full send afterwards gets large buffers again and is exact.
  const r = await fetch(s.url)
  t.equal(sha(r.body), sha(data))
  t.equal(buffers.inUse, 0, 'nothing is lost from the pool for good')
})

void t.test('a file its check says changed while it was read: cut off before the last chunk, never completed', async (t) => {
  t.teardown(() => undefined)
  const dir = t.testdir()
  const data = pattern(1_000_000, 3)
  const file = join(dir, 'changed')
  writeFileSync(file, data)
  const buffers = new ReadBuffers(64 * 1024, 4)
  let asked = 0
  const s = await serve(t, file, 0, data.length - 1, buffers, data.length, () => {
    asked++
    return false
  })
  const r = await fetch(s.url)
  t.notOk(r.complete, 'the client sees an incomplete response')
  t.ok(r.body.length < data.length, `${r.body.length} of ${data.length} bytes: the last chunk never went out`)
  t.equal(asked, 1, 'asked once, before the last chunk')
  t.match(String(s.ends[0]), /written to while it was being sent/)
  t.equal(buffers.inUse, 0, 'its buffer is back in the pool')
})

import { connect } from 'node:net'
import t from 'tap'
import { startHarness } from '../fixtures/proxy-harness.js'

async function listening(t: Parameters<typeof startHarness>[0], headersTimeoutMs?: number) {
  const h = await startHarness(t, headersTimeoutMs ? { headersTimeoutMs } : {})
  await h.proxy.server.start()
  return { h, port: Number(h.proxy.server.info.port) }
}

function rawExchange(port: number, write: (s: ReturnType<typeof connect>) => void): Promise<{ text: string; closedAfterMs: number }> {
  const started = Date.now()
  return new Promise((resolve, reject) => {
    const socket = connect(port, '127.0.0.1', () => write(socket))
    let text = ''
    socket.on('data', (d: Buffer) => (text += d.toString('latin1')))
    socket.on('close', () => resolve({ text, closedAfterMs: Date.now() - started }))
    socket.on('error', (err: NodeJS.ErrnoException) => (err.code === 'ECONNRESET' ? undefined : reject(err)))
  })
}

void t.test('a slowloris client that never finishes its headers is cut off', async (t) => {
  const { h, port } = await listening(t, 500)
  const res = await rawExchange(port, (s) => {
    s.write('GET /healthz HTTP/1.1\r\nHost: x\r\n')
    const drip = setInterval(() => s.writable && s.write('X-Drip: 1\r\n'), 100)
    s.on('close', () => clearInterval(drip))
  })
  t.ok(res.closedAfterMs < 5_000, `closed after ${res.closedAfterMs} ms`)
  t.match(res.text, /^HTTP\/1\.1 408/, 'told why')
  t.equal((await h.proxy.server.inject('/healthz')).statusCode, 200, 'the server still serves')
})

void t.test('oversized request lines and headers get 431, not a crash', async (t) => {
  const { h, port } = await listening(t)
  const longUrl = await rawExchange(port, (s) => s.end(`GET /package?digest=${'a'.repeat(20_000)} HTTP/1.1\r\nHost: x\r\n\r\n`))
  t.match(longUrl.text, /^HTTP\/1\.1 431/)
  const bigHeader = await rawExchange(port, (s) => s.end(`GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ${'b'.repeat(20_000)}\r\n\r\n`))
  t.match(bigHeader.text, /^HTTP\/1\.1 431/)
  t.equal((await h.proxy.server.inject('/healthz')).statusCode, 200)
})

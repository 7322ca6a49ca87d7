/**
 * The graceful stop of a listener (connection-drain.ts), on real sockets: arbitrary
 * interleavings of connections, keep-alive and pipelined requests, answers, clients closing,
 * and the stop, with the contract checked after every step:
 * - no answer is ever cut: a client that did not close its side gets every body whole;
 * - the server never closes a connection that has a request it has not answered;
 * - once the stop began, new connections are refused, every connection with nothing in
 *   progress is closed, and answers begun since say `Connection: close`;
 * - the stop resolves once every connection is closed, and not before.
 * Then the budget: a client that never reads is closed when the budget runs out.
 */
import t from 'tap'
import fc from 'fast-check'
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http'
import { connect, type AddressInfo, type Socket } from 'node:net'
import { ConnectionDrain } from '../connection-drain.js'
import { eventually } from './fixtures/eventually.js'

const BODY = Buffer.alloc(48 * 1024, 'x') // over a socket buffer's worth in pieces: writes take more than one turn

/** A raw keep-alive client connection that parses the answers it gets. */
class Client {
  readonly socket: Socket
  sent = 0
  /** Sent a request after the stop began. */
  sentAfterStop = false
  /** Answers received whole, in order: whether each said `Connection: close`. */
  readonly answers: boolean[] = []
  /** The server closed its side. */
  ended = false
  closedByUs = false
  /** A body that stopped short when the connection closed. */
  cut = false
  refused = false
  readonly connected: Promise<boolean>
  #buffer = Buffer.alloc(0)

  /**
   * `stubborn`: keeps its side open after the server's FIN (Node's clients close theirs), so it
   * can still send a request the server can no longer answer.
   */
  constructor(
    port: number,
    id: number,
    readonly stubborn = false,
  ) {
    this.id = id
    this.socket = connect({ port, host: '127.0.0.1', allowHalfOpen: stubborn })
    this.connected = new Promise((resolve) => {
      this.socket.once('connect', () => resolve(true))
      this.socket.once('error', () => {
        this.refused = true
        resolve(false)
      })
    })
    this.socket.on('data', (chunk: Buffer) => {
      this.#buffer = Buffer.concat([this.#buffer, chunk])
      this.#parse()
    })
    this.socket.on('end', () => (this.ended = true))
    this.socket.on('close', () => {
      if (this.#buffer.length > 0) this.cut = true
    })
  }

  readonly id: number

  send(): void {
    this.sent++
    this.socket.write(`GET /${this.id}/${this.sent} HTTP/1.1\r\nHost: x\r\n\r\n`)
  }

  /** Requests sent and not yet answered whole. */
  get waiting(): number {
    return this.sent - this.answers.length
  }

  #parse(): void {
    for (;;) {
      const end = this.#buffer.indexOf('\r\n\r\n')
      if (end === -1) return
      const head = this.#buffer.subarray(0, end).toString('latin1').toLowerCase()
      const length = Number(/content-length: (\d+)/.exec(head)?.[1] ?? NaN)
      if (this.#buffer.length < end + 4 + length) return
      this.answers.push(head.includes('connection: close'))
      this.#buffer = this.#buffer.subarray(end + 4 + length)
    }
  }
}

interface Harness {
  server: Server
  drain: ConnectionDrain
  port: number
  /** Requests the server received and has not answered, per client id, oldest first. */
  pending: Map<number, ServerResponse[]>
  clients: Client[]
  stopAt: number | undefined
  stopped: Promise<void> | undefined
  stopResolved: boolean
  /** The server's side of each connection, by the client's port. */
  serverSockets: Map<number, Socket>
}

async function harness(): Promise<Harness> {
  const pending = new Map<number, ServerResponse[]>()
  const server = createServer((req: IncomingMessage, res: ServerResponse) => {
    const id = Number(req.url?.split('/')[1])
    const list = pending.get(id) ?? []
    list.push(res)
    pending.set(id, list)
  })
  const drain = new ConnectionDrain(server)
  const serverSockets = new Map<number, Socket>()
  server.on('connection', (socket: Socket) => serverSockets.set(socket.remotePort ?? -1, socket))
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  return {
    server,
    drain,
    port: (server.address() as AddressInfo).port,
    pending,
    clients: [],
    stopAt: undefined,
    stopped: undefined,
    stopResolved: false,
    serverSockets,
  }
}

const received = (h: Harness, c: Client): number => h.pending.get(c.id)?.length ?? 0
const open = (c: Client): boolean => !c.refused && !c.closedByUs && !c.ended
const settle = (): Promise<void> => new Promise((resolve) => setTimeout(resolve, 3))

/** The contract, checked after every step once the sockets have settled. */
async function invariants(h: Harness): Promise<void> {
  const stopping = h.stopped !== undefined
  await eventually(
    () =>
      h.clients.every((c) => {
        if (!open(c)) return true
        // Requests reach the server; answers reach the client; after the stop, idle connections close.
        const inFlight = c.waiting - received(h, c)
        return inFlight === 0 && !(stopping && c.waiting === 0)
      }),
    'requests are received, answers arrive, and (stopping) idle connections are closed',
    { timeoutMs: 2000, intervalMs: 2 },
  )
  for (const c of h.clients) {
    if (c.cut) throw new Error(`client ${c.id}: a body was cut short`)
    if (c.ended && c.waiting > 0 && !c.closedByUs) throw new Error(`client ${c.id}: the server closed with ${c.waiting} request(s) unanswered`)
  }
  if (h.stopResolved && h.clients.some((c) => !c.refused && !c.socket.destroyed && !c.closedByUs && !c.ended))
    throw new Error('the stop resolved while a connection was still open')
}

type Command = fc.AsyncCommand<object, Harness>

class Connect implements Command {
  constructor(readonly stubborn = false) {}
  check = (): boolean => true
  async run(_: object, h: Harness): Promise<void> {
    const c = new Client(h.port, h.clients.length, this.stubborn)
    h.clients.push(c)
    const ok = await c.connected
    if (h.stopped && ok) throw new Error('a connection was accepted after the stop began')
    if (!h.stopped && !ok) throw new Error('a connection was refused before the stop')
    await invariants(h)
  }
  toString = (): string => (this.stubborn ? 'connect(stubborn)' : 'connect')
}

class Send implements Command {
  constructor(
    readonly which: number,
    readonly count: number,
  ) {}
  check = (): boolean => true
  async run(_: object, h: Harness): Promise<void> {
    const c = h.clients.filter(open)[this.which % Math.max(1, h.clients.filter(open).length)]
    if (!c) return
    if (h.stopped) {
      // A client that has not seen the stop yet: one more, pipelined behind what it waits for.
      // (A request sent after an answer that says `Connection: close` may be lost, as HTTP
      // allows, RFC 9112 section 9.6; clients retry those.)
      if (c.sentAfterStop || c.answers.includes(true)) return
      c.sentAfterStop = true
      c.send()
    } else {
      // Pipelined when count > 1, or when the previous answers are not in yet.
      for (let i = 0; i < this.count; i++) c.send()
    }
    await invariants(h)
  }
  toString = (): string => `send(${this.which}, ${this.count})`
}

class Answer implements Command {
  constructor(readonly which: number) {}
  check = (): boolean => true
  async run(_: object, h: Harness): Promise<void> {
    const busy = [...h.pending.entries()].filter(([, list]) => list.length > 0)
    const entry = busy[this.which % Math.max(1, busy.length)]
    if (!entry) return
    const res = entry[1].shift()
    if (!res) return
    const c = h.clients[entry[0]]
    const before = c?.answers.length ?? 0
    // The answer to the last request the client sent, begun after the stop.
    const last = h.stopped !== undefined && c !== undefined && c.sent === before + 1
    res.writeHead(200, { 'content-length': BODY.length })
    res.end(BODY)
    await invariants(h)
    // Answers arrive in order: this one is the client's next.
    if (c && c.answers.length > before && c.answers[before] !== last)
      throw new Error(`client ${c.id}: answer ${before + 1} of ${c.sent} said Connection: ${c.answers[before] ? 'close' : 'keep-alive'}`)
  }
  toString = (): string => `answer(${this.which})`
}

class ClientCloses implements Command {
  constructor(readonly which: number) {}
  check = (): boolean => true
  async run(_: object, h: Harness): Promise<void> {
    const c = h.clients.filter(open)[this.which % Math.max(1, h.clients.filter(open).length)]
    if (!c) return
    c.closedByUs = true
    c.socket.destroy()
    h.pending.delete(c.id) // the server's answers to a gone client are written into nothing
    await settle()
    await invariants(h)
  }
  toString = (): string => `client-closes(${this.which})`
}

class LateSend implements Command {
  constructor(readonly which: number) {}
  check = (): boolean => true
  async run(_: object, h: Harness): Promise<void> {
    // A client that sends after the server's FIN (it crossed on the wire, or it was pipelined
    // and unread): it cannot be answered, and must not hold the stop until its budget.
    const late = h.clients.filter((c) => c.ended && !c.closedByUs && !c.socket.destroyed)
    const c = late[this.which % Math.max(1, late.length)]
    if (!c) return
    c.send()
    const server = h.serverSockets.get(c.socket.localPort ?? -1)
    await eventually(() => server?.destroyed === true, 'the server closes a connection whose request came after its FIN', { timeoutMs: 2000, intervalMs: 2 })
    c.closedByUs = true // what it waits for will not come: the invariants leave it out
    await invariants(h)
  }
  toString = (): string => `late-send(${this.which})`
}

class Stop implements Command {
  check = (): boolean => true
  async run(_: object, h: Harness): Promise<void> {
    if (h.stopped) return
    h.stopped = h.drain.stop(60_000).then(() => {
      h.stopResolved = true
    })
    await settle()
    await invariants(h)
  }
  toString = (): string => 'stop'
}

void t.test('over arbitrary interleavings, a stop cuts nothing, closes what is idle, refuses the new, and ends when all is closed', async () => {
  const commands = [
    fc.boolean().map((stubborn) => new Connect(stubborn)),
    fc.tuple(fc.nat(7), fc.integer({ min: 1, max: 3 })).map(([w, n]) => new Send(w, n)),
    fc.tuple(fc.nat(7), fc.integer({ min: 1, max: 3 })).map(([w, n]) => new Send(w, n)),
    fc.nat(7).map((w) => new Answer(w)),
    fc.nat(7).map((w) => new Answer(w)),
    fc.nat(7).map((w) => new ClientCloses(w)),
    fc.constant(new Stop()),
    fc.nat(7).map((w) => new LateSend(w)),
  ]
  await fc.assert(
    fc.asyncProperty(fc.commands(commands, { maxCommands: 30 }), async (cmds) => {
      const h = await harness()
      try {
        await fc.asyncModelRun(() => ({ model: {}, real: h }), cmds)
        // The end of every run: stop, answer everything, and the stop completes.
        h.stopped ??= h.drain.stop(60_000).then(() => {
          h.stopResolved = true
        })
        for (const [, list] of h.pending) for (const res of list.splice(0)) res.end(BODY)
        // Stubborn clients close their side at last, once the server has closed its own.
        const stubborn = h.clients.filter((c) => c.stubborn && !c.refused && !c.closedByUs)
        await eventually(() => stubborn.every((c) => c.ended || c.socket.destroyed), 'the server ends every connection', { timeoutMs: 3000, intervalMs: 2 })
        for (const c of stubborn) c.socket.end()
        await Promise.race([
          h.stopped,
          new Promise((_, reject) => setTimeout(() => reject(new Error('the stop did not end once everything was answered')), 3000)),
        ])
        for (const c of h.clients) if (c.cut) throw new Error(`client ${c.id}: a body was cut short`)
        if (h.drain.open !== 0) throw new Error(`${h.drain.open} connection(s) left open`)
      } finally {
        for (const c of h.clients) c.socket.destroy()
        h.server.close()
      }
    }),
    {
      numRuns: 300,
      // A request pipelined after the stop takes the `Connection: close` from the one before it.
      examples: [[[new Connect(), new Send(0, 1), new Stop(), new Send(0, 1), new Answer(0)]], [[new Connect(true), new Stop(), new LateSend(0)]]],
    },
  )
})

void t.test('a client that never reads is closed when the budget runs out, and the stop then ends', async (t) => {
  const big = Buffer.alloc(16 * 1024 * 1024, 'y') // far more than the socket buffers hold
  const server = createServer((_req, res) => {
    res.writeHead(200, { 'content-length': big.length })
    res.end(big)
  })
  const drain = new ConnectionDrain(server)
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  const port = (server.address() as AddressInfo).port
  const stalled = connect(port, '127.0.0.1')
  await new Promise((r) => stalled.once('connect', r))
  stalled.write('GET / HTTP/1.1\r\nHost: x\r\n\r\n')
  await new Promise((r) => stalled.once('data', r))
  stalled.pause()
  const closed = new Promise((r) => stalled.once('close', r))
  stalled.on('error', () => undefined)
  let ended = false
  const first = drain.stop(300)
  const stopping = first.then(() => (ended = true))
  const refused = await new Promise<boolean>((resolve) => {
    const probe = connect(port, '127.0.0.1')
    probe.once('connect', () => {
      probe.destroy()
      resolve(false)
    })
    probe.once('error', () => resolve(true))
  })
  t.ok(refused, 'a new connection is refused while the stalled one is open')
  t.notOk(ended, 'the stop waits while the budget lasts')
  await stopping
  t.equal(drain.open, 0, 'no connection is left')
  stalled.resume()
  await closed
  t.ok(stalled.destroyed, 'the stalled client is closed')
  t.equal(drain.stop(10), first, 'a second stop is the same stop')
})

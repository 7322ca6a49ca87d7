import type { IncomingMessage, Server, ServerResponse } from 'node:http'
import type { Socket } from 'node:net'

interface Connection {
  /** Requests emitted on this connection and not yet done with (pipelined ones count each). */
  requests: number
  /** The last request emitted: its body may still be arriving. */
  last: IncomingMessage | undefined
  /** The answer to the last request: the one that says `Connection: close` once stopping. */
  newest: ServerResponse | undefined
  /** The answer this stop made say `Connection: close`, and what it would have said. */
  closing: { res: ServerResponse; keepAlive: boolean } | undefined
}

/**
 * The graceful stop of one HTTP listener, kept per request rather than per connection.
 *
 * A stop stops accepting at once, ends each keep-alive connection once it has no request in
 * progress (a FIN after the bytes already written, never a reset), answers every request that
 * arrives meanwhile with `Connection: close`, and after `budgetMs` destroys what is left.
 *
 * Why not hapi's and Node's own: Node's `server.close()` destroys every connection that has no
 * request in progress, and a response counts as done once its last bytes are in the kernel's
 * send buffer, so a tail the client had not read yet was lost to a reset. hapi keeps one
 * record per socket, and on a keep-alive connection the previous response's late 'finish'
 * deleted the next request's record, so hapi's stop ended a socket in the middle of a
 * response. Both cut 200s short (test/integration/process.test.ts). Counting requests per
 * connection, answered by whichever path (hapi or the fast path), has neither fault.
 */
export class ConnectionDrain {
  readonly #open = new Map<Socket, Connection>()
  #stopping = false
  #stopped: Promise<void> | undefined
  #drained: (() => void) | undefined

  constructor(private readonly listener: Server) {
    // Node's close() calls this first: it would destroy connections whose last response is
    // still in the kernel. Connections are ended here, one by one, once they have nothing in progress.
    listener.closeIdleConnections = () => undefined
    listener.on('connection', (socket: Socket) => {
      const connection: Connection = { requests: 0, last: undefined, newest: undefined, closing: undefined }
      this.#open.set(socket, connection)
      socket.once('close', () => {
        this.#open.delete(socket)
        if (this.#open.size === 0) this.#drained?.()
      })
    })
    const track = (req: IncomingMessage, res: ServerResponse): void => {
      const connection = this.#open.get(req.socket)
      if (!connection) return
      // Read after this stop ended the connection (pipelined behind the last answer, or sent as
      // the FIN crossed): nothing can be written back, so do not hold the stop for it.
      if (req.socket.writableEnded) req.socket.destroy()
      connection.requests++
      connection.last = req
      connection.newest = res
      if (this.#stopping) closeAfterNewest(connection)
      res.once('close', () => {
        connection.requests--
        // An idle keep-alive connection holds no finished request or answer.
        if (connection.last === req) connection.last = undefined
        if (connection.newest === res) connection.newest = undefined
        if (connection.requests === 0 && this.#stopping) req.socket.end()
      })
    }
    // Before hapi's and the fast path's listeners, so the count is up before any answer starts.
    listener.prependListener('request', track)
    // Only where someone answers 'checkContinue' (hapi does): a listener there makes Node stop
    // sending `100 Continue` itself and stop emitting 'request' for such requests, which then
    // went unanswered on a server that handles 'request' alone (found from outside).
    if (listener.listenerCount('checkContinue') > 0) listener.prependListener('checkContinue', track)
  }

  /** Connections open now. */
  get open(): number {
    return this.#open.size
  }

  /** True while `socket` has a request not yet done with. */
  busy(socket: Socket): boolean {
    return (this.#open.get(socket)?.requests ?? 0) > 0
  }

  /**
   * True while the last request on `socket` is still receiving its body: a parse error then
   * belongs to that request, which is answered and logged as itself.
   */
  receivingBody(socket: Socket): boolean {
    const last = this.#open.get(socket)?.last
    return last !== undefined && !last.complete && !last.destroyed
  }

  /**
   * Stops accepting, ends connections as their requests finish, and destroys the rest after
   * `budgetMs`. Resolves once every connection is closed. Calling it again returns the same stop.
   */
  stop(budgetMs: number): Promise<void> {
    this.#stopping = true
    this.#stopped ??= this.#stop(budgetMs)
    return this.#stopped
  }

  async #stop(budgetMs: number): Promise<void> {
    if (this.listener.listening) this.listener.close()
    for (const [socket, connection] of this.#open) {
      if (connection.requests === 0) socket.end()
      else closeAfterNewest(connection)
    }
    if (this.#open.size === 0) return
    let timer: NodeJS.Timeout | undefined
    await new Promise<void>((resolve) => {
      this.#drained = resolve
      // A client that stops reading, or never closes its side, must not hold the stop past the
      // budget: what it has not read by then is lost (its line says so: 499, aborted).
      timer = setTimeout(() => {
        for (const socket of this.#open.keys()) socket.destroy()
      }, budgetMs)
    })
    clearTimeout(timer)
  }
}

/**
 * Makes the answer to a connection's last request say `Connection: close` (if its head is not
 * written yet): Node then ends the connection after it, and the client knows not to send
 * another. Only the last: an answer to a pipelined request before it must not close the
 * connection under the ones queued behind it, so a newer request takes the mark back.
 */
function closeAfterNewest(connection: Connection): void {
  const res = connection.newest
  if (!res || res.headersSent || connection.closing?.res === res) return
  const previous = connection.closing
  if (previous && !previous.res.headersSent) previous.res.shouldKeepAlive = previous.keepAlive
  connection.closing = { res, keepAlive: res.shouldKeepAlive }
  res.shouldKeepAlive = false
}

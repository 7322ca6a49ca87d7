import type { IncomingMessage, ServerResponse } from 'node:http'
import type { Socket } from 'node:net'

const DELIVERED = Symbol('delivered')
type Watched = ServerResponse & { [DELIVERED]?: boolean }

/**
 * Watches whether `res` is delivered: its last byte handed to the kernel while its connection
 * was still open. Call it before anything is written (the listeners do, for every request).
 *
 * Neither `writableFinished` nor 'finish' says so by itself. When a connection is destroyed
 * with bytes still queued in Node (a client that stopped reading, cut off by a stop's budget
 * or by its own reset), the queue is dropped, `writableFinished` then reads true, and 'finish'
 * is still emitted. What differs is that the socket is already destroyed when 'finish' comes, or
 * (a write that failed) has its error recorded.
 * The listener goes first: on a `Connection: close` answer Node's own 'finish' listener
 * destroys the socket after a successful send.
 */
export function watchDelivery(req: IncomingMessage, res: ServerResponse): void {
  const socket = req.socket
  ;(res as Watched)[DELIVERED] = false
  res.prependListener('finish', () => {
    // A write that failed (the client reset) calls its callback, which emits 'finish', before
    // the socket is destroyed; by then the socket has recorded the error (found from outside).
    ;(res as Watched)[DELIVERED] = !socket.destroyed && !socket.errored
  })
}

/**
 * Whether `res` was delivered whole (see {@link watchDelivery}); false until it is. A response
 * nobody watched (a hapi server built without the proxy's listener, in tests) falls back to
 * `writableFinished`.
 */
export function delivered(res: ServerResponse): boolean {
  return (res as Watched)[DELIVERED] ?? res.writableFinished
}

/** Callbacks for a socket's 'close': one listener per socket, however many responses wait on it. */
const onSocketClose = new WeakMap<Socket, Set<() => void>>()

/** The callbacks waiting for `socket` to close, with its one 'close' listener in place. */
function closeWaiters(socket: Socket): Set<() => void> {
  const known = onSocketClose.get(socket)
  if (known) return known
  const waiters = new Set<() => void>()
  onSocketClose.set(socket, waiters)
  socket.once('close', () => {
    onSocketClose.delete(socket)
    for (const f of waiters) f()
  })
  return waiters
}

/**
 * Calls `fn` once, when the response is done with: sent, cut off, or its connection gone. A
 * pipelined response queued behind another on its connection never emits 'close' when the
 * connection drops, so the socket's own 'close' counts too. Those wait in one set per socket:
 * a listener each would pass Node's limit of ten (a warning on stderr) with many pipelined.
 */
export function whenClosed(req: IncomingMessage, res: ServerResponse, fn: () => void): void {
  const socket = req.socket
  if (res.closed || socket.destroyed) return fn()
  const waiters = closeWaiters(socket)
  let done = false
  const once = (): void => {
    if (done) return
    done = true
    res.off('close', once)
    waiters.delete(once)
    fn()
  }
  res.once('close', once)
  waiters.add(once)
}

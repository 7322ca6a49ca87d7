import type { Duplex } from 'node:stream'

/**
 * The status for a request Node could not parse ('clientError'): 431 for a head over the size
 * limit, 408 for one that never finished in time, 400 for any other parse error; undefined for
 * what is a connection ending rather than a request (a reset, a timeout between requests).
 */
export function clientErrorStatus(err: NodeJS.ErrnoException): 400 | 408 | 431 | undefined {
  const code = err.code ?? ''
  return code === 'HPE_HEADER_OVERFLOW' ? 431 : code === 'ERR_HTTP_REQUEST_TIMEOUT' ? 408 : code.startsWith('HPE_') ? 400 : undefined
}

/**
 * What a request line says of a client error: its code and llhttp's fixed message only. The bytes
 * received (err.rawPacket) may hold a credential and are never logged.
 */
export function clientErrorFacts(err: NodeJS.ErrnoException): { type: string; code: string; message: string } {
  return { type: 'ClientError', code: err.code ?? '', message: err.message.slice(0, 200) }
}

const REASONS = { 400: 'Bad Request', 408: 'Request Timeout', 431: 'Request Header Fields Too Large' } as const

/** Answers `status` and closes the connection, as Node does for a 'clientError' nobody handles. */
export function answerClientError(socket: Duplex, status: 400 | 408 | 431): void {
  socket.write(`HTTP/1.1 ${status} ${REASONS[status]}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n`)
  socket.destroy()
}

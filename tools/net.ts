/**
 * The free-port probe shared by the tests, the demo's tools and the benchmarks.
 */
import { createServer } from 'node:net'

/**
 * A port the kernel just handed out on 127.0.0.1 (bind port 0, read it, close again), for a
 * child process or a fake that binds it later.
 */
export async function freePort(): Promise<number> {
  const srv = createServer()
  await new Promise<void>((resolve, reject) => {
    srv.once('error', reject)
    srv.listen(0, '127.0.0.1', () => resolve())
  })
  const addr = srv.address()
  await new Promise<void>((resolve) => srv.close(() => resolve()))
  if (addr === null || typeof addr === 'string') throw new Error('could not get a free port')
  return addr.port
}

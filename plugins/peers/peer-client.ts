import { createHash } from 'node:crypto'
import { Agent, request as httpRequest, type IncomingMessage, type RequestOptions } from 'node:http'
import { Agent as HttpsAgent, request as httpsRequest } from 'node:https'
import type { Socket } from 'node:net'
import type { TempFile } from '../packages/cache/blob-store.js'
import { writeAll } from '../packages/fill.js'
import type { LayerRef } from '../packages/manifest.js'
import { PEER_WORKING_INTERVAL_MS, type ManifestBytes, type PeerRequest } from '../packages/peer-port.js'
import { MAX_MANIFEST_BYTES } from '../packages/registry/registry-client.js'

/**
 * How one exchange with a peer ended: `ok` (verified whole), `not-found` (404), `refused`
 * (another status, or a length other than the manifest's), `unreachable` (no answer: refused
 * connection, reset), `timeout` (no first byte, a stall, or a transfer
 * slower than the minimum rate, within the bounds), `busy` (it said it was working, waiting on
 * its own registry, and did not answer within `workingMs`: not held against it), `mismatch`
 * (bytes that did not hash to their digest, or too many), `error` (broke off mid-body).
 */
export type PeerResult = 'ok' | 'not-found' | 'refused' | 'unreachable' | 'timeout' | 'busy' | 'mismatch' | 'error'

export const PEER_RESULTS: readonly PeerResult[] = ['ok', 'not-found', 'refused', 'unreachable', 'timeout', 'busy', 'mismatch', 'error']

export interface PeerTimeouts {
  /** From the request to the first body byte. */
  firstByteMs: number
  /** Between body bytes. */
  idleMs: number
  /**
   * The slowest rate a whole transfer may average: an exchange ends, as a `timeout`, once it
   * ran `firstByteMs + idleMs + length / minBytesPerSecond`, so a peer that trickles (a byte
   * now and then, never idle for `idleMs`) is given up like one that stalls.
   */
  minBytesPerSecond: number
  /**
   * No exchange runs longer than this, however large the body: a non-owner's clients see no
   * byte of a peer's layer until it verified whole, and must not wait so long that the proxy's
   * own socket idle timeout (300 s) cuts them; past it the registry streams to them instead.
   */
  maxTransferMs: number
  /**
   * How long a peer that said it is working (`102 Processing`: it waits on its own registry,
   * for the manifest or the layer's first answer) may take to send its answer's headers. Its
   * registry's own bounds (10 s to connect, 30 s for headers) end that wait first.
   */
  workingMs: number
}

/** Peers are near (the same cluster): a peer slower than this is worse than the registry. */
export const DEFAULT_PEER_TIMEOUTS: PeerTimeouts = {
  firstByteMs: 5_000,
  idleMs: 5_000,
  minBytesPerSecond: 1024 * 1024,
  maxTransferMs: 120_000,
  workingMs: 45_000,
}

/** The longest an exchange with a body of `length` bytes may take in all. */
export function transferDeadlineMs(timeouts: PeerTimeouts, length: number): number {
  return Math.min(timeouts.maxTransferMs, timeouts.firstByteMs + timeouts.idleMs + Math.ceil((length * 1000) / timeouts.minBytesPerSecond))
}

/**
 * How peers are reached in Kubernetes: HTTPS through their kube-rbac-proxy, which authorizes
 * this pod's service-account token. The serving certificate is verified against `ca`, always.
 */
export interface PeerTls {
  /**
   * PEM of the CA that signs the proxies' serving certificates, or where to get the current one
   * (ca-file.ts: re-read when the file changes); each new connection verifies against it.
   */
  ca: string | Buffer | { get(): Promise<string | Buffer> }
  /**
   * The DNS name every serving certificate carries (node IPs are not known when it is made);
   * without it, the certificate must name the peer's IP.
   */
  serverName?: string
  /** The bearer token for each request (see token-file.ts); refused ones are marked stale. */
  token: { get(): Promise<string | undefined>; stale(): void }
}

/** The header that marks a request from another replica (see handlers/package.ts). */
const PEER_HEADER = 'X-RPP-Peer'

/**
 * Plain HTTP to the other replicas' listeners (`--peers`), or HTTPS with a bearer token to
 * their kube-rbac-proxy ({@link PeerTls}). Nothing a peer sends is trusted: a layer is
 * written to the caller's temp file while it hashes and is `ok` only if it is exactly the
 * manifest's size and hashes to its digest; a manifest likewise. Every exchange is bounded
 * (first byte, idle, and in all: {@link transferDeadlineMs}), so a stalled or trickling peer
 * costs at most those bounds.
 */
export class PeerClient {
  #agent: Agent
  /** The CA `#agent` verifies with (HTTPS): another one means a new agent. */
  #agentCa: string | Buffer | undefined
  readonly #timeouts: PeerTimeouts
  readonly #tls: PeerTls | undefined

  constructor(timeouts: Partial<PeerTimeouts> = {}, tls?: PeerTls) {
    this.#timeouts = { ...DEFAULT_PEER_TIMEOUTS, ...timeouts }
    this.#tls = tls
    this.#agentCa = tls && (typeof tls.ca === 'string' || Buffer.isBuffer(tls.ca)) ? tls.ca : undefined
    // With a CA source, the first request builds the HTTPS agent from its current CA; until
    // then a plain agent stands in, which can make no HTTPS connection at all.
    this.#agent = this.#agentCa !== undefined ? httpsAgent(this.#agentCa) : new Agent({ keepAlive: true, maxSockets: 64 })
  }

  /**
   * The agent for a new request: when the CA changed, a new one verifying against it. The old
   * one is retired: its idle connections (verified against the old CA) close now, those in use
   * finish their exchange and close then, so no request after the change trusts the old CA.
   */
  async #agentNow(): Promise<Agent> {
    const ca = this.#tls?.ca
    if (ca === undefined || typeof ca === 'string' || Buffer.isBuffer(ca)) return this.#agent
    const current = await ca.get()
    if (current !== this.#agentCa) {
      const old = this.#agent
      this.#agent = httpsAgent(current)
      this.#agentCa = current
      retire(old)
    }
    return this.#agent
  }

  /** Fetches `layer` through `member`'s `/package` into `temp` from byte 0, verifying it. */
  async layer(
    member: string,
    request: PeerRequest,
    mode: 'fill' | 'cached',
    layer: LayerRef,
    temp: TempFile,
    signal: AbortSignal,
    via: Record<string, string> = {},
  ): Promise<PeerResult> {
    const query = new URLSearchParams({ digest: request.digest })
    if (request.repository !== undefined) query.set('repository', request.repository)
    if (request.path !== undefined) query.set('path', request.path)
    const hash = createHash('sha256')
    const result = await this.#get(
      member,
      `/package?${query.toString()}`,
      { ...via, [PEER_HEADER]: mode === 'cached' ? 'cached' : '1' },
      signal,
      layer.size,
      async (chunk, offset) => {
        hash.update(chunk)
        await writeAll(temp, chunk, offset)
      },
    )
    if (result !== 'ok') return result
    return `sha256:${hash.digest('hex')}` === layer.digest ? 'ok' : 'mismatch'
  }

  /** Fetches the manifest `digest` from `member`'s memo, verifying it. */
  async manifest(member: string, digest: string, signal?: AbortSignal): Promise<{ result: PeerResult; manifest?: ManifestBytes }> {
    const chunks: Buffer[] = []
    let mediaType = ''
    const result = await this.#get(
      member,
      `/peers/manifests/${digest}`,
      { [PEER_HEADER]: 'cached' },
      signal,
      undefined,
      (chunk) => {
        chunks.push(chunk)
        return Promise.resolve()
      },
      (res) =>
        (mediaType =
          String(res.headers['content-type'] ?? '')
            .split(';')[0]
            ?.trim() ?? ''),
    )
    if (result !== 'ok') return { result }
    const body = Buffer.concat(chunks)
    if (`sha256:${createHash('sha256').update(body).digest('hex')}` !== digest) return { result: 'mismatch' }
    return { result, manifest: { body, mediaType } }
  }

  /** Drops pooled connections (shutdown). */
  close(): void {
    this.#agent.destroy()
  }

  /**
   * One GET within the bounds: `expected` is the exact body length (undefined: any, up to a
   * manifest's limit). Each chunk goes to `onChunk` with its offset before the next is read.
   */
  async #get(
    member: string,
    path: string,
    headers: Record<string, string>,
    signal: AbortSignal | undefined,
    expected: number | undefined,
    onChunk: (chunk: Buffer, offset: number) => Promise<void>,
    onHeaders?: (res: IncomingMessage) => void,
  ): Promise<PeerResult> {
    const aborter = new AbortController()
    const onAbort = (): void => aborter.abort(signal?.reason)
    signal?.addEventListener('abort', onAbort, { once: true })
    let timedOut = false
    let timer: NodeJS.Timeout | undefined
    const arm = (ms: number): void => {
      clearTimeout(timer)
      timer = setTimeout(() => {
        timedOut = true
        aborter.abort(new Error('peer timed out'))
      }, ms)
    }
    // The whole exchange, whatever the gaps: until the length is known, what the two bounds allow.
    let deadline: NodeJS.Timeout | undefined
    const began = Date.now()
    const overall = (ms: number, from = began): void => {
      clearTimeout(deadline)
      deadline = setTimeout(
        () => {
          timedOut = true
          aborter.abort(new Error('peer transfer too slow'))
        },
        Math.max(0, Math.min(began + this.#timeouts.maxTransferMs, from + ms) - Date.now()),
      )
    }
    // Set once the peer said it is working on the answer (102): its registry is slow, not it.
    let working = false
    arm(this.#timeouts.firstByteMs)
    overall(Math.min(this.#timeouts.maxTransferMs, this.#timeouts.firstByteMs + this.#timeouts.idleMs))
    let answered = false
    try {
      // Inside the try: a member that is no URL (a bad list) is a peer that failed, not a throw.
      const url = new URL(`${this.#tls ? 'https' : 'http'}://${member}`)
      const token = this.#tls ? await this.#tls.token.get() : undefined
      const agent = await this.#agentNow()
      const options: RequestOptions & { servername?: string } = {
        host: url.hostname.replace(/^\[|\]$/g, ''),
        port: url.port,
        path,
        headers: token ? { ...headers, Authorization: `Bearer ${token}` } : headers,
        agent,
        signal: aborter.signal,
        // Checked against the certificate instead of the IP (and sent as SNI).
        ...(this.#tls?.serverName ? { servername: this.#tls.serverName } : {}),
      }
      const res = await new Promise<IncomingMessage>((resolve, reject) => {
        const req = (this.#tls ? httpsRequest : httpRequest)(options, resolve)
        req.once('error', reject)
        req.on('information', (info: { statusCode: number }) => {
          if (info.statusCode !== 102) return
          if (!working) overall(this.#timeouts.workingMs)
          working = true
          // It repeats this every PEER_WORKING_INTERVAL_MS: a few missed ones, and it is gone.
          arm(Math.max(this.#timeouts.firstByteMs, 3 * PEER_WORKING_INTERVAL_MS))
        })
        req.end()
      })
      answered = true
      if (res.statusCode !== 200) {
        res.resume()
        // kube-rbac-proxy refused the token: it may have rotated since it was read.
        if (res.statusCode === 401) this.#tls?.token.stale()
        return res.statusCode === 404 ? 'not-found' : 'refused'
      }
      const length = Number(res.headers['content-length'])
      if (!Number.isSafeInteger(length) || (expected !== undefined && length !== expected) || length > (expected ?? MAX_MANIFEST_BYTES)) {
        res.destroy()
        return 'refused'
      }
      // The body's own budget, from now: a wait on the peer's registry is not the transfer.
      overall(transferDeadlineMs(this.#timeouts, length), working ? Date.now() : began)
      onHeaders?.(res)
      let received = 0
      for await (const chunk of res as AsyncIterable<Buffer>) {
        arm(this.#timeouts.idleMs)
        if (received + chunk.length > length) {
          res.destroy()
          return 'mismatch'
        }
        await onChunk(chunk, received)
        received += chunk.length
      }
      return received === length ? 'ok' : 'error'
    } catch {
      if (timedOut) return working && !answered ? 'busy' : 'timeout'
      return answered ? 'error' : 'unreachable'
    } finally {
      clearTimeout(timer)
      clearTimeout(deadline)
      signal?.removeEventListener('abort', onAbort)
    }
  }
}

function httpsAgent(ca: string | Buffer): Agent {
  // rejectUnauthorized is https's default; said here because it must never be false.
  return new HttpsAgent({ keepAlive: true, maxSockets: 64, ca, rejectUnauthorized: true })
}

/** Closes an agent's idle connections now and each busy one once its exchange is done. */
function retire(agent: Agent): void {
  for (const sockets of Object.values(agent.freeSockets)) for (const s of sockets ?? []) s.destroy()
  // Runs after the agent's own 'free' handler has pooled the socket; closing it unpools it.
  agent.on('free', (socket: Socket) => socket.destroy())
}

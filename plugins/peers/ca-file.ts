import { X509Certificate } from 'node:crypto'
import { readFileSync, statSync, type Stats } from 'node:fs'
import { readFile, stat } from 'node:fs/promises'
import type { Logger } from 'pino'
import { SourceError } from '../credentials/source.js'

/** How often the file is looked at: a stat, and a read only when that changed. */
export const DEFAULT_CA_CHECK_MS = 5_000

export interface CaFileOptions {
  /** `--peer-ca-file`: the CA that signs the proxies' serving certificates (PEM). */
  path: string
  checkMs?: number
  log: Pick<Logger, 'info' | 'warn'>
  now?: () => number
}

/** The file's identity: a kubelet Secret update swaps a symlink, so the inode changes too. */
function stampOf(s: Stats): string {
  return `${s.ino}:${s.size}:${s.mtimeMs}:${s.ctimeMs}`
}

function isPemCertificate(text: string): boolean {
  if (!text.includes('-----BEGIN CERTIFICATE-----')) return false
  try {
    new X509Certificate(text)
    return true
  } catch {
    return false
  }
}

/**
 * The peers' CA, read at start and again when the file changes: cert-manager renews the CA and
 * the kubelet rewrites the mounted `ca.crt`, and a replica that kept the old CA would refuse
 * every peer once their certificates are signed by the new one. The file is looked at on
 * demand, at most once per {@link DEFAULT_CA_CHECK_MS} (a stat; a read only when the stat
 * changed), so no timer outlives the server. A new file that cannot be read or holds no PEM
 * certificate (a half-written file, a wrong key) is logged once and the last good CA is kept:
 * peers keep working on the CA that worked until a good file arrives.
 */
export class CaFile {
  readonly #o: CaFileOptions
  #pem: string
  #stamp: string
  #checkedAt: number
  #checking: Promise<string> | undefined

  /** Reads the file now; one that is missing or holds no certificate fails start-up. */
  constructor(o: CaFileOptions) {
    this.#o = o
    const what = `--peer-ca-file ${o.path}`
    let text: string
    try {
      this.#stamp = stampOf(statSync(o.path))
      text = readFileSync(o.path, 'utf8')
    } catch (err) {
      throw new SourceError(`${what}: cannot read (${(err as NodeJS.ErrnoException).code ?? 'error'})`)
    }
    if (!isPemCertificate(text)) throw new SourceError(`${what}: not a PEM certificate`)
    this.#pem = text
    this.#checkedAt = this.#now()
  }

  /** The CA to verify new connections with: the last good one, after a check if one is due. */
  async get(): Promise<string> {
    const now = this.#now()
    if (now - this.#checkedAt < (this.#o.checkMs ?? DEFAULT_CA_CHECK_MS)) return this.#pem
    // Concurrent requests share one check.
    this.#checking ??= this.#check(now).finally(() => (this.#checking = undefined))
    return this.#checking
  }

  #now(): number {
    return (this.#o.now ?? Date.now)()
  }

  async #check(now: number): Promise<string> {
    this.#checkedAt = now
    const path = this.#o.path
    let stamp: string
    let text: string
    try {
      stamp = stampOf(await stat(path))
      if (stamp === this.#stamp) return this.#pem
      text = await readFile(path, 'utf8')
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code ?? 'error'
      // Once per failure, not every few seconds; the file is read again once it is back.
      if (this.#stamp !== `failed:${code}`) this.#o.log.warn({ path, code }, 'peer CA file cannot be read; keeping the last good CA')
      this.#stamp = `failed:${code}`
      return this.#pem
    }
    this.#stamp = stamp
    if (!isPemCertificate(text)) {
      this.#o.log.warn({ path }, 'peer CA file holds no PEM certificate; keeping the last good CA')
      return this.#pem
    }
    if (text !== this.#pem) {
      this.#pem = text
      this.#o.log.info({ path }, 'peer CA file changed; new connections to peers verify against it')
    }
    return this.#pem
  }
}

import { randomBytes, timingSafeEqual } from 'node:crypto'
import { readFileSync } from 'node:fs'
import { readdir, rename, rm, writeFile } from 'node:fs/promises'
import { join } from 'node:path'

/** The file in the cache directory that holds the token `DELETE /cache/{digest}` requires. */
export const ADMIN_TOKEN_FILE = 'admin-token'
/** The request header that carries it. */
export const ADMIN_TOKEN_HEADER = 'x-cache-token'

/**
 * Why deleting from the cache takes a token, when reading it does not: the proxy runs in the
 * host network, so anything on the master reaches its plain-HTTP listener on 127.0.0.1 without
 * passing kube-rbac-proxy, and a loopback check cannot tell them apart from kube-rbac-proxy
 * itself. A fresh random token per start, in a file only the proxy's user can read (mode 0600
 * in the cache volume), limits deletes to whoever can act as that user: `kubectl exec` into the
 * container (the `cache rm` command reads the file), or root on the node.
 */
export function newAdminToken(): string {
  return randomBytes(32).toString('hex')
}

/**
 * Writes the token for this start, atomically (a temp file renamed over the last one). Temp
 * files a crash left behind mid-write are removed first: nothing else cleans the directory's
 * top level.
 */
export async function writeAdminToken(directory: string, token: string): Promise<void> {
  const path = join(directory, ADMIN_TOKEN_FILE)
  const stale = (await readdir(directory)).filter((name) => name.startsWith(`${ADMIN_TOKEN_FILE}.`) && name.endsWith('.partial'))
  await Promise.all(stale.map((name) => rm(join(directory, name), { force: true })))
  const temp = `${path}.${randomBytes(6).toString('hex')}.partial`
  await writeFile(temp, `${token}\n`, { mode: 0o600 })
  await rename(temp, path)
}

/** Reads a token file as {@link writeAdminToken} wrote it; throws the fs error (ENOENT, EACCES). */
export function readAdminToken(path: string): string {
  return readFileSync(path, 'utf8').trim()
}

/** Whether `presented` is the token, compared in constant time. */
export function adminTokenMatches(expected: string | undefined, presented: unknown): boolean {
  if (expected === undefined || expected === '' || typeof presented !== 'string') return false
  const a = Buffer.from(expected)
  const b = Buffer.from(presented.trim())
  return a.length === b.length && timingSafeEqual(a, b)
}

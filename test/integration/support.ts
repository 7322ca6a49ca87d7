/**
 * Small helpers shared by the integration tests: a raw HTTP client (node:http, so the tests see
 * exactly what a node bootstrap script would get on the wire), the `--registry-config` file
 * writer and a recursive file lister. The free-port probe and the log capture live in
 * test/fixtures/. Not a test file: `.taprc` only runs `*.test.ts`.
 */
import { readdir, writeFile } from 'node:fs/promises'
import * as http from 'node:http'
import type { IncomingHttpHeaders } from 'node:http'
import { join } from 'node:path'

/** A response with the whole body read. */
export interface RawResponse {
  status: number
  headers: IncomingHttpHeaders
  body: Buffer
}

/**
 * One request with `agent: false` (no keep-alive socket outlives the call). Rejects if the
 * connection breaks before the body ended: a truncated 200 must never look like a success.
 */
export function request(url: string, init: { method?: string; headers?: Record<string, string> } = {}): Promise<RawResponse> {
  return new Promise((resolve, reject) => {
    const req = http.request(url, { method: init.method ?? 'GET', headers: init.headers ?? {}, agent: false }, (res) => {
      const chunks: Buffer[] = []
      res.on('data', (c: Buffer) => chunks.push(c))
      res.on('error', reject)
      res.on('close', () => {
        if (!res.complete) reject(new Error(`response to ${url} was cut before its end`))
      })
      res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks) }))
    })
    req.setTimeout(20_000, () => req.destroy(new Error(`timeout: ${url}`)))
    req.on('error', reject)
    req.end()
  })
}

/** The `default` entry of a `--registry-config` file (README, "Registry sources"). */
export interface DefaultSourceConfig {
  address: string
  path?: string
  scheme?: string
  ca?: string
  dockerConfigJson?: string
}

/** A `moduleSources` entry of a `--registry-config` file. */
export interface ModuleSourceConfig {
  name: string
  repo: string
  scheme?: string
  ca?: string
  dockerCfg?: string
}

/** Writes a `--registry-config` JSON file into `dir`; returns its path. */
export async function writeRegistryConfig(
  dir: string,
  config: { default?: DefaultSourceConfig; moduleSources?: ModuleSourceConfig[] },
  fileName = 'registry-config.json',
): Promise<string> {
  const file = join(dir, fileName)
  await writeFile(file, JSON.stringify(config, null, 2))
  return file
}

/** Docker config JSON text with an `auth` field (base64 of `user:password`) for `host`. */
export function dockerConfigJson(host: string, username: string, password: string): string {
  return JSON.stringify({ auths: { [host]: { auth: basicToken(username, password) } } })
}

/** base64 of `user:password`, as docker config `auth` fields and Basic headers carry it. */
export function basicToken(username: string, password: string): string {
  return Buffer.from(`${username}:${password}`).toString('base64')
}

/** Every regular file under `dir`, recursively, as paths relative to it (sorted). */
export async function listFiles(dir: string): Promise<string[]> {
  const out: string[] = []
  const walk = async (sub: string): Promise<void> => {
    const entries = await readdir(join(dir, sub), { withFileTypes: true }).catch(() => [])
    for (const e of entries) {
      const rel = sub === '' ? e.name : join(sub, e.name)
      if (e.isDirectory()) await walk(rel)
      else out.push(rel)
    }
  }
  await walk('')
  return out.sort()
}

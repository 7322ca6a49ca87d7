/**
 * Reference points for the hit benchmark: what Node itself reaches on this machine serving the
 * same bytes in different ways, so the gap between the proxy and nginx can be split into its
 * causes (hapi's request lifecycle, per-request file I/O through libuv's thread pool, copying
 * through user space instead of sendfile).
 *
 *   npm run build && node dist/bench/baselines.js [--seconds 10] [--size 64k|4m|32m|all]
 *
 * Each server runs in its own process (`--serve <mode> <port> <file>`) and gets the benchmark's
 * `wrk -t1 -c32` (the server has the other core to itself), after a discarded 2 s run. Modes:
 * - `node-memory`: node:http, the file held in memory, `res.end(buffer)`
 * - `hapi-memory`: hapi route answering `h.response(buffer)`
 * - `node-pread`: node:http, one fd kept open, one `fs.read` of the whole file per request
 * - `node-open-stream`: node:http, per request `fs/promises.open` + `createReadStream` (256 KiB
 *   chunks) piped to the response: the proxy's hit path without hapi
 * - `hapi-open-stream`: the same file path behind a hapi route, as the proxy's hit does
 */
import { closeSync, mkdirSync, mkdtempSync, openSync, read, readFileSync, rmSync, writeFileSync, chmodSync } from 'node:fs'
import { open } from 'node:fs/promises'
import { createServer } from 'node:http'
import { loadavg, tmpdir } from 'node:os'
import { join } from 'node:path'
import Hapi from '@hapi/hapi'
import { freePort } from '../tools/net.js'
import { Children, fetchHashed, fmt, KiB, MiB, pseudoRandom, ROOT, runWrk, sha256, sleep, startNginx, textOption } from './lib.js'

const MODES = ['node-memory', 'hapi-memory', 'node-pread', 'node-open-stream', 'hapi-open-stream'] as const
type Mode = (typeof MODES)[number]

async function serve(mode: Mode, port: number, file: string): Promise<void> {
  const data = readFileSync(file)
  const fd = openSync(file, 'r')
  const headers = { 'Content-Type': 'application/x-gzip', 'Content-Length': String(data.length) }
  const openStream = async (): Promise<NodeJS.ReadableStream> => {
    const handle = await open(file, 'r')
    return handle.createReadStream({ start: 0, end: data.length - 1, highWaterMark: 256 * KiB })
  }
  if (mode.startsWith('hapi-')) {
    const server = Hapi.server({ host: '127.0.0.1', port })
    server.route({
      method: 'GET',
      path: '/',
      handler: async (_request, h) =>
        h
          .response(mode === 'hapi-memory' ? data : await openStream())
          .type('application/x-gzip')
          .header('Content-Length', String(data.length)),
    })
    await server.start()
    return
  }
  createServer((_req, res) => {
    res.writeHead(200, headers)
    if (mode === 'node-memory') {
      res.end(data)
    } else if (mode === 'node-pread') {
      const buf = Buffer.allocUnsafe(data.length)
      read(fd, buf, 0, buf.length, 0, (err) => (err ? res.destroy(err) : res.end(buf)))
    } else {
      openStream().then(
        (stream) => stream.pipe(res),
        (err: Error) => res.destroy(err),
      )
    }
  }).listen(port, '127.0.0.1')
  process.on('exit', () => closeSync(fd))
}

async function drive(): Promise<void> {
  const seconds = Number(textOption('seconds', '10')) || 10
  const which = textOption('size', 'all')
  const sizes = [
    { label: '64 KiB', bytes: 64 * KiB, key: '64k' },
    { label: '4 MiB', bytes: 4 * MiB, key: '4m' },
    { label: '32 MiB', bytes: 32 * MiB, key: '32m' },
  ].filter((s) => which === 'all' || which === s.key)
  const children = new Children()
  const tmp = mkdtempSync(join(tmpdir(), 'rpp-baselines-'))
  chmodSync(tmp, 0o755)
  const www = join(tmp, 'www')
  mkdirSync(www)
  const lines = [
    `## Reference servers (${new Date().toISOString()})`,
    '',
    `wrk -t1 -c32 -d${seconds}s after a discarded 2 s run; load average before: ${loadavg()
      .map((l) => l.toFixed(2))
      .join(', ')}. ` + 'Server CPU: CPU seconds per second of the server process (all its threads; 100% = one core).',
    '',
    '| size | server | req/s | MiB/s | p50 | p99 | server CPU | CPU per request |',
    '|---|---|---|---|---|---|---|---|',
  ]
  try {
    for (const size of sizes) {
      const data = pseudoRandom(size.bytes, `baseline ${size.key}`)
      const file = join(www, `${size.key}.bin`)
      writeFileSync(file, data)
      const nginxPort = await freePort()
      const nginx = await startNginx(children, { dir: join(tmp, `nginx-${size.key}`), root: www, port: nginxPort, workers: '1' })
      const targets: Array<{ name: string; url: string; pids: () => number[]; stop: () => Promise<void> }> = [
        {
          name: 'nginx (1 worker, sendfile)',
          url: `http://127.0.0.1:${nginxPort}/${size.key}.bin`,
          pids: () => [nginx.master.pid ?? -1, ...nginx.workerPids],
          stop: () => children.stop(nginx.master),
        },
      ]
      for (const mode of MODES) {
        const port = await freePort()
        const child = children.spawn(process.execPath, [join(ROOT, 'dist/bench/baselines.js'), '--serve', mode, String(port), file], join(tmp, `${mode}.log`))
        targets.push({ name: mode, url: `http://127.0.0.1:${port}/`, pids: () => [child.pid ?? -1], stop: () => children.stop(child) })
      }
      for (const t of targets) {
        for (let i = 0; ; i++) {
          try {
            const r = await fetchHashed(t.url)
            if (r.status !== 200 || r.digest !== sha256(data)) throw new Error(`${t.name}: HTTP ${r.status}, wrong body`)
            break
          } catch (err) {
            if (i > 100 || (err as Error).message.includes('wrong body')) throw err
            await sleep(100)
          }
        }
        await runWrk(children, { url: t.url, threads: 1, connections: 32, seconds: 2, serverPids: t.pids() })
        const r = await runWrk(children, { url: t.url, threads: 1, connections: 32, seconds, serverPids: t.pids(), quiet: { maxMs: 30_000, threshold: 0.25 } })
        const row = `| ${size.label} | ${t.name} | ${fmt(r.requestsPerSec)} | ${fmt(r.transferMiBPerSec)} | ${fmt(r.p50Ms, 2)} ms | ${fmt(r.p99Ms, 2)} ms | ${fmt(r.serverCpu * 100)}% | ${fmt((r.serverCpu / r.requestsPerSec) * 1e6)} µs |`
        console.log(row)
        lines.push(row)
        await t.stop()
      }
    }
  } finally {
    await children.stopAll()
    rmSync(tmp, { recursive: true, force: true })
  }
  const md = lines.join('\n') + '\n'
  const resultsDir = join(ROOT, 'bench', 'results')
  mkdirSync(resultsDir, { recursive: true })
  writeFileSync(join(resultsDir, 'baselines.md'), md)
  console.log(`\n${md}\nwritten to bench/results/baselines.md`)
}

const serveAt = process.argv.indexOf('--serve')
const main = serveAt === -1 ? drive() : serve(process.argv[serveAt + 1] as Mode, Number(process.argv[serveAt + 2]), process.argv[serveAt + 3] ?? '')
main.catch((err: unknown) => {
  console.error(`baselines failed: ${(err as Error).stack ?? String(err)}`)
  process.exitCode = 1
})

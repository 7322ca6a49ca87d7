#!/usr/bin/env node
import { ConfigError, parseFlags } from './config/flags.js'
import { formatBytes } from './config/quantity.js'
import { SourceError } from './plugins/credentials/source.js'
import { batchedLog } from './log-destination.js'
import { createLogger, NAME } from './logger.js'

/**
 * How long SIGTERM waits for in-flight responses, on both listeners, before closing them: with
 * the index close and the last log lines after it, well inside the pod's 40 s grace period.
 */
const DRAIN_MS = 25_000

function fail(message: string): never {
  process.stderr.write(`registry-packages-proxy: ${message.replace(/\s+/g, ' ')}\n`)
  process.exit(2)
}

async function main(argv: string[]): Promise<void> {
  if (argv[0] === 'cache') {
    const { runCacheCommand } = await import('./cli/cache-command.js')
    process.exitCode = await runCacheCommand(argv.slice(1), {
      out: (text) => process.stdout.write(`${text}\n`),
      err: (text) => process.stderr.write(`${text}\n`),
    })
    return
  }
  // Signals are the server's from here: before it is up there is nothing to drain, and a stop
  // is an exit 0 with the lines so far written (Node's default would die by the signal; it
  // still does in the first tenth of a second or so, while Node itself boots).
  let stop = (_signal: string): void => process.exit(0)
  process.on('SIGTERM', () => stop('SIGTERM'))
  process.on('SIGINT', () => stop('SIGINT'))
  let flags
  try {
    flags = parseFlags(argv)
  } catch (err) {
    if (err instanceof ConfigError) fail(err.message)
    throw err
  }
  // Log lines go out batched and never through a blocking write while serving (log-destination.ts):
  // at `info` every request writes a line, and a synchronous write(2) per line was about 30 µs of
  // a 64 KiB hit's 75 µs. Lines still held are written at exit, however the process exits
  // (SIGTERM below ends in process.exit; an uncaught error too), waiting at most 2 s for a full
  // pipe (test/integration/process.test.ts "request logs are buffered, and none is lost"). A
  // reader that falls behind costs at most 16 MiB; lines past that are dropped and counted in a
  // warning line.
  const destination = batchedLog(1, { batchBytes: 12 * 1024, flushEveryMs: 250, maxBufferedBytes: 16 * 1024 * 1024, exitWaitMs: 2000, name: NAME })
  const logger = createLogger(flags.logLevel, destination)
  stop = (signal: string): void => {
    logger.info({ signal }, 'stopped before start-up finished')
    process.exit(0)
  }
  // Loaded only after the flags parsed, so a typo fails in milliseconds, not after a full load.
  const { createServer } = await import('./server.js')
  let proxy
  try {
    proxy = await createServer({
      host: flags.listenHost,
      port: flags.listenPort,
      cacheDirectory: flags.cacheDirectory,
      limitBytes: flags.cacheRetentionBytes,
      disableCache: flags.disableCache,
      scrubBytesPerSecond: flags.scrubBytesPerSecond,
      ...(flags.registryConfig ? { registryConfig: flags.registryConfig } : {}),
      ...(flags.kubeconfig ? { kubeconfig: flags.kubeconfig } : {}),
      ...(flags.bootstrap ? { bootstrap: flags.bootstrap } : {}),
      // --peers wins; else, in a pod, the Deployment's ready pods (through the Kubernetes API).
      ...(flags.peers.length > 0
        ? { peers: { members: flags.peers, timeouts: { firstByteMs: flags.peerTimeoutMs, idleMs: flags.peerTimeoutMs } } }
        : flags.peerCaFile
          ? {
              kubePeers: {
                caFile: flags.peerCaFile,
                ...(flags.peerServerName ? { serverName: flags.peerServerName } : {}),
                timeouts: { firstByteMs: flags.peerTimeoutMs, idleMs: flags.peerTimeoutMs },
              },
            }
          : {}),
      stopDrainMs: DRAIN_MS,
      logger,
    })
  } catch (err) {
    // An unusable cache directory is not fatal: the packages plugin serves uncached then.
    if (err instanceof SourceError || err instanceof ConfigError) fail(err.message)
    throw err
  }
  try {
    await proxy.server.start()
  } catch (err) {
    // The bootstrap listener opens first (onPreStart): name the address that failed.
    const bootstrap = flags.bootstrap && !proxy.server.plugins.bootstrap?.api.address()
    const [flag, address] =
      bootstrap && flags.bootstrap
        ? ['--bootstrap-listen-address', `${flags.bootstrap.host}:${flags.bootstrap.port}`]
        : ['--listen-address', `${flags.listenHost}:${flags.listenPort}`]
    fail(`${flag} ${address}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`)
  }
  logger.info(
    {
      listen: proxy.server.info.uri,
      cacheDirectory: flags.disableCache ? undefined : flags.cacheDirectory,
      cacheLimit: formatBytes(flags.cacheRetentionBytes),
      sources: proxy.sources.all().map((s) => ({ name: s.name, repository: s.repository, scheme: s.scheme })),
    },
    'registry-packages-proxy listening',
  )

  let stopping = false
  stop = (signal: string): void => {
    if (stopping) return
    stopping = true
    logger.info({ signal }, 'stopping: draining in-flight responses')
    // The listeners stop accepting at once, and each connection ends once its requests are
    // answered; what is still open after DRAIN_MS is closed (connection-drain.ts). The
    // onPostStop hooks then end downloads and close the index (its batched writes included).
    proxy.server.stop({ timeout: DRAIN_MS }).then(
      () => {
        logger.info('stopped')
        process.exit(0)
      },
      (err: unknown) => {
        logger.error({ err: { message: (err as Error).message } }, 'error while stopping')
        process.exit(1)
      },
    )
  }
  // SIGHUP re-reads --registry-config without a restart (it is also re-read when it changes).
  const credentials = proxy.server.plugins.credentials.api
  process.on('SIGHUP', () => void credentials.reloadFile('SIGHUP'))
}

main(process.argv.slice(2)).catch((err: unknown) => {
  process.stderr.write(`registry-packages-proxy: fatal: ${(err as Error).message}\n`)
  process.exit(1)
})

import { pino, type DestinationStream, type Logger } from 'pino'

/** The `name` of every log line. */
export const NAME = 'registry-packages-proxy'

/**
 * The process's logger, as main.ts runs it; test/request-log.test.ts builds it here too, so the
 * request lines written past pino (request-log.ts) are held to this configuration's own.
 */
export function createLogger(level: string, destination: DestinationStream): Logger {
  return pino(
    {
      level,
      base: { name: NAME },
      // Our `err` fields are already log-safe {type, code, message} objects (never raw errors, which
      // could carry request headers): print them as they are.
      serializers: { err: (e: unknown) => e },
      // Belt and braces: our code never logs these, and if a header object slips in, it is hidden.
      redact: { paths: ['*.authorization', '*.Authorization', 'headers.authorization', '*.password', '*.token'], censor: '[redacted]' },
    },
    destination,
  )
}

import { ProxyError } from '../../errors.js'

/** The logger the package plugin's parts write to (pino's shape, reduced to what they call). */
export interface PackageLogger {
  info(obj: object, msg: string): void
  warn(obj: object, msg: string): void
  error(obj: object, msg: string): void
}

/** A log-safe description of an error: class, code and our own message only. */
export function describe(err: unknown): { type: string; code?: string; message: string } {
  if (err instanceof ProxyError) return { type: err.name, code: err.code, message: err.message }
  if (err instanceof Error) {
    const code = (err as NodeJS.ErrnoException).code
    return { type: err.name, ...(code ? { code } : {}), message: code ?? err.name }
  }
  return { type: 'unknown', message: 'unknown error' }
}

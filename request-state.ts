import type { describe } from './plugins/packages/log.js'

/**
 * What the handlers note on `request.app` for the request log line (request-log.ts) and the
 * served-bytes counter: typed once here, as hapijs/inert types its plugin, instead of a cast at
 * each site. Imported for its side effect by server.ts, which reads it.
 */
declare module '@hapi/hapi' {
  interface RequestApplicationState {
    /** How the request was served (`hit`, `miss`, `not-modified`, `error`, ...). */
    result?: string
    /** The log-safe description of the error that ended it, logged under `err`. */
    err?: ReturnType<typeof describe>
    /** The name of the registry source that served `/package`. */
    source?: string
    /** `peer` or `cached` when another replica sent the request. */
    peer?: string
  }
}

/** What a registry's 401 asks for: a bearer token from `realm`, Basic credentials, or something we do not speak. */
export type Challenge = { scheme: 'bearer'; realm: string; service?: string; scope?: string } | { scheme: 'basic' } | { scheme: 'unknown' }

/**
 * Parses a `WWW-Authenticate` header as registries send it:
 * `Bearer realm="https://auth/token",service="registry",scope="repository:a/b:pull"` or
 * `Basic realm="x"`. Quoted values may contain commas and escaped quotes.
 */
export function parseChallenge(header: string | undefined): Challenge {
  if (!header) return { scheme: 'unknown' }
  const m = /^\s*([A-Za-z]+)\s*(.*)$/s.exec(header)
  const scheme = (m?.[1] ?? '').toLowerCase()
  if (scheme === 'basic') return { scheme: 'basic' }
  if (scheme !== 'bearer') return { scheme: 'unknown' }
  const params = new Map<string, string>()
  const re = /([A-Za-z_]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?\s*/gy
  const rest = m?.[2] ?? ''
  let p: RegExpExecArray | null
  while ((p = re.exec(rest)) !== null && p[0] !== '') {
    params.set((p[1] ?? '').toLowerCase(), p[2] !== undefined ? p[2].replace(/\\(.)/g, '$1') : (p[3] ?? ''))
  }
  const realm = params.get('realm')
  if (!realm || !/^https?:\/\//i.test(realm)) return { scheme: 'unknown' }
  const service = params.get('service')
  const scope = params.get('scope')
  return { scheme: 'bearer', realm, ...(service ? { service } : {}), ...(scope ? { scope } : {}) }
}

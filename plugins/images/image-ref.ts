import { BadRequestError } from '../../errors.js'
import { DIGEST } from '../packages/manifest.js'

/** One OCI repository-name component (the distribution reference grammar). */
const COMPONENT = /^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$/
/** An OCI tag. */
const TAG = /^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$/
/**
 * `<os>-<arch>[-<variant>]`, each part lowercase letters and digits, as OCI platforms spell them,
 * at most 32 characters each (real ones are under 16): a longer one is a 400, never echoed back.
 */
const PLATFORM = /^([a-z0-9]{1,32})-([a-z0-9]{1,32})(?:-([a-z0-9]{1,32}))?$/

/** The editions a Deckhouse registry path may end in; their parent is the edition root. */
const EDITIONS = new Set(['ce', 'be', 'se', 'se-plus', 'ee', 'fe'])

/**
 * The images `/v1/images/` may name: the Deckhouse CLI and its plugins, nothing else, so a
 * request cannot steer the proxy to any other repository of the registry. Undefined otherwise.
 */
export function allowedImage(image: string): string | undefined {
  if (image === 'deckhouse-cli') return image
  const plugin = /^deckhouse-cli\/plugins\/([^/]+)$/.exec(image)?.[1]
  return plugin !== undefined && COMPONENT.test(plugin) ? image : undefined
}

/**
 * Repository names to try for `image` under the default source's `namePrefix`: the image below
 * the prefix, then, when the prefix ends in an edition with a segment before it
 * (`deckhouse/ce`), below the edition root (`deckhouse`): where the CLI is published once for
 * every edition.
 */
export function imageNames(namePrefix: string, image: string): string[] {
  const first = namePrefix ? `${namePrefix}/${image}` : image
  const segments = namePrefix.split('/').filter(Boolean)
  const last = segments.at(-1)
  if (segments.length < 2 || last === undefined || !EDITIONS.has(last)) return [first]
  return [first, `${segments.slice(0, -1).join('/')}/${image}`]
}

/** A tag (`v1.2.3`) as a path segment; 400 otherwise. */
export function parseTag(text: string, what: string): string {
  if (!TAG.test(text)) throw new BadRequestError(`${what} must be an OCI tag (letters, digits, "_", "." and "-", up to 128)`)
  return text
}

/** A manifest reference: a tag or `sha256:<64 hex>`; 400 otherwise. */
export function parseReference(text: string): string {
  if (text.startsWith('sha256:')) {
    if (!DIGEST.test(text)) throw new BadRequestError('a digest reference must be sha256:<64 lowercase hex>')
    return text
  }
  return parseTag(text, 'the reference')
}

/** A platform to pick from an image index. */
export interface Platform {
  os: string
  architecture: string
  variant?: string
}

/** `platform=<os>-<arch>[-<variant>]`, default `linux-amd64`; 400 when malformed or repeated. */
export function parsePlatform(value: unknown): Platform {
  if (value === undefined || value === '') return { os: 'linux', architecture: 'amd64' }
  if (typeof value !== 'string') throw new BadRequestError('"platform" must be given once')
  const m = PLATFORM.exec(value)
  if (!m) throw new BadRequestError('"platform" must be <os>-<arch>[-<variant>], e.g. linux-amd64 or linux-arm64-v8')
  return { os: m[1] ?? '', architecture: m[2] ?? '', ...(m[3] ? { variant: m[3] } : {}) }
}

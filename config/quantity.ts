/** Multipliers of the quantity suffixes: binary (`Ki`...`Ei`) and decimal (`k`...`E`). */
const SUFFIXES: Record<string, number> = {
  '': 1,
  Ki: 2 ** 10,
  Mi: 2 ** 20,
  Gi: 2 ** 30,
  Ti: 2 ** 40,
  Pi: 2 ** 50,
  Ei: 2 ** 60,
  k: 1e3,
  M: 1e6,
  G: 1e9,
  T: 1e12,
  P: 1e15,
  E: 1e18,
}

const QUANTITY = /^([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)|[eE]([+-]?[0-9]+))?$/

/**
 * Parses a Kubernetes resource quantity into a whole number of bytes: `1048576`, `512Mi`,
 * `1Gi`, `1G`, `1.5Gi`, `100k`, `1e9`. Throws on anything else so a typo in
 * `--cache-retention-size` fails at start-up instead of silently meaning zero.
 */
export function parseQuantity(text: string): number {
  const m = QUANTITY.exec(text.trim())
  if (!m) throw new Error(`"${text}" is not a Kubernetes quantity (examples: 512Mi, 1Gi, 1G, 1048576)`)
  const base = Number(m[1])
  const multiplier = m[3] !== undefined ? 10 ** Number(m[3]) : (SUFFIXES[m[2] ?? ''] ?? 1)
  // Kubernetes rounds fractional byte quantities up.
  const bytes = Math.ceil(base * multiplier)
  if (!Number.isSafeInteger(bytes)) throw new Error(`"${text}" is too large`)
  return bytes
}

/** Formats bytes for humans (logs, the CLI table): 1536 -> "1.5Ki". */
export function formatBytes(bytes: number): string {
  const units = ['', 'Ki', 'Mi', 'Gi', 'Ti']
  let value = bytes
  let i = 0
  while (value >= 1024 && i < units.length - 1) {
    value /= 1024
    i++
  }
  return i === 0 ? `${bytes}` : `${value.toFixed(value < 10 ? 1 : 0)}${units[i]}`
}

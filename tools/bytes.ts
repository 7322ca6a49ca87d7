/**
 * Data that needs no fixture files, for the tests and the soak (bench/soak.ts): its own
 * module, so the soak can use it without loading the test harness.
 */

/** Deterministic, incompressible-enough bytes: the same `size` and `seed` give the same data. */
export function bytes(size: number, seed = 1): Buffer {
  const data = Buffer.alloc(size)
  let x = seed * 2654435761
  for (let i = 0; i < size; i++) {
    x = (x * 1103515245 + 12345) >>> 0
    data[i] = x >>> 24
  }
  return data
}

/*
 * xorshift32: a small, seeded, deterministic generator for test data and operation choices.
 * Tests print the seed on failure so a run can be replayed.
 */

/** Returns a generator of uint32 values; a zero seed is replaced by a fixed non-zero one. */
export function xorshift32(seed: number): () => number {
  let x = seed >>> 0 || 0x9e3779b9
  return () => {
    x ^= x << 13
    x >>>= 0
    x ^= x >>> 17
    x ^= x << 5
    x >>>= 0
    return x
  }
}

/** A generator of floats in [0, 1). */
export function uniform(seed: number): () => number {
  const next = xorshift32(seed)
  return () => next() / 0x1_0000_0000
}

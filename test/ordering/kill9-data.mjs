/*
 * The bytes and ops of the kill -9 test, shared by the child (which writes them) and the test
 * (which rebuilds what must be on disk): both sides derive everything from a seed, so the child
 * only has to report op numbers, offsets and lengths.
 */

/** xorshift32 stream; seed 0 is replaced by a fixed nonzero value. */
export function makeStream(seed) {
  let x = seed >>> 0 || 0x2545f491
  return () => {
    x ^= x << 13
    x >>>= 0
    x ^= x >>> 17
    x ^= x << 5
    x >>>= 0
    return x
  }
}

/** The data of write op `op` of a run with `seed`: `length` bytes, never all zero. */
export function dataFor(seed, op, length) {
  const next = makeStream((Math.imul(seed, 0x9e3779b1) ^ Math.imul(op + 1, 0x85ebca6b)) >>> 0)
  const out = Buffer.alloc(length)
  let at = 0
  for (; at + 4 <= length; at += 4) out.writeUInt32LE(next(), at)
  for (; at < length; at++) out[at] = next() & 0xff
  if (out.every((b) => b === 0)) out[0] = 0xa5
  return out
}

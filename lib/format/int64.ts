/*
 * 64-bit big-endian fields as two uint32 halves. JS numbers hold integers exactly up to 2^53;
 * qcow2 host offsets may use 56 bits, so every conversion to a number checks it is safe.
 */

export const TWO_POW_32 = 0x1_0000_0000

/** Reads the big-endian u64 at byteOffset as a number, or throws if it is not a safe integer. */
export function readU64(view: DataView, byteOffset: number, what = 'value'): number {
  const hi = view.getUint32(byteOffset)
  const lo = view.getUint32(byteOffset + 4)
  return joinU64(hi, lo, what)
}

/** hi * 2^32 + lo, refusing values past 2^53. */
export function joinU64(hi: number, lo: number, what = 'value'): number {
  if (hi >= 0x200000) {
    throw new RangeError(`${what} 0x${hex64(hi, lo)} does not fit in 53 bits`)
  }
  return hi * TWO_POW_32 + lo
}

/** Writes n (a non-negative safe integer) as a big-endian u64. */
export function writeU64(view: DataView, byteOffset: number, n: number): void {
  view.setUint32(byteOffset, Math.floor(n / TWO_POW_32))
  view.setUint32(byteOffset + 4, n >>> 0)
}

/** Splits a non-negative safe integer in uint32 halves. */
export function splitU64(n: number): { hi: number; lo: number } {
  return { hi: Math.floor(n / TWO_POW_32), lo: n >>> 0 }
}

/** 16 hex digits of a 64-bit value given as halves. */
export function hex64(hi: number, lo: number): string {
  return (hi >>> 0).toString(16).padStart(8, '0') + (lo >>> 0).toString(16).padStart(8, '0')
}

/** "0x1f000" for messages. */
export function hex(n: number): string {
  return '0x' + n.toString(16)
}

export function isPowerOfTwo(n: number): boolean {
  // Not n & (n - 1): bitwise operators would cut n to 32 bits.
  return n > 0 && Number.isSafeInteger(n) && 2 ** Math.round(Math.log2(n)) === n
}

export function alignUp(n: number, alignment: number): number {
  return Math.ceil(n / alignment) * alignment
}

export function alignDown(n: number, alignment: number): number {
  return Math.floor(n / alignment) * alignment
}

/** Index of the lowest set bit of a uint32 (32 if none). */
export function countTrailingZeros32(x: number): number {
  x = x >>> 0
  if (x === 0) return 32
  return 31 - Math.clz32(x & -x)
}

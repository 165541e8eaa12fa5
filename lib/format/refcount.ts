/*
 * Refcount block entries (spec: "Host cluster management"): refcount_bits = 1 << refcount_order
 * wide, 1 to 64 bits. Sub-byte widths are packed with bit 0 the least significant bit of a
 * byte; whole-byte widths are big-endian. Refcount table entries hold refcount block offsets.
 */
import { REFT_OFFSET_MASK_HI, REFT_OFFSET_MASK_LO } from './constants.js'
import { TWO_POW_32 } from './int64.js'

const BITS_PER_BYTE = 8

/** Entries in one refcount block: cluster_size * 8 / refcount_bits. */
export function refcountBlockEntries(clusterBits: number, refcountOrder: number): number {
  return 2 ** (clusterBits + 3 - refcountOrder)
}

/** The largest refcount an entry can hold (64-bit entries are capped at 2^53 - 1 here). */
export function maxRefcount(refcountOrder: number): number {
  const bits = 2 ** refcountOrder
  return bits >= 53 ? Number.MAX_SAFE_INTEGER : 2 ** bits - 1
}

/** Reads entry `index` of a refcount block. */
export function getRefcount(block: Uint8Array, index: number, refcountOrder: number): number {
  const bits = 2 ** refcountOrder
  if (bits < BITS_PER_BYTE) {
    const bitOffset = index * bits
    const byte = block[bitOffset >>> 3]!
    return (byte >>> (bitOffset & 7)) & ((1 << bits) - 1)
  }
  const at = index * (bits / BITS_PER_BYTE)
  switch (bits) {
    case 8:
      return block[at]!
    case 16:
      return (block[at]! << 8) | block[at + 1]!
    case 32:
      return ((block[at]! << 24) | (block[at + 1]! << 16) | (block[at + 2]! << 8) | block[at + 3]!) >>> 0
    default: {
      const hi = ((block[at]! << 24) | (block[at + 1]! << 16) | (block[at + 2]! << 8) | block[at + 3]!) >>> 0
      const lo = ((block[at + 4]! << 24) | (block[at + 5]! << 16) | (block[at + 6]! << 8) | block[at + 7]!) >>> 0
      // Beyond 2^53 a JS number cannot count; report the cap (treated as "in use, shared").
      return hi >= 0x200000 ? Number.MAX_SAFE_INTEGER : hi * TWO_POW_32 + lo
    }
  }
}

/** Writes entry `index` of a refcount block; value must be <= maxRefcount(order). */
export function setRefcount(block: Uint8Array, index: number, refcountOrder: number, value: number): void {
  const bits = 2 ** refcountOrder
  if (value < 0 || value > maxRefcount(refcountOrder) || !Number.isInteger(value)) {
    throw new RangeError(`refcount ${value} does not fit ${bits} bits`)
  }
  if (bits < BITS_PER_BYTE) {
    const bitOffset = index * bits
    const mask = ((1 << bits) - 1) << (bitOffset & 7)
    const byteIndex = bitOffset >>> 3
    block[byteIndex] = (block[byteIndex]! & ~mask) | ((value << (bitOffset & 7)) & mask)
    return
  }
  const at = index * (bits / BITS_PER_BYTE)
  switch (bits) {
    case 8:
      block[at] = value
      return
    case 16:
      block[at] = value >>> 8
      block[at + 1] = value & 0xff
      return
    case 32:
      block[at] = value >>> 24
      block[at + 1] = (value >>> 16) & 0xff
      block[at + 2] = (value >>> 8) & 0xff
      block[at + 3] = value & 0xff
      return
    default: {
      const hi = Math.floor(value / TWO_POW_32)
      const lo = value >>> 0
      block[at] = hi >>> 24
      block[at + 1] = (hi >>> 16) & 0xff
      block[at + 2] = (hi >>> 8) & 0xff
      block[at + 3] = hi & 0xff
      block[at + 4] = lo >>> 24
      block[at + 5] = (lo >>> 16) & 0xff
      block[at + 6] = (lo >>> 8) & 0xff
      block[at + 7] = lo & 0xff
    }
  }
}

/**
 * Refcount block offset of a refcount table entry (halves); 0 = no block. Offsets past 2^53
 * come out rounded (such a block lies far past any file).
 */
export function reftableEntryOffset(hi: number, lo: number): number {
  return ((hi & REFT_OFFSET_MASK_HI) >>> 0) * TWO_POW_32 + ((lo & REFT_OFFSET_MASK_LO) >>> 0)
}

/*
 * L1 table entries (spec: "L1 table entry"): bits 9-55 L2 table offset, bit 63 COPIED,
 * bits 0-8 and 56-62 reserved.
 */
import {
  L1E_OFFSET_MASK_HI,
  L1E_OFFSET_MASK_LO,
  L1E_RESERVED_MASK_HI,
  L1E_RESERVED_MASK_LO,
  OFLAG_COPIED_HI,
} from './constants.js'
import { TWO_POW_32 } from './int64.js'

export interface L1Entry {
  /** Host offset of the L2 table; 0 = unallocated. */
  l2Offset: number
  /** COPIED: refcount of the L2 table is exactly one. */
  copied: boolean
  /** Reserved bits are set (qemu-img check reports these; reads ignore them). */
  reservedBitsSet: boolean
}

export function decodeL1Entry(hi: number, lo: number): L1Entry {
  return {
    l2Offset: l1EntryL2Offset(hi, lo),
    copied: (hi & OFLAG_COPIED_HI) !== 0,
    reservedBitsSet: (hi & L1E_RESERVED_MASK_HI) !== 0 || (lo & L1E_RESERVED_MASK_LO) !== 0,
  }
}

/** The L2 table offset of an L1 entry given as halves. */
export function l1EntryL2Offset(hi: number, lo: number): number {
  return (hi & L1E_OFFSET_MASK_HI) * TWO_POW_32 + ((lo & L1E_OFFSET_MASK_LO) >>> 0)
}

export function encodeL1Entry(entry: { l2Offset: number; copied: boolean }): { hi: number; lo: number } {
  const hi = Math.floor(entry.l2Offset / TWO_POW_32)
  const lo = entry.l2Offset >>> 0
  return { hi: ((hi & L1E_OFFSET_MASK_HI) | (entry.copied ? OFLAG_COPIED_HI : 0)) >>> 0, lo: (lo & L1E_OFFSET_MASK_LO) >>> 0 }
}

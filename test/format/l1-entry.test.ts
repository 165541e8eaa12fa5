/*
 * lib/format/l1-entry.ts: L1 table entries (spec: "L1 table entry"), checked against 64-bit
 * BigInt encodings of the spec's layout: bits 9-55 L2 table offset, bit 63 COPIED, bits 0-8 and
 * 56-62 reserved.
 */
import { describe, expect, test } from 'vitest'
import { decodeL1Entry, encodeL1Entry, l1EntryL2Offset } from '../../lib/format/l1-entry.js'
import { Rng, halves, hex64, joinHalves } from './bytes.js'

const COPIED = 1n << 63n
const OFFSET_MASK = ((1n << 56n) - 1n) & ~0x1ffn
const RESERVED_MASK = 0x7f00_0000_0000_01ffn

/** The spec's decoding, on BigInt. */
function oracle(entry: bigint): { l2Offset: bigint; copied: boolean; reservedBitsSet: boolean } {
  return {
    l2Offset: entry & OFFSET_MASK,
    copied: (entry & COPIED) !== 0n,
    reservedBitsSet: (entry & RESERVED_MASK) !== 0n,
  }
}

describe('l1-entry', () => {
  test('the masks partition the 64 bits', () => {
    expect(OFFSET_MASK | RESERVED_MASK | COPIED).toBe((1n << 64n) - 1n)
    expect(OFFSET_MASK & RESERVED_MASK).toBe(0n)
  })

  type Row = [label: string, entry: bigint, l2Offset: number, copied: boolean, reserved: boolean]
  const rows: Row[] = [
    ['unallocated', 0n, 0, false, false],
    ['COPIED only (bit 63), no table', COPIED, 0, true, false],
    ['offset with COPIED', COPIED | 0x50000n, 0x50000, true, false],
    ['offset without COPIED', 0x50000n, 0x50000, false, false],
    ['smallest offset: bit 9', 0x200n, 512, false, false],
    ['largest offset bit: bit 55', 1n << 55n, 2 ** 55, false, false],
    ['all offset bits 9-55', OFFSET_MASK, 2 ** 56 - 512, false, false],
    ['all offset bits and COPIED', OFFSET_MASK | COPIED, 2 ** 56 - 512, true, false],
    ['bit 31 of the low word', 0x8000_0000n, 0x8000_0000, false, false],
    ['bit 31 of the low word and bit 63', COPIED | 0x8000_0000n, 0x8000_0000, true, false],
    ['low word all offset bits', 0xffff_fe00n, 0xffff_fe00, false, false],
    ['offset just above 2^32', 0x1_0000_0200n, 2 ** 32 + 512, false, false],
    ['offset above 2^40 with COPIED', COPIED | 0x123_4567_8a00n, 0x123_4567_8a00, true, false],
    ['offset 2^53 - 512', (1n << 53n) - 512n, 2 ** 53 - 512, false, false],
    ['reserved bit 0', 0x50001n, 0x50000, false, true],
    ['reserved bits 0-8', 0x501ffn | COPIED, 0x50000, true, true],
    ['reserved bit 56', (1n << 56n) | 0x50000n, 0x50000, false, true],
    ['reserved bit 62', (1n << 62n) | 0x50000n, 0x50000, false, true],
    ['reserved bits 56-62 and COPIED', RESERVED_MASK | COPIED, 0, true, true],
    ['every bit set', (1n << 64n) - 1n, 2 ** 56 - 512, true, true],
  ]

  test.each(rows)('decode %s', (_label, entry, l2Offset, copied, reserved) => {
    const { hi, lo } = halves(entry)
    expect(decodeL1Entry(hi, lo)).toEqual({ l2Offset, copied, reservedBitsSet: reserved })
    expect(l1EntryL2Offset(hi, lo)).toBe(l2Offset)
    expect(BigInt(l2Offset)).toBe(oracle(entry).l2Offset)
  })

  test.each(rows)('decode %s with the halves given as signed int32', (_label, entry, l2Offset, copied, reserved) => {
    const { hi, lo } = halves(entry)
    expect(decodeL1Entry(hi | 0, lo | 0)).toEqual({ l2Offset, copied, reservedBitsSet: reserved })
  })

  test('random entries decode like the BigInt oracle', () => {
    const rng = new Rng(0x11)
    for (let i = 0; i < 5000; i++) {
      // Mix fully random entries with ones that have clean reserved bits.
      const raw = rng.next64()
      const entry = i % 2 === 0 ? raw : raw & (OFFSET_MASK | COPIED)
      const { hi, lo } = halves(entry)
      const got = decodeL1Entry(hi, lo)
      const want = oracle(entry)
      expect({ ...got, l2Offset: BigInt(got.l2Offset) }, hex64(entry)).toEqual(want)
    }
  })

  type EncodeRow = [label: string, l2Offset: number, copied: boolean, expected: bigint]
  const encodeRows: EncodeRow[] = [
    ['zero', 0, false, 0n],
    ['zero with COPIED', 0, true, COPIED],
    ['512', 512, false, 0x200n],
    ['bit 31', 0x8000_0000, true, COPIED | 0x8000_0000n],
    ['above 2^32', 2 ** 32 + 0x1_0000, false, 0x1_0001_0000n],
    ['above 2^40', 2 ** 40 + 2 ** 31, true, COPIED | (1n << 40n) | (1n << 31n)],
    ['2^53 - 512', 2 ** 53 - 512, true, COPIED | ((1n << 53n) - 512n)],
  ]
  test.each(encodeRows)('encode %s', (_label, l2Offset, copied, expected) => {
    const { hi, lo } = encodeL1Entry({ l2Offset, copied })
    expect(hi).toBeGreaterThanOrEqual(0)
    expect(lo).toBeGreaterThanOrEqual(0)
    expect(hex64(joinHalves(hi, lo))).toBe(hex64(expected))
  })

  test('encode and decode round trip on random cluster-aligned offsets below 2^53', () => {
    const rng = new Rng(0x12)
    for (let i = 0; i < 5000; i++) {
      const alignBits = 9 + rng.below(13) // offsets aligned to 512 B .. 2 MiB
      const l2Offset = Number((rng.bits(53) >> BigInt(alignBits)) << BigInt(alignBits))
      const copied = rng.below(2) === 1
      const { hi, lo } = encodeL1Entry({ l2Offset, copied })
      expect(joinHalves(hi, lo)).toBe(BigInt(l2Offset) | (copied ? COPIED : 0n))
      expect(decodeL1Entry(hi, lo)).toEqual({ l2Offset, copied, reservedBitsSet: false })
    }
  })
})

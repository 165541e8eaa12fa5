/*
 * lib/format/int64.ts: 64-bit big-endian fields as uint32 halves, and the small integer
 * helpers, against BigInt.
 */
import { describe, expect, test } from 'vitest'
import {
  TWO_POW_32,
  alignDown,
  alignUp,
  countTrailingZeros32,
  hex,
  hex64,
  isPowerOfTwo,
  joinU64,
  readU64,
  splitU64,
  writeU64,
} from '../../lib/format/int64.js'
import { Rng, halves } from './bytes.js'

describe('int64', () => {
  test.each([
    [0n],
    [1n],
    [0xffff_ffffn],
    [0x1_0000_0000n],
    [0x8000_0000n],
    [0x12_3456_789a_bcden],
    [(1n << 53n) - 1n],
  ])('readU64 / joinU64 / splitU64 / writeU64 of %s', (value) => {
    const bytes = new Uint8Array(16)
    const view = new DataView(bytes.buffer)
    view.setBigUint64(3, value)
    expect(readU64(view, 3)).toBe(Number(value))
    const { hi, lo } = halves(value)
    expect(joinU64(hi, lo)).toBe(Number(value))
    expect(splitU64(Number(value))).toEqual({ hi, lo })
    const out = new DataView(new ArrayBuffer(16))
    writeU64(out, 5, Number(value))
    expect(out.getBigUint64(5)).toBe(value)
  })

  test.each([[1n << 53n], [1n << 55n], [(1n << 64n) - 1n], [1n << 63n]])('values from 2^53 up are refused: %s', (value) => {
    const view = new DataView(new ArrayBuffer(8))
    view.setBigUint64(0, value)
    expect(() => readU64(view, 0, 'l1_table_offset')).toThrow(RangeError)
    expect(() => readU64(view, 0, 'l1_table_offset')).toThrow(/l1_table_offset 0x[0-9a-f]{16}/)
    const { hi, lo } = halves(value)
    expect(() => joinU64(hi, lo)).toThrow(RangeError)
  })

  test('random values below 2^53 round trip', () => {
    const rng = new Rng(0x41)
    const view = new DataView(new ArrayBuffer(8))
    for (let i = 0; i < 2000; i++) {
      const value = rng.bits(1 + rng.below(53))
      writeU64(view, 0, Number(value))
      expect(view.getBigUint64(0)).toBe(value)
      expect(readU64(view, 0)).toBe(Number(value))
    }
  })

  test('hex64 and hex', () => {
    expect(hex64(0, 0)).toBe('0000000000000000')
    expect(hex64(0x80000000 | 0, 0xffffffff | 0)).toBe('80000000ffffffff')
    expect(hex64(0x4480_0000, 0x508b5)).toBe('44800000000508b5')
    expect(hex(0x1f000)).toBe('0x1f000')
    expect(hex(2 ** 40)).toBe('0x10000000000')
    expect(TWO_POW_32).toBe(2 ** 32)
  })

  test.each([
    [0, 512, 0, 0],
    [1, 512, 512, 0],
    [511, 512, 512, 0],
    [512, 512, 512, 512],
    [513, 512, 1024, 512],
    [2 ** 32 + 1, 65536, 2 ** 32 + 65536, 2 ** 32],
    [2 ** 40 - 1, 2 ** 21, 2 ** 40, 2 ** 40 - 2 ** 21],
    [2 ** 52 + 3, 8, 2 ** 52 + 8, 2 ** 52],
  ])('alignUp / alignDown(%i, %i)', (n, alignment, up, down) => {
    expect(alignUp(n, alignment)).toBe(up)
    expect(alignDown(n, alignment)).toBe(down)
  })

  test('isPowerOfTwo below 2^32', () => {
    for (let bit = 0; bit < 32; bit++) {
      expect(isPowerOfTwo(2 ** bit), `2^${bit}`).toBe(true)
      if (bit >= 2) expect(isPowerOfTwo(2 ** bit + 1), `2^${bit} + 1`).toBe(false)
      if (bit >= 2) expect(isPowerOfTwo(2 ** bit - 1), `2^${bit} - 1`).toBe(false)
    }
    for (const n of [0, -1, -2, 0.5, 3, 6, 12, 0xffffffff, NaN, Infinity]) expect(isPowerOfTwo(n), String(n)).toBe(false)
  })

  test('isPowerOfTwo from 2^32 up to 2^53', () => {
    for (let bit = 32; bit < 53; bit++) expect(isPowerOfTwo(2 ** bit), `2^${bit}`).toBe(true)
    // Sums of two powers of two are not powers of two, whatever their low 32 bits are.
    expect(isPowerOfTwo(2 ** 32 + 2 ** 33)).toBe(false)
    expect(isPowerOfTwo(3 * 2 ** 32)).toBe(false)
    expect(isPowerOfTwo(2 ** 40 + 2 ** 32)).toBe(false)
    expect(isPowerOfTwo(2 ** 40 + 1)).toBe(false)
  })

  test('countTrailingZeros32', () => {
    expect(countTrailingZeros32(0)).toBe(32)
    for (let bit = 0; bit < 32; bit++) {
      expect(countTrailingZeros32(2 ** bit)).toBe(bit)
      expect(countTrailingZeros32((0xffffffff << bit) >>> 0)).toBe(bit)
      expect(countTrailingZeros32((0xffffffff << bit) | 0)).toBe(bit) // signed input
    }
  })
})

/*
 * lib/format/l2-entry.ts: standard cluster descriptors, the cluster and subcluster type
 * tables (standard and extended L2 entries), subcluster bitmap masks, and compressed cluster
 * descriptors for every cluster size, against BigInt encodings of the qcow2 specification.
 */
import { describe, expect, test } from 'vitest'
import {
  ClusterType,
  SubclusterType,
  clusterTypeOf,
  compressedSizeShift,
  decodeCompressedDescriptor,
  encodeCompressedEntry,
  isCompressedEntry,
  isCopiedEntry,
  l2EntryHostOffset,
  subclusterRangeMask,
  subclusterTypeNames,
  subclusterTypeOf,
} from '../../lib/format/l2-entry.js'
import { Rng, U32_MASK, halves, hex64, joinHalves } from './bytes.js'

const COPIED = 1n << 63n
const COMPRESSED = 1n << 62n
const ZERO_FLAG = 1n
const OFFSET_MASK = ((1n << 56n) - 1n) & ~0x1ffn
const STD_RESERVED_MASK = 0x3f00_0000_0000_01fen

type CT = keyof typeof ClusterType
type ST = keyof typeof SubclusterType

// ---------------------------------------------------------------------------------------------
// Oracles written from the specification text
// ---------------------------------------------------------------------------------------------

/** Cluster type per spec "Standard Cluster Descriptor" / "External data file" rules. */
function clusterOracle(entry: bigint, extendedL2: boolean, dataFile: boolean): CT {
  if ((entry & COMPRESSED) !== 0n) return 'COMPRESSED'
  const hostOffset = entry & OFFSET_MASK
  // Bit 0 "reads as zeros" only exists without extended L2 entries.
  if (!extendedL2 && (entry & ZERO_FLAG) !== 0n) return hostOffset !== 0n ? 'ZERO_ALLOC' : 'ZERO_PLAIN'
  if (hostOffset === 0n) {
    // With an external data file, offset 0 is a real cluster when COPIED marks it allocated.
    return dataFile && (entry & COPIED) !== 0n ? 'NORMAL' : 'UNALLOCATED'
  }
  return 'NORMAL'
}

/** Subcluster type per spec "Extended L2 Entries" (allocation bits 0-31, zero bits 32-63). */
function subclusterOracle(entry: bigint, bitmap: bigint, sc: number, extendedL2: boolean, dataFile: boolean): ST {
  const cluster = clusterOracle(entry, extendedL2, dataFile)
  if (!extendedL2) {
    const map: Record<CT, ST> = {
      UNALLOCATED: 'UNALLOCATED_PLAIN',
      ZERO_PLAIN: 'ZERO_PLAIN',
      ZERO_ALLOC: 'ZERO_ALLOC',
      NORMAL: 'NORMAL',
      COMPRESSED: 'COMPRESSED',
    }
    return map[cluster]
  }
  if (cluster === 'COMPRESSED') return 'COMPRESSED'
  const alloc = bitmap & U32_MASK
  const zero = bitmap >> 32n
  const bit = 1n << BigInt(sc)
  if (cluster === 'NORMAL') {
    if ((alloc & zero) !== 0n) return 'INVALID' // some subcluster both allocated and zero
    if ((zero & bit) !== 0n) return 'ZERO_ALLOC'
    if ((alloc & bit) !== 0n) return 'NORMAL'
    return 'UNALLOCATED_ALLOC'
  }
  if (alloc !== 0n) return 'INVALID' // allocated subcluster but no host cluster
  if ((zero & bit) !== 0n) return 'ZERO_PLAIN'
  return 'UNALLOCATED_PLAIN'
}

function subclusterTypeOfBig(entry: bigint, bitmap: bigint, sc: number, extendedL2: boolean, dataFile: boolean): ST {
  const e = halves(entry)
  const b = halves(bitmap)
  const type = subclusterTypeOf(e.hi, e.lo, b.hi, b.lo, sc, extendedL2, dataFile)
  const name = (Object.keys(SubclusterType) as ST[]).find((k) => SubclusterType[k] === type)
  if (!name) throw new Error(`subclusterTypeOf returned an unknown value ${String(type)}`)
  return name
}

function clusterTypeOfBig(entry: bigint, extendedL2: boolean, dataFile: boolean): CT {
  const e = halves(entry)
  const type = clusterTypeOf(e.hi, e.lo, extendedL2, dataFile)
  const name = (Object.keys(ClusterType) as CT[]).find((k) => ClusterType[k] === type)
  if (!name) throw new Error(`clusterTypeOf returned an unknown value ${String(type)}`)
  return name
}

const zeroBit = (sc: number): bigint => 1n << BigInt(32 + sc)
const allocBit = (sc: number): bigint => 1n << BigInt(sc)

describe('l2-entry', () => {
  // -------------------------------------------------------------------------------------------
  describe('standard cluster descriptor', () => {
    type Row = [label: string, entry: bigint, hostOffset: number]
    const rows: Row[] = [
      ['zero', 0n, 0],
      ['COPIED and compressed flags do not leak into the offset', COPIED | COMPRESSED, 0],
      ['smallest offset: bit 9', 0x200n, 512],
      ['largest offset bit: bit 55', 1n << 55n, 2 ** 55],
      ['every offset bit', OFFSET_MASK, 2 ** 56 - 512],
      ['bit 31 of the low word', 0x8000_0000n, 0x8000_0000],
      ['bit 31 of the low word with COPIED', COPIED | 0x8000_0000n, 0x8000_0000],
      ['above 2^32', COPIED | 0x1_2345_0000n, 0x1_2345_0000],
      ['above 2^40', 0x3ff_ffff_fe00n, 0x3ff_ffff_fe00],
      ['zero flag', 0x50001n, 0x50000],
      ['reserved bits 1-8 and 56-61', STD_RESERVED_MASK | 0x7_0000n, 0x7_0000],
      ['every bit set', (1n << 64n) - 1n, 2 ** 56 - 512],
    ]
    test.each(rows)('host offset: %s', (_label, entry, hostOffset) => {
      const { hi, lo } = halves(entry)
      expect(l2EntryHostOffset(hi, lo)).toBe(hostOffset)
      expect(l2EntryHostOffset(hi | 0, lo | 0)).toBe(hostOffset)
    })

    test('host offset of random entries equals bits 9-55', () => {
      const rng = new Rng(0x21)
      for (let i = 0; i < 5000; i++) {
        const entry = rng.next64()
        const { hi, lo } = halves(entry)
        expect(BigInt(l2EntryHostOffset(hi, lo)), hex64(entry)).toBe(entry & OFFSET_MASK)
      }
    })

    test.each([
      [0n, false, false],
      [COPIED, false, true],
      [COMPRESSED, true, false],
      [COPIED | COMPRESSED, true, true],
      [(1n << 62n) - 1n, false, false],
    ])('flags of %s: compressed %s, copied %s', (entry, compressed, copied) => {
      const { hi } = halves(entry)
      expect(isCompressedEntry(hi)).toBe(compressed)
      expect(isCopiedEntry(hi)).toBe(copied)
      expect(isCopiedEntry(hi | 0)).toBe(copied)
    })
  })

  // -------------------------------------------------------------------------------------------
  describe('cluster type', () => {
    type Row = [label: string, entry: bigint, extendedL2: boolean, dataFile: boolean, expected: CT]
    const rows: Row[] = [
      ['all zero', 0n, false, false, 'UNALLOCATED'],
      ['all zero, extended L2', 0n, true, false, 'UNALLOCATED'],
      ['offset with COPIED', COPIED | 0x50000n, false, false, 'NORMAL'],
      ['offset without COPIED (shared cluster)', 0x50000n, false, false, 'NORMAL'],
      ['offset bit 55 only', 1n << 55n, false, false, 'NORMAL'],
      ['offset bit 9 only', 0x200n, false, false, 'NORMAL'],
      ['offset in the low word bit 31 only', 0x8000_0000n, false, false, 'NORMAL'],
      ['zero flag, no offset', ZERO_FLAG, false, false, 'ZERO_PLAIN'],
      ['zero flag with offset', ZERO_FLAG | 0x50000n | COPIED, false, false, 'ZERO_ALLOC'],
      ['zero flag with an offset above 2^32', ZERO_FLAG | 0x1_0000_0000n, false, false, 'ZERO_ALLOC'],
      ['zero flag ignored with extended L2, no offset', ZERO_FLAG, true, false, 'UNALLOCATED'],
      ['zero flag ignored with extended L2, with offset', ZERO_FLAG | COPIED | 0x50000n, true, false, 'NORMAL'],
      ['compressed', COMPRESSED | 0x1234n, false, false, 'COMPRESSED'],
      ['compressed with the zero flag', COMPRESSED | ZERO_FLAG, false, false, 'COMPRESSED'],
      ['compressed with every descriptor bit', COMPRESSED | ((1n << 62n) - 1n), false, false, 'COMPRESSED'],
      ['compressed, extended L2', COMPRESSED | 0x1234n, true, false, 'COMPRESSED'],
      ['reserved bits only', STD_RESERVED_MASK, false, false, 'UNALLOCATED'],
      ['COPIED without offset, no data file', COPIED, false, false, 'UNALLOCATED'],
      ['external data file: offset 0 with COPIED', COPIED, false, true, 'NORMAL'],
      ['external data file: offset 0 with COPIED, extended L2', COPIED, true, true, 'NORMAL'],
      ['external data file: offset 0 without COPIED', 0n, false, true, 'UNALLOCATED'],
      ['external data file: zero flag wins over COPIED', COPIED | ZERO_FLAG, false, true, 'ZERO_PLAIN'],
      ['external data file: ordinary offset', COPIED | 0x20_0000n, false, true, 'NORMAL'],
    ]
    test.each(rows)('%s', (_label, entry, extendedL2, dataFile, expected) => {
      expect(clusterTypeOfBig(entry, extendedL2, dataFile)).toBe(expected)
      expect(clusterOracle(entry, extendedL2, dataFile)).toBe(expected)
    })

    test('random entries agree with the oracle', () => {
      const rng = new Rng(0x22)
      for (let i = 0; i < 4000; i++) {
        // Random bits, biased towards the interesting ones: no offset, flags.
        let entry = rng.next64()
        if (rng.below(3) === 0) entry &= ~OFFSET_MASK
        if (rng.below(2) === 0) entry &= ~COMPRESSED
        for (const extendedL2 of [false, true]) {
          for (const dataFile of [false, true]) {
            expect(clusterTypeOfBig(entry, extendedL2, dataFile), hex64(entry)).toBe(
              clusterOracle(entry, extendedL2, dataFile),
            )
          }
        }
      }
    })
  })

  // -------------------------------------------------------------------------------------------
  describe('subcluster type', () => {
    const normal = COPIED | 0x50000n

    test('the names table has an entry per type', () => {
      for (const value of Object.values(SubclusterType)) expect(subclusterTypeNames[value]).toMatch(/\w/)
    })

    // Standard L2 entries: one subcluster per cluster; bitmap arguments are ignored.
    type StdRow = [label: string, entry: bigint, dataFile: boolean, expected: ST]
    const standardRows: StdRow[] = [
      ['unallocated', 0n, false, 'UNALLOCATED_PLAIN'],
      ['zero, no host cluster', ZERO_FLAG, false, 'ZERO_PLAIN'],
      ['zero, host cluster', ZERO_FLAG | normal, false, 'ZERO_ALLOC'],
      ['normal', normal, false, 'NORMAL'],
      ['compressed', COMPRESSED | 0x12345n, false, 'COMPRESSED'],
      ['external data file, offset 0 + COPIED', COPIED, true, 'NORMAL'],
    ]
    test.each(standardRows)('standard entry: %s', (_label, entry, dataFile, expected) => {
      for (const bitmap of [0n, (1n << 64n) - 1n, zeroBit(0) | allocBit(0), allocBit(31)]) {
        for (const sc of [0, 1, 31]) {
          expect(subclusterTypeOfBig(entry, bitmap, sc, false, dataFile)).toBe(expected)
        }
      }
    })

    // Extended L2 entries: the rows of the type table (cluster type x bitmap).
    type ExtRow = [label: string, entry: bigint, bitmap: bigint, sc: number, dataFile: boolean, expected: ST]
    const extendedRows: ExtRow[] = [
      // UNALLOCATED cluster -> UNALLOCATED_PLAIN / ZERO_PLAIN, or INVALID with any alloc bit
      ['no host cluster, empty bitmap, sc 0', 0n, 0n, 0, false, 'UNALLOCATED_PLAIN'],
      ['no host cluster, empty bitmap, sc 31', 0n, 0n, 31, false, 'UNALLOCATED_PLAIN'],
      ['no host cluster, zero bit of sc 0', 0n, zeroBit(0), 0, false, 'ZERO_PLAIN'],
      ['no host cluster, zero bit of sc 0, asking sc 1', 0n, zeroBit(0), 1, false, 'UNALLOCATED_PLAIN'],
      ['no host cluster, bitmap bit 63 (zero sc 31), sc 31', 0n, zeroBit(31), 31, false, 'ZERO_PLAIN'],
      ['no host cluster, bitmap bit 63, asking sc 30', 0n, zeroBit(31), 30, false, 'UNALLOCATED_PLAIN'],
      ['no host cluster, all zero bits, sc 17', 0n, 0xffff_ffffn << 32n, 17, false, 'ZERO_PLAIN'],
      ['no host cluster, alloc bit of the same sc', 0n, allocBit(5), 5, false, 'INVALID'],
      ['no host cluster, alloc bit of another sc', 0n, allocBit(5), 6, false, 'INVALID'],
      ['no host cluster, alloc bit 31, asking sc 0', 0n, allocBit(31), 0, false, 'INVALID'],
      ['no host cluster, alloc bit 0 and zero bit 0', 0n, allocBit(0) | zeroBit(0), 0, false, 'INVALID'],
      ['COPIED without offset (no data file): alloc bit is invalid', COPIED, allocBit(3), 3, false, 'INVALID'],
      // NORMAL cluster -> UNALLOCATED_ALLOC / ZERO_ALLOC / NORMAL, or INVALID on alloc+zero
      ['host cluster, empty bitmap, sc 0', normal, 0n, 0, false, 'UNALLOCATED_ALLOC'],
      ['host cluster, empty bitmap, sc 31', normal, 0n, 31, false, 'UNALLOCATED_ALLOC'],
      ['host cluster, alloc bit 0, sc 0', normal, allocBit(0), 0, false, 'NORMAL'],
      ['host cluster, alloc bit 0, sc 1', normal, allocBit(0), 1, false, 'UNALLOCATED_ALLOC'],
      ['host cluster, alloc bit 31, sc 31', normal, allocBit(31), 31, false, 'NORMAL'],
      ['host cluster, all alloc bits, sc 31', normal, U32_MASK, 31, false, 'NORMAL'],
      ['host cluster, zero bit 0, sc 0', normal, zeroBit(0), 0, false, 'ZERO_ALLOC'],
      ['host cluster, bitmap bit 63 (zero sc 31), sc 31', normal, zeroBit(31), 31, false, 'ZERO_ALLOC'],
      ['host cluster, bitmap bit 63, sc 0', normal, zeroBit(31), 0, false, 'UNALLOCATED_ALLOC'],
      ['host cluster, alloc 3 and zero 4: sc 3', normal, allocBit(3) | zeroBit(4), 3, false, 'NORMAL'],
      ['host cluster, alloc 3 and zero 4: sc 4', normal, allocBit(3) | zeroBit(4), 4, false, 'ZERO_ALLOC'],
      ['host cluster, alloc and zero on sc 7, asking sc 7', normal, allocBit(7) | zeroBit(7), 7, false, 'INVALID'],
      ['host cluster, alloc and zero on sc 7, asking sc 0', normal, allocBit(7) | zeroBit(7), 0, false, 'INVALID'],
      ['host cluster, alloc and zero on sc 31, asking sc 0', normal, allocBit(31) | zeroBit(31), 0, false, 'INVALID'],
      ['host cluster, every bit set', normal, (1n << 64n) - 1n, 12, false, 'INVALID'],
      ['host cluster without COPIED, alloc bit', 0x50000n, allocBit(9), 9, false, 'NORMAL'],
      // COMPRESSED: the bitmap is ignored
      ['compressed, empty bitmap', COMPRESSED | 0x1234n, 0n, 0, false, 'COMPRESSED'],
      ['compressed, every bitmap bit set', COMPRESSED | 0x1234n, (1n << 64n) - 1n, 0, false, 'COMPRESSED'],
      ['compressed, alloc+zero on sc 31', COMPRESSED | 0x1234n, allocBit(31) | zeroBit(31), 31, false, 'COMPRESSED'],
      // Bit 0 (the v3 zero flag) has no meaning with extended L2
      ['zero flag, no offset, empty bitmap', ZERO_FLAG, 0n, 0, false, 'UNALLOCATED_PLAIN'],
      ['zero flag with offset and alloc bit', ZERO_FLAG | normal, allocBit(0), 0, false, 'NORMAL'],
      ['zero flag with offset, empty bitmap', ZERO_FLAG | normal, 0n, 0, false, 'UNALLOCATED_ALLOC'],
      // External data file: offset 0 + COPIED is a host cluster
      ['data file, offset 0 + COPIED, alloc bit', COPIED, allocBit(0), 0, true, 'NORMAL'],
      ['data file, offset 0 + COPIED, zero bit', COPIED, zeroBit(2), 2, true, 'ZERO_ALLOC'],
      ['data file, offset 0 + COPIED, empty bitmap', COPIED, 0n, 31, true, 'UNALLOCATED_ALLOC'],
      ['data file, offset 0 without COPIED, alloc bit', 0n, allocBit(0), 0, true, 'INVALID'],
    ]
    test.each(extendedRows)('extended entry: %s', (_label, entry, bitmap, sc, dataFile, expected) => {
      expect(subclusterTypeOfBig(entry, bitmap, sc, true, dataFile)).toBe(expected)
      expect(subclusterOracle(entry, bitmap, sc, true, dataFile)).toBe(expected)
    })

    test('bitmap halves given as signed int32 (bit 31 / bit 63 set)', () => {
      const e = halves(normal)
      // zero bit of subcluster 31 = bitmap bit 63 = bit 31 of the high word
      expect(subclusterTypeOf(e.hi, e.lo, 0x80000000 | 0, 0, 31, true, false)).toBe(SubclusterType.ZERO_ALLOC)
      expect(subclusterTypeOf(e.hi, e.lo, 0, 0x80000000 | 0, 31, true, false)).toBe(SubclusterType.NORMAL)
      expect(subclusterTypeOf(e.hi, e.lo, 0x80000000 | 0, 0x80000000 | 0, 0, true, false)).toBe(SubclusterType.INVALID)
    })

    test('every subcluster of random entries and bitmaps agrees with the oracle', () => {
      const rng = new Rng(0x23)
      const firstWords = [0n, COPIED, normal, 0x50000n, ZERO_FLAG, ZERO_FLAG | normal, COMPRESSED | 0x9876n, 1n << 55n]
      for (let i = 0; i < 600; i++) {
        const entry = i < 200 ? firstWords[i % firstWords.length]! : rng.next64() & ~(rng.below(2) ? OFFSET_MASK : 0n)
        // Sparse bitmaps make valid entries likely; dense ones exercise INVALID.
        const sparse = (): bigint => rng.next64() & rng.next64() & rng.next64()
        const bitmap = rng.below(3) === 0 ? rng.next64() : sparse() & ~((sparse() & U32_MASK) << 32n)
        for (const dataFile of [false, true]) {
          for (let sc = 0; sc < 32; sc++) {
            for (const extendedL2 of [false, true]) {
              expect(subclusterTypeOfBig(entry, bitmap, sc, extendedL2, dataFile), `${hex64(entry)} ${hex64(bitmap)} sc ${sc}`).toBe(
                subclusterOracle(entry, bitmap, sc, extendedL2, dataFile),
              )
            }
          }
        }
      }
    })
  })

  // -------------------------------------------------------------------------------------------
  describe('subclusterRangeMask', () => {
    const oracle = (first: number, end: number): number => Number((1n << BigInt(end)) - (1n << BigInt(first)))

    test.each([
      [0, 32, 0xffffffff],
      [31, 32, 0x80000000],
      [0, 31, 0x7fffffff],
      [0, 1, 0x00000001],
      [1, 32, 0xfffffffe],
      [16, 32, 0xffff0000],
      [0, 16, 0x0000ffff],
      [30, 31, 0x40000000],
      [3, 7, 0x00000078],
    ])('[%i, %i) = %i', (first, end, mask) => {
      expect(subclusterRangeMask(first, end)).toBe(mask)
      expect(oracle(first, end)).toBe(mask)
    })

    test.each(Array.from({ length: 33 }, (_, x) => x))('empty range [%i, %i)', (x) => {
      expect(subclusterRangeMask(x, x)).toBe(0)
    })

    test('every pair 0 <= first <= end <= 32 matches the BigInt oracle, unsigned', () => {
      for (let first = 0; first <= 32; first++) {
        for (let end = first; end <= 32; end++) {
          const mask = subclusterRangeMask(first, end)
          expect(mask, `[${first}, ${end})`).toBe(oracle(first, end))
          expect(mask).toBeGreaterThanOrEqual(0)
        }
      }
    })

    test('random pairs match the BigInt oracle', () => {
      const rng = new Rng(0x24)
      for (let i = 0; i < 2000; i++) {
        const a = rng.below(33)
        const b = rng.below(33)
        const [first, end] = a <= b ? [a, b] : [b, a]
        expect(subclusterRangeMask(first, end), `[${first}, ${end})`).toBe(oracle(first, end))
      }
    })
  })

  // -------------------------------------------------------------------------------------------
  describe('compressed cluster descriptor', () => {
    const CLUSTER_BITS = Array.from({ length: 13 }, (_, i) => 9 + i) // 9..21

    /** Spec: x = 62 - (cluster_bits - 8); offset bits 0..x-1, additional sectors bits x..61. */
    const xOf = (clusterBits: number): bigint => BigInt(62 - (clusterBits - 8))

    function encodeOracle(hostOffset: bigint, additionalSectors: bigint, clusterBits: number): bigint {
      return COMPRESSED | (additionalSectors << xOf(clusterBits)) | hostOffset
    }

    function decodeOracle(entry: bigint, clusterBits: number): { hostOffset: bigint; sectorCount: bigint; compressedSize: bigint } {
      const x = xOf(clusterBits)
      const hostOffset = entry & ((1n << x) - 1n)
      const additional = (entry >> x) & ((1n << (62n - x)) - 1n)
      const sectorCount = additional + 1n
      return { hostOffset, sectorCount, compressedSize: sectorCount * 512n - (hostOffset % 512n) }
    }

    /** Additional sectors touched by `length` bytes at `offset`, beyond the first. */
    const additionalSectorsFor = (offset: bigint, length: bigint): bigint => (offset + length - 1n) / 512n - offset / 512n

    test.each(CLUSTER_BITS)('cluster_bits %i: the size field starts at bit 62 - (cluster_bits - 8)', (clusterBits) => {
      expect(compressedSizeShift(clusterBits)).toBe(Number(xOf(clusterBits)))
    })

    test('the worked example: 64 KiB clusters, offset 0x50010, 1000 bytes', () => {
      const { hi, lo } = encodeCompressedEntry(0x50010, 1000, 16)
      expect(hex64(joinHalves(hi, lo))).toBe('0x4040000000050010')
      expect(decodeCompressedDescriptor(hi, lo, 16)).toEqual({ hostOffset: 0x50010, sectorCount: 2, compressedSize: 1008 })
    })

    test('a real entry written by QEMU: 0x44800000000508b5 (64 KiB clusters)', () => {
      const { hi, lo } = halves(0x44800000000508b5n)
      expect(isCompressedEntry(hi)).toBe(true)
      expect(decodeCompressedDescriptor(hi, lo, 16)).toEqual({ hostOffset: 0x508b5, sectorCount: 19, compressedSize: 9547 })
    })

    test('COPIED (bit 63) is not part of the descriptor', () => {
      const { hi, lo } = halves(COPIED | 0x44800000000508b5n)
      expect(decodeCompressedDescriptor(hi, lo, 16)).toEqual({ hostOffset: 0x508b5, sectorCount: 19, compressedSize: 9547 })
    })

    test.each(CLUSTER_BITS)('cluster_bits %i: encode/decode round trips against the BigInt oracle', (clusterBits) => {
      const rng = new Rng(0x100 + clusterBits)
      const clusterBytes = 2 ** clusterBits
      const maxAdditional = (1n << BigInt(clusterBits - 8)) - 1n
      for (let i = 0; i < 1500; i++) {
        // Offsets: small, around 2^31/2^32, and large (below 2^53, the JS exact range).
        const kind = i % 4
        const hostOffset =
          kind === 0
            ? BigInt(rng.below(1 << 24))
            : kind === 1
              ? 0x7fff_f000n + BigInt(rng.below(0x2_0000))
              : kind === 2
                ? rng.bits(40)
                : rng.bits(53)
        // Lengths up to a little past what the sector field can describe.
        const length = 1 + rng.below(Math.min((Number(maxAdditional) + 2) * 512, clusterBytes * 2))
        const additional = additionalSectorsFor(hostOffset, BigInt(length))
        const label = `cluster_bits ${clusterBits}, offset ${hostOffset}, length ${length}`
        if (additional > maxAdditional || hostOffset >= 1n << xOf(clusterBits)) {
          // Too many sectors for the field, or an offset wider than the offset field.
          expect(() => encodeCompressedEntry(Number(hostOffset), length, clusterBits), label).toThrow(RangeError)
          continue
        }
        const { hi, lo } = encodeCompressedEntry(Number(hostOffset), length, clusterBits)
        const entry = joinHalves(hi, lo)
        expect(hex64(entry), label).toBe(hex64(encodeOracle(hostOffset, additional, clusterBits)))
        const want = decodeOracle(entry, clusterBits)
        const got = decodeCompressedDescriptor(hi, lo, clusterBits)
        expect(got, label).toEqual({
          hostOffset: Number(want.hostOffset),
          sectorCount: Number(want.sectorCount),
          compressedSize: Number(want.compressedSize),
        })
        // The size to read covers the data written, and ends on a sector boundary.
        expect(got!.compressedSize).toBeGreaterThanOrEqual(length)
        expect((Number(hostOffset) + got!.compressedSize) % 512).toBe(0)
      }
    })

    test.each(CLUSTER_BITS)('cluster_bits %i: random descriptors decode like the oracle', (clusterBits) => {
      const rng = new Rng(0x200 + clusterBits)
      const x = xOf(clusterBits)
      for (let i = 0; i < 2000; i++) {
        // Random descriptor bits with the offset kept below 2^53 (most) or anywhere (some).
        let entry = COMPRESSED | rng.bits(62)
        if (i % 5 !== 0) {
          const offset = rng.bits(Math.min(53, Number(x)) - rng.below(20))
          entry = (entry & ~((1n << x) - 1n)) | offset
        }
        const { hi, lo } = halves(entry)
        const want = decodeOracle(entry, clusterBits)
        const got = decodeCompressedDescriptor(hi, lo, clusterBits)
        if (want.hostOffset >= 1n << 53n) {
          // Bits 56 and up are not a valid host offset; 53..55 do not fit a JS number.
          expect(got, hex64(entry)).toBeUndefined()
          continue
        }
        expect(got, hex64(entry)).toEqual({
          hostOffset: Number(want.hostOffset),
          sectorCount: Number(want.sectorCount),
          compressedSize: Number(want.compressedSize),
        })
      }
    })

    test.each(CLUSTER_BITS)('cluster_bits %i: largest sector count', (clusterBits) => {
      const x = xOf(clusterBits)
      const maxAdditional = (1n << (62n - x)) - 1n
      const hostOffset = 0x1_2345_6000n + 0x1a3n
      const entry = encodeOracle(hostOffset, maxAdditional, clusterBits)
      const { hi, lo } = halves(entry)
      const sectorCount = 2 ** (clusterBits - 8)
      expect(decodeCompressedDescriptor(hi, lo, clusterBits)).toEqual({
        hostOffset: Number(hostOffset),
        sectorCount,
        compressedSize: sectorCount * 512 - 0x1a3,
      })
      // The longest data the field can describe from this offset encodes; one byte more cannot.
      const longest = sectorCount * 512 - 0x1a3
      const encoded = encodeCompressedEntry(Number(hostOffset), longest, clusterBits)
      expect(joinHalves(encoded.hi, encoded.lo)).toBe(entry)
      expect(() => encodeCompressedEntry(Number(hostOffset), longest + 1, clusterBits)).toThrow(RangeError)
    })

    test.each(CLUSTER_BITS)('cluster_bits %i: offsets using bit 53 and up decode to undefined', (clusterBits) => {
      const x = Number(xOf(clusterBits))
      // Offset bits 56 and up are invalid per spec; 53-55 are valid but not exact as JS numbers.
      for (let bit = 53; bit < x; bit++) {
        const { hi, lo } = halves(COMPRESSED | (1n << BigInt(bit)) | 0x200n)
        expect(decodeCompressedDescriptor(hi, lo, clusterBits), `bit ${bit}`).toBeUndefined()
      }
      if (x > 56) {
        const top = halves(COMPRESSED | (1n << BigInt(x - 1)))
        expect(decodeCompressedDescriptor(top.hi, top.lo, clusterBits)).toBeUndefined()
      }
      // The largest offset the field holds below 2^53 decodes exactly.
      const largestOffset = (1n << BigInt(Math.min(x, 53))) - 1n
      const largest = halves(COMPRESSED | largestOffset)
      expect(decodeCompressedDescriptor(largest.hi, largest.lo, clusterBits)).toEqual({
        hostOffset: Number(largestOffset),
        sectorCount: 1,
        compressedSize: 1,
      })
      // Where bits 53..61 belong to the sector count, setting them is not an offset problem.
      for (let bit = Math.max(x, 53); bit < 62; bit++) {
        const { hi, lo } = halves(COMPRESSED | (1n << BigInt(bit)) | 0x200n)
        expect(decodeCompressedDescriptor(hi, lo, clusterBits), `bit ${bit}`).toEqual({
          hostOffset: 0x200,
          sectorCount: 2 ** (bit - x) + 1,
          compressedSize: (2 ** (bit - x) + 1) * 512,
        })
      }
    })

    test.each(CLUSTER_BITS)('cluster_bits %i: offsets with bit 31 of the low word set', (clusterBits) => {
      const hostOffset = 0x8000_0000 + 0x1ff
      const { hi, lo } = encodeCompressedEntry(hostOffset, 1, clusterBits)
      expect(lo).toBe(0x800001ff)
      expect(decodeCompressedDescriptor(hi, lo | 0, clusterBits)).toEqual({ hostOffset, sectorCount: 1, compressedSize: 1 })
      expect(decodeCompressedDescriptor(hi | 0, lo, clusterBits)).toEqual({ hostOffset, sectorCount: 1, compressedSize: 1 })
    })

    test('data ending exactly on a sector boundary takes no extra sector', () => {
      const { hi, lo } = encodeCompressedEntry(0x1000, 512, 16)
      expect(decodeCompressedDescriptor(hi, lo, 16)).toEqual({ hostOffset: 0x1000, sectorCount: 1, compressedSize: 512 })
      const next = encodeCompressedEntry(0x1000, 513, 16)
      expect(decodeCompressedDescriptor(next.hi, next.lo, 16)?.sectorCount).toBe(2)
    })

    test('encoded entries have COPIED clear and the compressed bit set', () => {
      for (const clusterBits of CLUSTER_BITS) {
        const { hi } = encodeCompressedEntry(2 ** 40 + 77, 100, clusterBits)
        expect(isCompressedEntry(hi)).toBe(true)
        expect(isCopiedEntry(hi)).toBe(false)
      }
    })
  })
})

/*
 * lib/format/constants.ts: the numbers of the qcow2 specification, checked against the spec's
 * text (magic strings, extension types, field offsets) and against each other (the bit masks
 * of L1, L2 and refcount table entries partition their 64 bits).
 */
import { describe, expect, test } from 'vitest'
import * as K from '../../lib/format/constants.js'
import { joinHalves } from './bytes.js'

const ALL_ONES = (1n << 64n) - 1n
const mask = (hi: number, lo: number): bigint => joinHalves(hi, lo)
/** Bits first..last inclusive. */
const bits = (first: number, last: number): bigint => ((1n << BigInt(last + 1)) - 1n) & ~((1n << BigInt(first)) - 1n)

describe('constants', () => {
  test('magic is "QFI\\xfb"', () => {
    const bytes = new Uint8Array(4)
    new DataView(bytes.buffer).setUint32(0, K.QCOW_MAGIC)
    expect(Array.from(bytes)).toEqual([0x51, 0x46, 0x49, 0xfb])
  })

  test.each([
    ['EXT_BACKING_FORMAT', K.EXT_BACKING_FORMAT, 0xe2792aca],
    ['EXT_FEATURE_NAME_TABLE', K.EXT_FEATURE_NAME_TABLE, 0x6803f857],
    ['EXT_BITMAPS', K.EXT_BITMAPS, 0x23852875],
    ['EXT_CRYPTO_HEADER', K.EXT_CRYPTO_HEADER, 0x0537be77],
    ['EXT_DATA_FILE', K.EXT_DATA_FILE, 0x44415441],
    ['EXT_END', K.EXT_END, 0],
  ])('%s', (_name, value, spec) => {
    expect(value).toBe(spec)
  })

  test('header layout numbers', () => {
    expect(K.V2_HEADER_LENGTH).toBe(72)
    expect(K.V3_MIN_HEADER_LENGTH).toBe(104)
    expect([K.MIN_CLUSTER_BITS, K.MAX_CLUSTER_BITS, K.MIN_CLUSTER_BITS_EXTENDED_L2]).toEqual([9, 21, 14])
    expect(K.MAX_BACKING_FILE_NAME_SIZE).toBe(1023)
    expect([K.CRYPT_NONE, K.CRYPT_AES, K.CRYPT_LUKS]).toEqual([0, 1, 2])
    expect([K.COMPRESSION_TYPE_ZLIB, K.COMPRESSION_TYPE_ZSTD]).toEqual([0, 1])
    expect(K.MAX_REFCOUNT_ORDER).toBe(6)
    expect(K.V2_REFCOUNT_ORDER).toBe(4)
    expect(K.FEATURE_NAME_ENTRY_SIZE).toBe(2 + K.FEATURE_NAME_MAX_LENGTH)
  })

  test('header field offsets (spec: "Header")', () => {
    expect(K.HeaderOffset).toEqual({
      magic: 0,
      version: 4,
      backingFileOffset: 8,
      backingFileSize: 16,
      clusterBits: 20,
      size: 24,
      cryptMethod: 32,
      l1Size: 36,
      l1TableOffset: 40,
      refcountTableOffset: 48,
      refcountTableClusters: 56,
      snapshotCount: 60,
      snapshotsOffset: 64,
      incompatibleFeatures: 72,
      compatibleFeatures: 80,
      autoclearFeatures: 88,
      refcountOrder: 96,
      headerLength: 100,
      compressionType: 104,
    })
  })

  test('feature bits', () => {
    expect([K.INCOMPAT_DIRTY_BIT, K.INCOMPAT_CORRUPT_BIT, K.INCOMPAT_DATA_FILE_BIT, K.INCOMPAT_COMPRESSION_BIT, K.INCOMPAT_EXTL2_BIT]).toEqual([
      0, 1, 2, 3, 4,
    ])
    expect([...K.KNOWN_INCOMPAT_BITS].sort()).toEqual([0, 1, 2, 3, 4])
    expect(K.COMPAT_LAZY_REFCOUNTS_BIT).toBe(0)
    expect([K.AUTOCLEAR_BITMAPS_BIT, K.AUTOCLEAR_DATA_FILE_RAW_BIT]).toEqual([0, 1])
  })

  test('L1 entry: offset bits 9-55, reserved 0-8 and 56-62, COPIED 63', () => {
    const offset = mask(K.L1E_OFFSET_MASK_HI, K.L1E_OFFSET_MASK_LO)
    const reserved = mask(K.L1E_RESERVED_MASK_HI, K.L1E_RESERVED_MASK_LO)
    const copied = mask(K.OFLAG_COPIED_HI, 0)
    expect(offset).toBe(bits(9, 55))
    expect(reserved).toBe(bits(0, 8) | bits(56, 62))
    expect(copied).toBe(1n << 63n)
    expect(offset | reserved | copied).toBe(ALL_ONES)
  })

  test('standard L2 entry: zero flag 0, reserved 1-8 and 56-61, offset 9-55, compressed 62, COPIED 63', () => {
    const offset = mask(K.L2E_OFFSET_MASK_HI, K.L2E_OFFSET_MASK_LO)
    const reserved = mask(K.L2E_STD_RESERVED_MASK_HI, K.L2E_STD_RESERVED_MASK_LO)
    const zero = mask(0, K.OFLAG_ZERO_LO)
    const compressed = mask(K.OFLAG_COMPRESSED_HI, 0)
    const copied = mask(K.OFLAG_COPIED_HI, 0)
    expect(offset).toBe(bits(9, 55))
    expect(reserved).toBe(bits(1, 8) | bits(56, 61))
    expect([zero, compressed, copied]).toEqual([1n, 1n << 62n, 1n << 63n])
    expect(offset | reserved | zero | compressed | copied).toBe(ALL_ONES)
    for (const [a, b] of [
      [offset, reserved],
      [offset, zero],
      [reserved, zero],
      [reserved, compressed],
    ] as const) {
      expect(a & b).toBe(0n)
    }
    expect(K.MAX_HOST_OFFSET_BITS).toBe(56)
  })

  test('refcount table entry: offset bits 9-63', () => {
    expect(mask(K.REFT_OFFSET_MASK_HI, K.REFT_OFFSET_MASK_LO)).toBe(bits(9, 63))
  })

  test('table entry sizes and subclusters', () => {
    expect([K.TABLE_ENTRY_SIZE, K.EXTENDED_L2_ENTRY_SIZE, K.SUBCLUSTERS_PER_CLUSTER]).toEqual([8, 16, 32])
    expect(2 ** K.COMPRESSED_SECTOR_BITS).toBe(K.COMPRESSED_SECTOR_SIZE)
    expect(K.COMPRESSED_SECTOR_SIZE).toBe(512)
    // With extended L2 and the smallest allowed clusters, a subcluster is 512 bytes.
    expect(2 ** K.MIN_CLUSTER_BITS_EXTENDED_L2 / K.SUBCLUSTERS_PER_CLUSTER).toBe(512)
  })

  test('snapshot table numbers', () => {
    expect(K.SNAPSHOT_ENTRY_FIXED_SIZE).toBe(40)
    expect(K.SNAPSHOT_ENTRY_ALIGNMENT).toBe(8)
    expect(K.SNAPSHOT_EXTRA_DATA_MIN_V3).toBe(16)
  })
})

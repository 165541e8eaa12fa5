/*
 * lib/format/header.ts: the fixed header, header extensions, backing file name and feature
 * checks. Headers are built byte by byte at the spec's offsets, and real images are made by
 * qemu-img at test time; every parsed field is compared with what was written or with
 * `qemu-img info --output=json`. Each rejection is checked for its error class and message.
 */
import { writeFileSync } from 'node:fs'
import { stat } from 'node:fs/promises'
import * as path from 'node:path'
import { afterAll, beforeAll, describe, expect, test } from 'vitest'
import { CorruptImageError, UnsupportedFeatureError, type Qcow2Error } from '../../lib/errors.js'
import { l1EntriesFor, makeGeometry } from '../../lib/format/geometry.js'
import {
  HEADER_PROBE_SIZE,
  type Qcow2Header,
  checkIncompatibleFeatures,
  hasFeatureBit,
  headerFlags,
  parseBackingFileName,
  parseHeader,
  parseHeaderExtensions,
  unknownIncompatibleBits,
} from '../../lib/format/header.js'
import { type QemuTools, makeTempDir, qemuImg, qemuInfo, removeTempDir, requireQemu, run } from '../helpers/qemu.js'
import {
  EXT,
  type HeaderSpec,
  ascii,
  buildHeader,
  concatBytes,
  extensionStart,
  featureNameEntry,
  readFileRange,
  u64Bytes,
  writeExtensions,
} from './bytes.js'

/** Runs fn and returns what it threw (fails the test if it did not throw). */
function thrown(fn: () => unknown): Qcow2Error {
  try {
    fn()
  } catch (err) {
    return err as Qcow2Error
  }
  throw new Error('expected an exception, none was thrown')
}

function parseAll(bytes: Uint8Array): { header: Qcow2Header; ext: ReturnType<typeof parseHeaderExtensions> } {
  const header = parseHeader(bytes)
  return { header, ext: parseHeaderExtensions(header, bytes) }
}

describe('header', () => {
  // -------------------------------------------------------------------------------------------
  describe('fixed fields built byte by byte', () => {
    test('version 2: every field, v3 fields defaulted', () => {
      const bytes = buildHeader(
        {
          version: 2,
          cluster_bits: 16,
          size: 10n * 2n ** 30n,
          l1_size: 20,
          l1_table_offset: 0x30000n,
          refcount_table_offset: 0x10000n,
          refcount_table_clusters: 3,
          nb_snapshots: 2,
          snapshots_offset: 0x123450000n,
        },
        72,
      )
      expect(parseHeader(bytes)).toEqual({
        version: 2,
        backingFileOffset: 0,
        backingFileSize: 0,
        clusterBits: 16,
        virtualSize: 10 * 2 ** 30,
        cryptMethod: 0,
        l1Size: 20,
        l1TableOffset: 0x30000,
        refcountTableOffset: 0x10000,
        refcountTableClusters: 3,
        snapshotCount: 2,
        snapshotsOffset: 0x123450000,
        incompatibleFeatures: { hi: 0, lo: 0 },
        compatibleFeatures: { hi: 0, lo: 0 },
        autoclearFeatures: { hi: 0, lo: 0 },
        refcountOrder: 4,
        headerLength: 72,
        compressionType: 0,
      })
    })

    test('version 2 ignores whatever follows byte 72 (no v3 fields)', () => {
      const bytes = buildHeader({ version: 2, cluster_bits: 12 }, 4096)
      // Bytes that would be incompatible_features / refcount_order / header_length in v3.
      bytes.fill(0xff, 72, 104)
      const h = parseHeader(bytes)
      expect(h.incompatibleFeatures).toEqual({ hi: 0, lo: 0 })
      expect(h.refcountOrder).toBe(4)
      expect(h.headerLength).toBe(72)
    })

    test('version 3 with the minimal 104-byte header: compression type defaults to zlib', () => {
      const bytes = buildHeader({
        version: 3,
        cluster_bits: 12,
        header_length: 104,
        refcount_order: 0,
        incompatible_features: 1n, // dirty
        compatible_features: 1n, // lazy refcounts
        autoclear_features: 2n, // raw external data
      })
      bytes[104] = 1 // outside header_length: must not be read as compression_type
      const h = parseHeader(bytes)
      expect(h.version).toBe(3)
      expect(h.headerLength).toBe(104)
      expect(h.compressionType).toBe(0)
      expect(h.refcountOrder).toBe(0)
      expect(h.incompatibleFeatures).toEqual({ hi: 0, lo: 1 })
      expect(h.compatibleFeatures).toEqual({ hi: 0, lo: 1 })
      expect(h.autoclearFeatures).toEqual({ hi: 0, lo: 2 })
      expect(headerFlags.dirty(h)).toBe(true)
      expect(headerFlags.lazyRefcounts(h)).toBe(true)
      expect(headerFlags.dataFileRaw(h)).toBe(true)
      expect(headerFlags.corrupt(h)).toBe(false)
      expect(headerFlags.externalDataFile(h)).toBe(false)
      expect(headerFlags.extendedL2(h)).toBe(false)
    })

    test('version 3 with a 112-byte header and compression_type zstd', () => {
      const h = parseHeader(
        buildHeader({ version: 3, header_length: 112, compression_type: 1, incompatible_features: 1n << 3n }),
      )
      expect(h.headerLength).toBe(112)
      expect(h.compressionType).toBe(1)
    })

    test('64-bit fields above 2^32 and up to 2^53 - 1', () => {
      const h = parseHeader(
        buildHeader({
          size: 2n ** 40n + 512n,
          l1_table_offset: 0x12_3456_0000n,
          refcount_table_offset: 2n ** 52n,
          snapshots_offset: 2n ** 53n - 65536n,
          backing_file_offset: 0n,
        }),
      )
      expect(h.virtualSize).toBe(2 ** 40 + 512)
      expect(h.l1TableOffset).toBe(0x12_3456_0000)
      expect(h.refcountTableOffset).toBe(2 ** 52)
      expect(h.snapshotsOffset).toBe(2 ** 53 - 65536)
    })

    test('uint32 fields with bit 31 set stay unsigned', () => {
      const h = parseHeader(buildHeader({ l1_size: 0x80000001, nb_snapshots: 0xffffffff, refcount_table_clusters: 0x80000000 }))
      expect(h.l1Size).toBe(0x80000001)
      expect(h.snapshotCount).toBe(0xffffffff)
      expect(h.refcountTableClusters).toBe(0x80000000)
    })

    test('feature bits in the high halves (bits 32-63)', () => {
      const h = parseHeader(
        buildHeader({
          incompatible_features: 1n << 2n, // external data file (known)
          compatible_features: (1n << 63n) | (1n << 40n) | 1n,
          autoclear_features: (1n << 33n) | 1n,
        }),
      )
      expect(h.compatibleFeatures).toEqual({ hi: 0x80000100, lo: 1 })
      expect(h.autoclearFeatures).toEqual({ hi: 2, lo: 1 })
      expect(hasFeatureBit(h.compatibleFeatures, 63)).toBe(true)
      expect(hasFeatureBit(h.compatibleFeatures, 40)).toBe(true)
      expect(hasFeatureBit(h.compatibleFeatures, 39)).toBe(false)
      expect(hasFeatureBit(h.compatibleFeatures, 0)).toBe(true)
      expect(hasFeatureBit(h.autoclearFeatures, 33)).toBe(true)
      expect(hasFeatureBit(h.autoclearFeatures, 1)).toBe(false)
      expect(headerFlags.externalDataFile(h)).toBe(true)
      expect(headerFlags.dataFileRaw(h)).toBe(false)
    })

    test.each([9, 10, 12, 16, 20, 21])('cluster_bits %i is accepted', (clusterBits) => {
      // The header must fit in one cluster: 512-byte clusters take the 104-byte v3 header.
      expect(parseHeader(buildHeader({ cluster_bits: clusterBits, header_length: 104 })).clusterBits).toBe(clusterBits)
    })

    test.each([0, 1, 2, 3, 4, 5, 6])('refcount_order %i is accepted', (order) => {
      expect(parseHeader(buildHeader({ refcount_order: order })).refcountOrder).toBe(order)
    })

    test('header_length equal to the cluster size is accepted', () => {
      const h = parseHeader(buildHeader({ cluster_bits: 9, header_length: 512 }))
      expect(h.headerLength).toBe(512)
    })

    test('HEADER_PROBE_SIZE bytes are enough for any header', () => {
      const full = buildHeader({ header_length: 112, compression_type: 1, incompatible_features: 1n << 3n })
      expect(parseHeader(full.subarray(0, HEADER_PROBE_SIZE))).toEqual(parseHeader(full))
    })
  })

  // -------------------------------------------------------------------------------------------
  describe('rejections', () => {
    type Row = [label: string, spec: HeaderSpec, errorClass: typeof CorruptImageError, message: RegExp]
    const rows: Row[] = [
      ['bad magic', { magic: 0x514649fc }, CorruptImageError, /magic/],
      ['QED magic', { magic: 0x51454400 }, CorruptImageError, /not a qcow2 image/],
      ['version 1', { version: 1 }, UnsupportedFeatureError, /version 1\b/],
      ['version 4', { version: 4 }, UnsupportedFeatureError, /version 4\b/],
      ['version 0', { version: 0 }, UnsupportedFeatureError, /version 0\b/],
      ['cluster_bits 8', { cluster_bits: 8 }, CorruptImageError, /cluster_bits 8\b/],
      ['cluster_bits 22', { cluster_bits: 22 }, CorruptImageError, /cluster_bits 22\b/],
      ['cluster_bits 0', { cluster_bits: 0 }, CorruptImageError, /cluster_bits 0\b/],
      ['header_length 108 (not a multiple of 8)', { header_length: 108 }, CorruptImageError, /header_length 108.*multiple of 8/],
      ['header_length 113 (not a multiple of 8)', { header_length: 113 }, CorruptImageError, /multiple of 8/],
      ['header_length 96 (too small)', { header_length: 96 }, CorruptImageError, /header_length 96.*too small/],
      ['header_length 72 in a v3 header', { header_length: 72 }, CorruptImageError, /too small/],
      ['header_length 0', { header_length: 0 }, CorruptImageError, /too small/],
      [
        'header_length 520 with 512-byte clusters (larger than a cluster)',
        { cluster_bits: 9, header_length: 520 },
        CorruptImageError,
        /header_length 520.*larger than a cluster/,
      ],
      [
        'header_length 4104 with 4 KiB clusters',
        { cluster_bits: 12, header_length: 4104 },
        CorruptImageError,
        /larger than a cluster/,
      ],
      ['refcount_order 7', { refcount_order: 7 }, CorruptImageError, /refcount_order 7\b/],
      ['refcount_order 0xffffffff', { refcount_order: 0xffffffff }, CorruptImageError, /refcount_order/],
      ['crypt_method 1 (AES)', { crypt_method: 1 }, UnsupportedFeatureError, /encrypt/i],
      ['crypt_method 2 (LUKS)', { crypt_method: 2 }, UnsupportedFeatureError, /encrypt/i],
      ['crypt_method 1 in a v2 header', { version: 2, crypt_method: 1 }, UnsupportedFeatureError, /encrypt/i],
      [
        'compression type bit set, compression_type zlib',
        { incompatible_features: 1n << 3n, compression_type: 0 },
        CorruptImageError,
        /compression type/,
      ],
      [
        'compression type bit set in a 104-byte header (no compression_type field)',
        { incompatible_features: 1n << 3n, header_length: 104 },
        CorruptImageError,
        /compression type/,
      ],
      [
        'compression_type zstd without the compression type bit',
        { compression_type: 1 },
        CorruptImageError,
        /compression_type/,
      ],
      [
        'unknown compression_type 2 with the bit',
        { incompatible_features: 1n << 3n, compression_type: 2 },
        UnsupportedFeatureError,
        /compression type 2/,
      ],
      [
        'extended L2 with cluster_bits 13',
        { cluster_bits: 13, incompatible_features: 1n << 4n },
        CorruptImageError,
        /extended L2/,
      ],
      [
        'extended L2 with cluster_bits 9',
        { cluster_bits: 9, header_length: 104, incompatible_features: 1n << 4n },
        CorruptImageError,
        /extended L2/,
      ],
      [
        'backing file name of 1024 bytes',
        { backing_file_offset: 0x200n, backing_file_size: 1024 },
        CorruptImageError,
        /backing file name length 1024/,
      ],
      [
        'backing file name length 0 with an offset',
        { backing_file_offset: 0x200n, backing_file_size: 0 },
        CorruptImageError,
        /backing file name length 0/,
      ],
      [
        'backing file name running past the first cluster',
        { cluster_bits: 12, backing_file_offset: 4090n, backing_file_size: 7 },
        CorruptImageError,
        /outside the header cluster/,
      ],
      [
        'backing file name starting past the first cluster',
        { cluster_bits: 12, backing_file_offset: 8192n, backing_file_size: 8 },
        CorruptImageError,
        /outside the header cluster/,
      ],
      ['size of 2^63', { size: 1n << 63n }, CorruptImageError, /size/],
      ['l1_table_offset of 2^53', { l1_table_offset: 1n << 53n }, CorruptImageError, /l1_table_offset/],
      ['snapshots_offset all ones', { snapshots_offset: (1n << 64n) - 1n }, CorruptImageError, /snapshots_offset/],
      [
        'backing_file_offset above 2^53',
        { backing_file_offset: 1n << 60n, backing_file_size: 8 },
        CorruptImageError,
        /backing_file_offset/,
      ],
    ]
    test.each(rows)('%s', (_label, spec, errorClass, message) => {
      const err = thrown(() => parseHeader(buildHeader(spec)))
      expect(err).toBeInstanceOf(errorClass)
      expect(err.message).toMatch(message)
      expect(err.message).not.toContain('\n')
      expect(err.code).toBe(errorClass === CorruptImageError ? 'CORRUPT_IMAGE' : 'UNSUPPORTED_FEATURE')
      expect(err.errno).toBe(errorClass === CorruptImageError ? 'EIO' : 'ENOTSUP')
    })

    test('the encryption message names the method', () => {
      expect(thrown(() => parseHeader(buildHeader({ crypt_method: 1 }))).message).toContain('AES')
      expect(thrown(() => parseHeader(buildHeader({ crypt_method: 2 }))).message).toContain('LUKS')
    })

    test('extended L2 with cluster_bits 14 (16 KiB, the smallest allowed) is accepted', () => {
      const h = parseHeader(buildHeader({ cluster_bits: 14, incompatible_features: 1n << 4n }))
      expect(headerFlags.extendedL2(h)).toBe(true)
    })

    test('backing file name of exactly 1023 bytes is accepted', () => {
      const h = parseHeader(buildHeader({ cluster_bits: 16, backing_file_offset: 0x200n, backing_file_size: 1023 }))
      expect(h.backingFileSize).toBe(1023)
    })

    test.each([
      ['empty', 0],
      ['3 bytes', 3],
    ])('file too short for the magic (%s)', (_label, length) => {
      const err = thrown(() => parseHeader(buildHeader({}).subarray(0, length)))
      expect(err).toBeInstanceOf(CorruptImageError)
    })

    test.each([4, 8, 40, 71])('version 2 header cut at %i bytes', (length) => {
      const err = thrown(() => parseHeader(buildHeader({ version: 2 }).subarray(0, length)))
      expect(err).toBeInstanceOf(CorruptImageError)
      expect(err.message).toMatch(/truncated/)
    })

    test.each([72, 96, 103])('version 3 header cut at %i bytes', (length) => {
      const err = thrown(() => parseHeader(buildHeader({ version: 3 }).subarray(0, length)))
      expect(err).toBeInstanceOf(CorruptImageError)
      expect(err.message).toMatch(/truncated/)
    })

    test('version 3 header of 112 bytes cut before the compression_type byte', () => {
      const err = thrown(() => parseHeader(buildHeader({ header_length: 112 }).subarray(0, 104)))
      expect(err).toBeInstanceOf(CorruptImageError)
    })
  })

  // -------------------------------------------------------------------------------------------
  describe('incompatible features', () => {
    test.each([0, 1, 2, 4])('known bit %i passes', (bit) => {
      const spec: HeaderSpec = { incompatible_features: 1n << BigInt(bit) }
      const { header, ext } = parseAll(buildHeader(spec))
      expect(unknownIncompatibleBits(header)).toEqual([])
      expect(() => checkIncompatibleFeatures(header, ext)).not.toThrow()
    })

    test('known bit 3 (compression type) passes', () => {
      const { header, ext } = parseAll(buildHeader({ incompatible_features: 1n << 3n, compression_type: 1 }))
      expect(() => checkIncompatibleFeatures(header, ext)).not.toThrow()
    })

    test('unknown bit named by a feature name table entry', () => {
      const spec: HeaderSpec = { incompatible_features: (1n << 13n) | 1n }
      const bytes = buildHeader(spec)
      writeExtensions(bytes, extensionStart(spec), [
        {
          type: EXT.FEATURE_NAME_TABLE,
          data: concatBytes([
            featureNameEntry(0, 0, 'dirty bit'),
            featureNameEntry(0, 13, 'frobnicated clusters'),
            featureNameEntry(1, 13, 'a compatible bit of the same number'),
          ]),
        },
      ])
      const { header, ext } = parseAll(bytes)
      expect(unknownIncompatibleBits(header)).toEqual([13])
      const err = thrown(() => checkIncompatibleFeatures(header, ext))
      expect(err).toBeInstanceOf(UnsupportedFeatureError)
      expect(err.message).toContain('frobnicated clusters')
      expect(err.message).toContain('bit 13')
      expect(err.message).not.toContain('compatible bit of the same number')
      expect(err.message).not.toContain('dirty')
    })

    test('unknown bit without a table entry is named by its number', () => {
      const { header, ext } = parseAll(buildHeader({ incompatible_features: 1n << 5n }))
      const err = thrown(() => checkIncompatibleFeatures(header, ext))
      expect(err).toBeInstanceOf(UnsupportedFeatureError)
      expect(err.message).toMatch(/\bbit 5\b/)
    })

    test('an entry of another type (compatible) does not name an incompatible bit', () => {
      const spec: HeaderSpec = { incompatible_features: 1n << 20n }
      const bytes = buildHeader(spec)
      writeExtensions(bytes, extensionStart(spec), [
        { type: EXT.FEATURE_NAME_TABLE, data: featureNameEntry(1, 20, 'not this one') },
      ])
      const { header, ext } = parseAll(bytes)
      const err = thrown(() => checkIncompatibleFeatures(header, ext))
      expect(err.message).toMatch(/\bbit 20\b/)
      expect(err.message).not.toContain('not this one')
    })

    test('several unknown bits, including bit 63, are all named', () => {
      const spec: HeaderSpec = { incompatible_features: (1n << 63n) | (1n << 31n) | (1n << 7n) | (1n << 2n) }
      const bytes = buildHeader(spec)
      writeExtensions(bytes, extensionStart(spec), [
        { type: EXT.FEATURE_NAME_TABLE, data: featureNameEntry(0, 31, 'bit thirty-one feature') },
      ])
      const { header, ext } = parseAll(bytes)
      expect(unknownIncompatibleBits(header)).toEqual([7, 31, 63])
      const err = thrown(() => checkIncompatibleFeatures(header, ext))
      expect(err).toBeInstanceOf(UnsupportedFeatureError)
      expect(err.message).toMatch(/\bbit 7\b/)
      expect(err.message).toContain("'bit thirty-one feature' (bit 31)")
      expect(err.message).toMatch(/\bbit 63\b/)
    })

    test('unknown compatible and autoclear bits are not an error', () => {
      const { header, ext } = parseAll(
        buildHeader({ compatible_features: (1n << 63n) | (1n << 5n), autoclear_features: (1n << 40n) | (1n << 9n) }),
      )
      expect(() => checkIncompatibleFeatures(header, ext)).not.toThrow()
    })
  })

  // -------------------------------------------------------------------------------------------
  describe('extensions built byte by byte', () => {
    test('every known extension, an unknown one, and the end marker', () => {
      const spec: HeaderSpec = { cluster_bits: 16 }
      const bytes = buildHeader(spec)
      const unknownData = Uint8Array.from([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11])
      const longName = 'n'.repeat(46) // no NUL terminator inside the 46 bytes
      writeExtensions(bytes, extensionStart(spec), [
        { type: EXT.BACKING_FORMAT, data: ascii('qcow2') },
        {
          type: EXT.FEATURE_NAME_TABLE,
          data: concatBytes([
            featureNameEntry(0, 0, 'dirty bit'),
            featureNameEntry(1, 0, 'lazy refcounts'),
            featureNameEntry(2, 1, 'raw external data'),
            featureNameEntry(0, 45, longName),
          ]),
        },
        { type: EXT.BITMAPS, data: concatBytes([u64Bytes((3n << 32n) | 0n, 0x1230n, 0x1_0000_0000n)]) },
        { type: EXT.CRYPTO_HEADER, data: u64Bytes(0x50000n, 0x2000n) },
        { type: EXT.DATA_FILE, data: ascii('disk-data.raw') },
        { type: 0x12345678, data: unknownData },
      ])
      const { header, ext } = parseAll(bytes)
      expect(header.headerLength).toBe(112)
      expect(ext.backingFormat).toBe('qcow2')
      expect(ext.featureNames).toEqual([
        { type: 0, bit: 0, name: 'dirty bit' },
        { type: 1, bit: 0, name: 'lazy refcounts' },
        { type: 2, bit: 1, name: 'raw external data' },
        { type: 0, bit: 45, name: longName },
      ])
      expect(ext.bitmaps).toEqual({ bitmapCount: 3, directorySize: 0x1230, directoryOffset: 0x1_0000_0000 })
      expect(ext.cryptoHeader).toEqual({ offset: 0x50000, length: 0x2000 })
      expect(ext.dataFile).toBe('disk-data.raw')
      expect(ext.unknown).toHaveLength(1)
      expect(ext.unknown[0]!.type).toBe(0x12345678)
      expect(Array.from(ext.unknown[0]!.data)).toEqual(Array.from(unknownData))
    })

    test('unknown extensions are kept in order, as copies of their data', () => {
      const spec: HeaderSpec = {}
      const bytes = buildHeader(spec)
      writeExtensions(bytes, extensionStart(spec), [
        { type: 0xaaaa0001, data: Uint8Array.from([0xde, 0xad]) },
        { type: EXT.BACKING_FORMAT, data: ascii('raw') },
        { type: 0xaaaa0002, data: new Uint8Array(0) },
        { type: 0xffffffff, data: Uint8Array.from([1, 2, 3, 4, 5, 6, 7, 8]) },
      ])
      const ext = parseHeaderExtensions(parseHeader(bytes), bytes)
      expect(ext.unknown.map((u) => [u.type, Array.from(u.data)])).toEqual([
        [0xaaaa0001, [0xde, 0xad]],
        [0xaaaa0002, []],
        [0xffffffff, [1, 2, 3, 4, 5, 6, 7, 8]],
      ])
      expect(ext.backingFormat).toBe('raw')
      // A copy: later changes to the header buffer do not show through.
      bytes.fill(0)
      expect(Array.from(ext.unknown[0]!.data)).toEqual([0xde, 0xad])
    })

    test('nothing is read after the end marker', () => {
      const spec: HeaderSpec = {}
      const bytes = buildHeader(spec)
      const at = writeExtensions(bytes, extensionStart(spec), [{ type: EXT.BACKING_FORMAT, data: ascii('qcow2') }])
      // A duplicate and an over-long extension after the end marker must both be ignored.
      writeExtensions(bytes, at, [
        { type: EXT.BACKING_FORMAT, data: ascii('raw') },
        { type: 0x77777777, data: new Uint8Array(8), length: 0x7fffffff },
      ])
      const ext = parseHeaderExtensions(parseHeader(bytes), bytes)
      expect(ext.backingFormat).toBe('qcow2')
      expect(ext.unknown).toEqual([])
    })

    test('no extensions at all (zero bytes after the header)', () => {
      const ext = parseHeaderExtensions(parseHeader(buildHeader({})), buildHeader({}))
      expect(ext).toEqual({ featureNames: [], unknown: [] })
    })

    test('version 2 extensions start at byte 72', () => {
      const spec: HeaderSpec = { version: 2, cluster_bits: 12 }
      const bytes = buildHeader(spec)
      expect(extensionStart(spec)).toBe(72)
      writeExtensions(bytes, 72, [{ type: EXT.BACKING_FORMAT, data: ascii('raw') }])
      expect(parseHeaderExtensions(parseHeader(bytes), bytes).backingFormat).toBe('raw')
    })

    test('a v3 header longer than 112 bytes: extensions start at header_length', () => {
      const spec: HeaderSpec = { header_length: 128 }
      const bytes = buildHeader(spec)
      bytes.fill(0xee, 112, 128) // unknown additional header fields
      writeExtensions(bytes, 128, [{ type: EXT.DATA_FILE, data: ascii('d.raw') }])
      const { header, ext } = parseAll(bytes)
      expect(header.headerLength).toBe(128)
      expect(ext.dataFile).toBe('d.raw')
    })

    test('extensions stop at the backing file name; the name is read from its offset', () => {
      const name = 'base image.qcow2'
      const spec: HeaderSpec = { cluster_bits: 12, backing_file_offset: 0xc0n, backing_file_size: name.length }
      const bytes = buildHeader(spec)
      // Exactly fills 112..0xc0: 8 + 72 bytes, no end marker: the name follows directly.
      const end = writeExtensions(bytes, 112, [{ type: EXT.BACKING_FORMAT, data: ascii('qcow2'.padEnd(72, '\0')) }], false)
      expect(end).toBe(0xc0)
      bytes.set(ascii(name), 0xc0)
      const { header, ext } = parseAll(bytes)
      expect(ext.backingFormat).toBe('qcow2')
      expect(ext.unknown).toEqual([])
      expect(parseBackingFileName(header, bytes)).toBe(name)
    })

    test('no backing file: parseBackingFileName gives undefined', () => {
      const bytes = buildHeader({})
      expect(parseBackingFileName(parseHeader(bytes), bytes)).toBeUndefined()
    })

    test('backing file name of 1023 bytes, with bytes outside ASCII', () => {
      const name = 'dir/é-' + 'x'.repeat(1023 - 7) // 'é' takes two bytes
      expect(ascii(name).length).toBe(1023)
      const bytes = buildHeader({ cluster_bits: 16, backing_file_offset: 0x1000n, backing_file_size: 1023 })
      bytes.set(ascii(name), 0x1000)
      expect(parseBackingFileName(parseHeader(bytes), bytes)).toBe(name)
    })

    test('backing file name past the end of a short file is corrupt', () => {
      const full = buildHeader({ cluster_bits: 16, backing_file_offset: 0x200n, backing_file_size: 16 })
      const bytes = full.subarray(0, 0x208)
      const err = thrown(() => parseBackingFileName(parseHeader(bytes), bytes))
      expect(err).toBeInstanceOf(CorruptImageError)
    })

    type ExtRow = [label: string, spec: HeaderSpec, build: (bytes: Uint8Array, at: number) => void, message: RegExp]
    const extRejections: ExtRow[] = [
      [
        'an extension whose length runs past the cluster',
        { cluster_bits: 12 },
        (bytes, at) => writeExtensions(bytes, at, [{ type: 0x11111111, data: new Uint8Array(8), length: 4096 - at - 8 + 1 }]),
        /too long/,
      ],
      [
        'an extension with length 0xffffffff',
        { cluster_bits: 12 },
        (bytes, at) => writeExtensions(bytes, at, [{ type: EXT.BACKING_FORMAT, data: new Uint8Array(8), length: 0xffffffff }]),
        /too long/,
      ],
      [
        'an extension running into the backing file name',
        { cluster_bits: 12, backing_file_offset: 0x100n, backing_file_size: 4 },
        (bytes, at) => writeExtensions(bytes, at, [{ type: EXT.DATA_FILE, data: new Uint8Array(0x100 - at - 8 + 1) }]),
        /too long/,
      ],
      [
        'a duplicated known extension',
        {},
        (bytes, at) =>
          writeExtensions(bytes, at, [
            { type: EXT.BACKING_FORMAT, data: ascii('qcow2') },
            { type: EXT.BACKING_FORMAT, data: ascii('raw') },
          ]),
        /twice/,
      ],
      [
        'a duplicated unknown extension',
        {},
        (bytes, at) =>
          writeExtensions(bytes, at, [
            { type: 0x5a5a5a5a, data: ascii('one') },
            { type: EXT.DATA_FILE, data: ascii('d') },
            { type: 0x5a5a5a5a, data: ascii('two') },
          ]),
        /twice/,
      ],
      [
        'a bitmaps extension shorter than 24 bytes',
        {},
        (bytes, at) => writeExtensions(bytes, at, [{ type: EXT.BITMAPS, data: new Uint8Array(16) }]),
        /bitmaps/,
      ],
      [
        'a crypto header extension shorter than 16 bytes',
        {},
        (bytes, at) => writeExtensions(bytes, at, [{ type: EXT.CRYPTO_HEADER, data: new Uint8Array(8) }]),
        /encryption header/,
      ],
      [
        'a bitmaps extension with a directory offset above 2^53',
        {},
        (bytes, at) => writeExtensions(bytes, at, [{ type: EXT.BITMAPS, data: u64Bytes(1n << 32n, 16n, 1n << 60n) }]),
        /bitmaps/,
      ],
    ]
    test.each(extRejections)('%s is CorruptImageError', (_label, spec, build, message) => {
      const bytes = buildHeader(spec)
      build(bytes, extensionStart(spec))
      const header = parseHeader(bytes)
      const err = thrown(() => parseHeaderExtensions(header, bytes))
      expect(err).toBeInstanceOf(CorruptImageError)
      expect(err.message).toMatch(message)
      expect(err.message).not.toContain('\n')
    })

    test('an extension ending exactly at the end of the cluster is accepted', () => {
      const spec: HeaderSpec = { cluster_bits: 12 }
      const bytes = buildHeader(spec)
      const at = extensionStart(spec)
      const data = new Uint8Array(4096 - at - 8).fill(0x41)
      writeExtensions(bytes, at, [{ type: 0x22222222, data }], false)
      const ext = parseHeaderExtensions(parseHeader(bytes), bytes)
      expect(ext.unknown).toHaveLength(1)
      expect(ext.unknown[0]!.data.length).toBe(data.length)
    })

    test('a header buffer longer than the cluster: extensions are confined to the first cluster', () => {
      const spec: HeaderSpec = { cluster_bits: 12 }
      const bytes = buildHeader(spec, 8192)
      const at = extensionStart(spec)
      writeExtensions(bytes, at, [{ type: 0x11111111, data: new Uint8Array(4096 - at) }])
      const err = thrown(() => parseHeaderExtensions(parseHeader(bytes), bytes))
      expect(err).toBeInstanceOf(CorruptImageError)
    })
  })
})

// ---------------------------------------------------------------------------------------------
// Real images made by qemu-img
// ---------------------------------------------------------------------------------------------

const qemu = requireQemu('header: images made by qemu-img')

interface ImageCase {
  label: string
  /** qemu-img create -o options. */
  options: string
  sizeBytes: number
  /** Make a backing file first and pass -b/-F. */
  backing?: { format: 'qcow2' | 'raw' }
}

const KiB = 1024
const MiB = 1024 * KiB
const GiB = 1024 * MiB

const imageCases: ImageCase[] = [
  ...[512, 1 * KiB, 4 * KiB, 64 * KiB, 2 * MiB].map((cs) => ({
    label: `compat 1.1, cluster ${cs}`,
    options: `compat=1.1,cluster_size=${cs}`,
    sizeBytes: 3 * GiB + 7 * MiB,
  })),
  ...[512, 64 * KiB, 2 * MiB].map((cs) => ({
    label: `compat 0.10, cluster ${cs}`,
    options: `compat=0.10,cluster_size=${cs}`,
    sizeBytes: 1 * GiB,
  })),
  ...[1, 2, 4, 8, 16, 32, 64].map((bits) => ({
    label: `refcount_bits ${bits}`,
    options: `compat=1.1,refcount_bits=${bits}`,
    sizeBytes: 100 * MiB,
  })),
  ...[16 * KiB, 64 * KiB, 2 * MiB].map((cs) => ({
    label: `extended_l2, cluster ${cs}`,
    options: `extended_l2=on,cluster_size=${cs}`,
    sizeBytes: 5 * GiB,
  })),
  { label: 'compression_type=zstd', options: 'compression_type=zstd', sizeBytes: 64 * MiB },
  {
    label: 'zstd + extended L2 + lazy refcounts + refcount_bits 8',
    options: 'compression_type=zstd,extended_l2=on,lazy_refcounts=on,refcount_bits=8',
    sizeBytes: 64 * MiB,
  },
  { label: 'lazy_refcounts', options: 'lazy_refcounts=on', sizeBytes: 64 * MiB },
  { label: 'size not a multiple of the cluster', options: 'cluster_size=4096', sizeBytes: 10 * MiB + 512 },
  { label: 'size above 2^40', options: 'cluster_size=2097152', sizeBytes: 2 ** 41 },
  { label: 'backing file, -F qcow2', options: 'compat=1.1', sizeBytes: 32 * MiB, backing: { format: 'qcow2' } },
  { label: 'backing file, -F raw', options: 'cluster_size=4096', sizeBytes: 32 * MiB, backing: { format: 'raw' } },
  { label: 'compat 0.10 backing file, -F qcow2', options: 'compat=0.10', sizeBytes: 32 * MiB, backing: { format: 'qcow2' } },
  { label: 'data_file', options: 'data_file=DATA', sizeBytes: 16 * MiB },
  { label: 'data_file, data_file_raw', options: 'data_file=DATA,data_file_raw=on', sizeBytes: 16 * MiB },
]

interface InfoJson {
  'virtual-size': number
  'cluster-size': number
  'dirty-flag'?: boolean
  'backing-filename'?: string
  'backing-filename-format'?: string
  snapshots?: unknown[]
  'format-specific': {
    data: {
      compat: string
      'compression-type'?: string
      'lazy-refcounts'?: boolean
      'refcount-bits': number
      corrupt?: boolean
      'extended-l2'?: boolean
      'data-file'?: string
      'data-file-raw'?: boolean
    }
  }
}

/** The first cluster of an image (or the whole file if it is shorter). */
async function headerClusterOf(file: string): Promise<Uint8Array> {
  const probe = parseHeader(readFileRange(file, 0, HEADER_PROBE_SIZE))
  const fileBytes = (await stat(file)).size
  return readFileRange(file, 0, Math.min(2 ** probe.clusterBits, fileBytes))
}

describe.skipIf(!qemu)('header of images made by qemu-img', () => {
  const tools = qemu as QemuTools
  let dir = ''
  beforeAll(async () => {
    dir = await makeTempDir('format-header')
  })
  afterAll(async () => {
    if (dir) await removeTempDir(dir)
  })

  let serial = 0
  async function create(c: ImageCase): Promise<{ file: string; dataFile?: string; backingName?: string }> {
    serial += 1
    const file = path.join(dir, `img${serial}.qcow2`)
    const args = ['create', '-q', '-f', 'qcow2']
    let options = c.options
    let dataFile: string | undefined
    if (options.includes('data_file=DATA')) {
      dataFile = `img${serial}-data.raw`
      options = options.replace('DATA', path.join(dir, dataFile))
    }
    let backingName: string | undefined
    if (c.backing) {
      backingName = `base${serial}.${c.backing.format === 'raw' ? 'img' : 'qcow2'}`
      await qemuImg(tools, ['create', '-q', '-f', c.backing.format, path.join(dir, backingName), String(c.sizeBytes)])
      // A relative name, stored as given, resolved by qemu-img against the image's directory.
      args.push('-b', backingName, '-F', c.backing.format)
    }
    args.push('-o', options, file, String(c.sizeBytes))
    await qemuImg(tools, args, { cwd: dir })
    return { file, ...(dataFile ? { dataFile: path.join(dir, dataFile) } : {}), ...(backingName ? { backingName } : {}) }
  }

  test.each(imageCases.map((c) => [c.label, c] as const))('%s', async (_label, c) => {
    const { file, dataFile, backingName } = await create(c)
    const info = (await qemuInfo(tools, file)) as unknown as InfoJson
    const data = info['format-specific'].data
    const bytes = await headerClusterOf(file)
    const header = parseHeader(bytes)
    const ext = parseHeaderExtensions(header, bytes)
    expect(() => checkIncompatibleFeatures(header, ext)).not.toThrow()

    expect(header.version).toBe(data.compat === '0.10' ? 2 : 3)
    expect(2 ** header.clusterBits).toBe(info['cluster-size'])
    expect(header.virtualSize).toBe(info['virtual-size'])
    expect(header.virtualSize).toBe(c.sizeBytes)
    expect(2 ** header.refcountOrder).toBe(data['refcount-bits'])
    expect(header.cryptMethod).toBe(0)
    expect(header.compressionType).toBe(data['compression-type'] === 'zstd' ? 1 : 0)
    expect(headerFlags.lazyRefcounts(header)).toBe(data['lazy-refcounts'] ?? false)
    expect(headerFlags.extendedL2(header)).toBe(data['extended-l2'] ?? false)
    expect(headerFlags.corrupt(header)).toBe(data.corrupt ?? false)
    expect(headerFlags.dirty(header)).toBe(info['dirty-flag'] ?? false)
    expect(headerFlags.externalDataFile(header)).toBe(data['data-file'] !== undefined)
    expect(headerFlags.dataFileRaw(header)).toBe(data['data-file-raw'] ?? false)
    expect(header.snapshotCount).toBe(info.snapshots?.length ?? 0)
    if (header.version === 2) expect(header.headerLength).toBe(72)
    else expect(header.headerLength % 8).toBe(0)

    // Table placement: cluster aligned, inside the file; L1 large enough for the disk.
    const fileBytes = (await stat(file)).size
    const clusterBytes = 2 ** header.clusterBits
    for (const offset of [header.l1TableOffset, header.refcountTableOffset]) {
      expect(offset % clusterBytes).toBe(0)
      expect(offset).toBeGreaterThan(0)
      expect(offset).toBeLessThan(fileBytes)
    }
    expect(header.refcountTableClusters).toBeGreaterThan(0)
    expect(header.l1Size).toBe(l1EntriesFor(makeGeometry(header.clusterBits, headerFlags.extendedL2(header)), header.virtualSize))

    // Extensions
    expect(ext.dataFile).toBe(data['data-file'])
    if (dataFile !== undefined) expect(ext.dataFile).toBe(dataFile)
    expect(ext.backingFormat).toBe(info['backing-filename-format'])
    expect(parseBackingFileName(header, bytes)).toBe(info['backing-filename'])
    if (backingName !== undefined) {
      expect(parseBackingFileName(header, bytes)).toBe(backingName)
      expect(ext.backingFormat).toBe(c.backing?.format)
    }
    expect(ext.unknown).toEqual([])
    expect(ext.bitmaps).toBeUndefined()
    expect(ext.cryptoHeader).toBeUndefined()
    if (header.version === 3 && (clusterBytes >= 64 * KiB || ext.featureNames.length > 0)) {
      // QEMU writes a feature name table naming the features it knows (qemu-img 7.2 leaves it
      // out of images with clusters of 4 KiB or less).
      expect(ext.featureNames).toEqual(
        expect.arrayContaining([
          { type: 0, bit: 0, name: 'dirty bit' },
          { type: 0, bit: 1, name: 'corrupt bit' },
          { type: 0, bit: 2, name: 'external data file' },
          { type: 0, bit: 3, name: 'compression type' },
          { type: 0, bit: 4, name: 'extended L2 entries' },
          { type: 1, bit: 0, name: 'lazy refcounts' },
          { type: 2, bit: 0, name: 'bitmaps' },
          { type: 2, bit: 1, name: 'raw external data' },
        ]),
      )
    }
  })

  test('dirty bit left by qemu-io killed with lazy refcounts', async () => {
    const { file } = await create({ label: 'dirty', options: 'lazy_refcounts=on', sizeBytes: 16 * MiB })
    // qemu-io writes with lazy refcounts (setting the dirty bit), then dies without cleanup.
    await expect(run(tools.qemuIo, ['-f', 'qcow2', '-c', 'write 0 4k', '-c', 'sigraise 9', file])).rejects.toThrow()
    const info = (await qemuInfo(tools, file)) as unknown as InfoJson
    expect(info['dirty-flag']).toBe(true)
    const header = parseHeader(await headerClusterOf(file))
    expect(headerFlags.dirty(header)).toBe(true)
    expect(headerFlags.lazyRefcounts(header)).toBe(true)
  })

  test('corrupt bit set in a real image agrees with qemu-img info', async () => {
    const { file } = await create({ label: 'corrupt', options: 'compat=1.1', sizeBytes: 16 * MiB })
    const bytes = await headerClusterOf(file)
    new DataView(bytes.buffer).setUint32(76, new DataView(bytes.buffer).getUint32(76) | 2)
    writeFileSync(file, bytes.subarray(0, 80), { flag: 'r+' })
    const info = (await qemuInfo(tools, file)) as unknown as InfoJson
    expect(info['format-specific'].data.corrupt).toBe(true)
    expect(headerFlags.corrupt(parseHeader(await headerClusterOf(file)))).toBe(true)
  })

  test('unknown incompatible bit: named from the image feature table, like qemu-img names it', async () => {
    const { file } = await create({ label: 'unknown-bit', options: 'compat=1.1', sizeBytes: 16 * MiB })
    const bytes = await headerClusterOf(file)
    const view = new DataView(bytes.buffer)
    // Set incompatible bit 9, and rename QEMU's own table entry for bit 4 to describe bit 9.
    view.setUint32(76, view.getUint32(76) | (1 << 9))
    const before = parseHeaderExtensions(parseHeader(bytes), bytes)
    expect(before.featureNames.some((f) => f.type === 0 && f.bit === 4)).toBe(true)
    let at = parseHeader(bytes).headerLength
    let renamed = false
    while (!renamed) {
      const type = view.getUint32(at)
      const length = view.getUint32(at + 4)
      expect(type).not.toBe(0)
      if (type === EXT.FEATURE_NAME_TABLE) {
        for (let i = at + 8; i < at + 8 + length; i += 48) {
          if (bytes[i] === 0 && bytes[i + 1] === 4) {
            bytes[i + 1] = 9
            bytes.fill(0, i + 2, i + 48)
            bytes.set(ascii('frobnicated clusters'), i + 2)
            renamed = true
          }
        }
      }
      at += 8 + Math.ceil(length / 8) * 8
    }
    writeFileSync(file, bytes, { flag: 'r+' })

    // The oracle: qemu-img refuses the image and names the feature from the table.
    await expect(qemuImg(tools, ['info', file])).rejects.toThrow(/frobnicated clusters/)

    const header = parseHeader(bytes)
    const ext = parseHeaderExtensions(header, bytes)
    expect(unknownIncompatibleBits(header)).toEqual([9])
    const err = thrown(() => checkIncompatibleFeatures(header, ext))
    expect(err).toBeInstanceOf(UnsupportedFeatureError)
    expect(err.message).toContain('frobnicated clusters')
    expect(err.message).toContain('bit 9')
  })
})

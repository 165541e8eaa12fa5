/*
 * The qcow2 header (spec: "Header") and its extensions (spec: "Header extensions"): pure
 * bytes -> values, with every check that does not need the file size. Checks that need the
 * file (tables past EOF) are done by the opener.
 */
import { CorruptImageError, UnsupportedFeatureError } from '../errors.js'
import {
  AUTOCLEAR_DATA_FILE_RAW_BIT,
  COMPAT_LAZY_REFCOUNTS_BIT,
  COMPRESSION_TYPE_ZLIB,
  COMPRESSION_TYPE_ZSTD,
  CRYPT_AES,
  CRYPT_LUKS,
  CRYPT_NONE,
  EXT_ALIGNMENT,
  EXT_BACKING_FORMAT,
  EXT_BITMAPS,
  EXT_CRYPTO_HEADER,
  EXT_DATA_FILE,
  EXT_END,
  EXT_FEATURE_NAME_TABLE,
  EXT_HEADER_SIZE,
  FEATURE_NAME_ENTRY_SIZE,
  FEATURE_NAME_MAX_LENGTH,
  FEATURE_TYPE_INCOMPATIBLE,
  HeaderOffset,
  HEADER_LENGTH_ALIGNMENT,
  INCOMPAT_COMPRESSION_BIT,
  INCOMPAT_CORRUPT_BIT,
  INCOMPAT_DATA_FILE_BIT,
  INCOMPAT_DIRTY_BIT,
  INCOMPAT_EXTL2_BIT,
  KNOWN_INCOMPAT_BITS,
  MAX_BACKING_FILE_NAME_SIZE,
  MAX_CLUSTER_BITS,
  MAX_REFCOUNT_ORDER,
  MIN_CLUSTER_BITS,
  MIN_CLUSTER_BITS_EXTENDED_L2,
  QCOW_MAGIC,
  QCOW_VERSION_2,
  QCOW_VERSION_3,
  V2_HEADER_LENGTH,
  V2_REFCOUNT_ORDER,
  V3_MIN_HEADER_LENGTH,
} from './constants.js'
import { alignUp, hex, readU64 } from './int64.js'

/** A 64-bit feature bitmask as uint32 halves (bits 0-31 in lo, 32-63 in hi). */
export interface FeatureBits {
  hi: number
  lo: number
}

export function hasFeatureBit(bits: FeatureBits, bit: number): boolean {
  return bit < 32 ? ((bits.lo >>> bit) & 1) === 1 : ((bits.hi >>> (bit - 32)) & 1) === 1
}

function featureBitsAt(view: DataView, byteOffset: number): FeatureBits {
  return { hi: view.getUint32(byteOffset), lo: view.getUint32(byteOffset + 4) }
}

function setBitsOf(bits: FeatureBits): number[] {
  const out: number[] = []
  for (let bit = 0; bit < 64; bit++) if (hasFeatureBit(bits, bit)) out.push(bit)
  return out
}

export interface Qcow2Header {
  /** version */
  version: 2 | 3
  /** backing_file_offset (0: no backing file) */
  backingFileOffset: number
  /** backing_file_size */
  backingFileSize: number
  /** cluster_bits */
  clusterBits: number
  /** size: virtual disk size in bytes */
  virtualSize: number
  /** crypt_method */
  cryptMethod: number
  /** l1_size: number of entries in the active L1 table */
  l1Size: number
  /** l1_table_offset */
  l1TableOffset: number
  /** refcount_table_offset */
  refcountTableOffset: number
  /** refcount_table_clusters */
  refcountTableClusters: number
  /** nb_snapshots */
  snapshotCount: number
  /** snapshots_offset */
  snapshotsOffset: number
  /** incompatible_features */
  incompatibleFeatures: FeatureBits
  /** compatible_features */
  compatibleFeatures: FeatureBits
  /** autoclear_features */
  autoclearFeatures: FeatureBits
  /** refcount_order */
  refcountOrder: number
  /** header_length */
  headerLength: number
  /** compression_type (additional field; 0 when absent) */
  compressionType: number
}

export interface FeatureName {
  type: number
  bit: number
  name: string
}

export interface HeaderExtensions {
  /** Backing file format name ("qcow2", "raw", ...). */
  backingFormat?: string
  featureNames: FeatureName[]
  /** Bitmaps extension: nb_bitmaps, bitmap_directory_size, bitmap_directory_offset. */
  bitmaps?: { bitmapCount: number; directorySize: number; directoryOffset: number }
  /** Full disk encryption header pointer. */
  cryptoHeader?: { offset: number; length: number }
  /** External data file name. */
  dataFile?: string
  /** Extensions we do not know, kept so a header rewrite can preserve them. */
  unknown: { type: number; data: Uint8Array }[]
}

/** The number of bytes to read from the file start to parse the header of any image. */
export const HEADER_PROBE_SIZE = V3_MIN_HEADER_LENGTH + 8

function corrupt(message: string): CorruptImageError {
  return new CorruptImageError(message)
}

/**
 * Parses the fixed header fields. `bytes` is the start of the file (at least HEADER_PROBE_SIZE
 * bytes when the file is that long). Throws CorruptImageError/UnsupportedFeatureError.
 */
export function parseHeader(bytes: Uint8Array): Qcow2Header {
  if (bytes.length < 4) throw corrupt('not a qcow2 image: file too short for a header')
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength)
  const magic = view.getUint32(HeaderOffset.magic)
  if (magic !== QCOW_MAGIC) throw corrupt(`not a qcow2 image: bad magic ${hex(magic)}`)
  if (bytes.length < V2_HEADER_LENGTH) throw corrupt('truncated qcow2 header')
  const version = view.getUint32(HeaderOffset.version)
  if (version !== QCOW_VERSION_2 && version !== QCOW_VERSION_3) {
    throw new UnsupportedFeatureError(`unsupported qcow2 version ${version}`)
  }
  const u64 = (at: number, name: string): number => {
    try {
      return readU64(view, at, name)
    } catch {
      throw corrupt(`header field ${name} is too large`)
    }
  }
  const header: Qcow2Header = {
    version,
    backingFileOffset: u64(HeaderOffset.backingFileOffset, 'backing_file_offset'),
    backingFileSize: view.getUint32(HeaderOffset.backingFileSize),
    clusterBits: view.getUint32(HeaderOffset.clusterBits),
    virtualSize: u64(HeaderOffset.size, 'size'),
    cryptMethod: view.getUint32(HeaderOffset.cryptMethod),
    l1Size: view.getUint32(HeaderOffset.l1Size),
    l1TableOffset: u64(HeaderOffset.l1TableOffset, 'l1_table_offset'),
    refcountTableOffset: u64(HeaderOffset.refcountTableOffset, 'refcount_table_offset'),
    refcountTableClusters: view.getUint32(HeaderOffset.refcountTableClusters),
    snapshotCount: view.getUint32(HeaderOffset.snapshotCount),
    snapshotsOffset: u64(HeaderOffset.snapshotsOffset, 'snapshots_offset'),
    incompatibleFeatures: { hi: 0, lo: 0 },
    compatibleFeatures: { hi: 0, lo: 0 },
    autoclearFeatures: { hi: 0, lo: 0 },
    refcountOrder: V2_REFCOUNT_ORDER,
    headerLength: V2_HEADER_LENGTH,
    compressionType: COMPRESSION_TYPE_ZLIB,
  }
  if (version === QCOW_VERSION_3) {
    if (bytes.length < V3_MIN_HEADER_LENGTH) throw corrupt('truncated qcow2 version 3 header')
    header.incompatibleFeatures = featureBitsAt(view, HeaderOffset.incompatibleFeatures)
    header.compatibleFeatures = featureBitsAt(view, HeaderOffset.compatibleFeatures)
    header.autoclearFeatures = featureBitsAt(view, HeaderOffset.autoclearFeatures)
    header.refcountOrder = view.getUint32(HeaderOffset.refcountOrder)
    header.headerLength = view.getUint32(HeaderOffset.headerLength)
    if (header.headerLength < V3_MIN_HEADER_LENGTH) {
      throw corrupt(`qcow2 header_length ${header.headerLength} is too small`)
    }
    if (header.headerLength % HEADER_LENGTH_ALIGNMENT !== 0) {
      throw corrupt(`qcow2 header_length ${header.headerLength} is not a multiple of 8`)
    }
    if (header.headerLength > HeaderOffset.compressionType) {
      if (bytes.length <= HeaderOffset.compressionType) throw corrupt('truncated qcow2 header')
      header.compressionType = view.getUint8(HeaderOffset.compressionType)
    }
  }
  validateHeader(header)
  return header
}

function validateHeader(h: Qcow2Header): void {
  if (h.clusterBits < MIN_CLUSTER_BITS || h.clusterBits > MAX_CLUSTER_BITS) {
    throw corrupt(`cluster_bits ${h.clusterBits} is out of range (${MIN_CLUSTER_BITS} to ${MAX_CLUSTER_BITS})`)
  }
  const clusterSize = 2 ** h.clusterBits
  if (h.headerLength > clusterSize) {
    throw corrupt(`qcow2 header_length ${h.headerLength} is larger than a cluster`)
  }
  if (h.refcountOrder > MAX_REFCOUNT_ORDER) {
    throw corrupt(`refcount_order ${h.refcountOrder} is out of range (0 to ${MAX_REFCOUNT_ORDER})`)
  }
  if (h.cryptMethod !== CRYPT_NONE) {
    const kind = h.cryptMethod === CRYPT_AES ? 'AES' : h.cryptMethod === CRYPT_LUKS ? 'LUKS' : `method ${h.cryptMethod}`
    throw new UnsupportedFeatureError(`encrypted images are not supported (${kind} encryption)`)
  }
  if (h.backingFileOffset !== 0) {
    if (h.backingFileSize > MAX_BACKING_FILE_NAME_SIZE || h.backingFileSize === 0) {
      throw corrupt(`backing file name length ${h.backingFileSize} is invalid`)
    }
    if (h.backingFileOffset + h.backingFileSize > clusterSize) {
      throw corrupt('backing file name lies outside the header cluster')
    }
  }
  const incompat = h.incompatibleFeatures
  if (hasFeatureBit(incompat, INCOMPAT_COMPRESSION_BIT)) {
    if (h.compressionType === COMPRESSION_TYPE_ZLIB) {
      throw corrupt('compression type feature bit is set but compression_type is zlib')
    }
  } else if (h.compressionType !== COMPRESSION_TYPE_ZLIB) {
    throw corrupt('compression_type is set but the compression type feature bit is not')
  }
  if (h.compressionType !== COMPRESSION_TYPE_ZLIB && h.compressionType !== COMPRESSION_TYPE_ZSTD) {
    throw new UnsupportedFeatureError(`unknown compression type ${h.compressionType}`)
  }
  if (hasFeatureBit(incompat, INCOMPAT_EXTL2_BIT) && h.clusterBits < MIN_CLUSTER_BITS_EXTENDED_L2) {
    throw corrupt(`unsupported subcluster size: extended L2 entries need clusters of at least ${2 ** MIN_CLUSTER_BITS_EXTENDED_L2} bytes`)
  }
}

/** Incompatible feature bits set in the header that this implementation does not know. */
export function unknownIncompatibleBits(h: Qcow2Header): number[] {
  const known = new Set<number>(KNOWN_INCOMPAT_BITS)
  return setBitsOf(h.incompatibleFeatures).filter((bit) => !known.has(bit))
}

/** Throws UnsupportedFeatureError naming unknown incompatible features (from the name table). */
export function checkIncompatibleFeatures(h: Qcow2Header, ext: HeaderExtensions): void {
  const unknown = unknownIncompatibleBits(h)
  if (unknown.length === 0) return
  const names = unknown.map((bit) => {
    const named = ext.featureNames.find((f) => f.type === FEATURE_TYPE_INCOMPATIBLE && f.bit === bit)
    return named && named.name ? `'${named.name}' (bit ${bit})` : `bit ${bit}`
  })
  throw new UnsupportedFeatureError(`unsupported incompatible feature${unknown.length > 1 ? 's' : ''}: ${names.join(', ')}`)
}

export const headerFlags = {
  dirty: (h: Qcow2Header) => hasFeatureBit(h.incompatibleFeatures, INCOMPAT_DIRTY_BIT),
  corrupt: (h: Qcow2Header) => hasFeatureBit(h.incompatibleFeatures, INCOMPAT_CORRUPT_BIT),
  externalDataFile: (h: Qcow2Header) => hasFeatureBit(h.incompatibleFeatures, INCOMPAT_DATA_FILE_BIT),
  extendedL2: (h: Qcow2Header) => hasFeatureBit(h.incompatibleFeatures, INCOMPAT_EXTL2_BIT),
  lazyRefcounts: (h: Qcow2Header) => hasFeatureBit(h.compatibleFeatures, COMPAT_LAZY_REFCOUNTS_BIT),
  dataFileRaw: (h: Qcow2Header) => hasFeatureBit(h.autoclearFeatures, AUTOCLEAR_DATA_FILE_RAW_BIT),
}

const textDecoder = new TextDecoder('utf-8', { fatal: false })

function decodeString(bytes: Uint8Array): string {
  const nul = bytes.indexOf(0)
  return textDecoder.decode(nul >= 0 ? bytes.subarray(0, nul) : bytes)
}

/**
 * Parses the header extensions, which start right after header_length (v3) or byte 72 (v2)
 * and end at an end-of-extensions marker, the backing file name, or the end of the cluster.
 * `headerCluster` is the first cluster of the image (or the whole file if shorter).
 */
export function parseHeaderExtensions(h: Qcow2Header, headerCluster: Uint8Array): HeaderExtensions {
  const view = new DataView(headerCluster.buffer, headerCluster.byteOffset, headerCluster.byteLength)
  const ext: HeaderExtensions = { featureNames: [], unknown: [] }
  const clusterSize = 2 ** h.clusterBits
  // Extensions may not run into the backing file name, nor past the first cluster.
  let limit = Math.min(clusterSize, headerCluster.length)
  if (h.backingFileOffset !== 0) limit = Math.min(limit, h.backingFileOffset)
  let at = h.headerLength
  const seen = new Set<number>()
  while (at + EXT_HEADER_SIZE <= limit) {
    const type = view.getUint32(at)
    const length = view.getUint32(at + 4)
    if (type === EXT_END) break
    const dataStart = at + EXT_HEADER_SIZE
    if (length > limit - dataStart) {
      throw corrupt(`header extension ${hex(type)} at ${hex(at)} is too long (${length} bytes)`)
    }
    if (seen.has(type)) throw corrupt(`header extension ${hex(type)} appears twice`)
    seen.add(type)
    const data = headerCluster.subarray(dataStart, dataStart + length)
    const dataView = new DataView(data.buffer, data.byteOffset, data.byteLength)
    switch (type) {
      case EXT_BACKING_FORMAT:
        ext.backingFormat = decodeString(data)
        break
      case EXT_FEATURE_NAME_TABLE:
        for (let i = 0; i + FEATURE_NAME_ENTRY_SIZE <= length; i += FEATURE_NAME_ENTRY_SIZE) {
          ext.featureNames.push({
            type: data[i]!,
            bit: data[i + 1]!,
            name: decodeString(data.subarray(i + 2, i + 2 + FEATURE_NAME_MAX_LENGTH)),
          })
        }
        break
      case EXT_BITMAPS:
        if (length < 24) throw corrupt('bitmaps header extension is too short')
        try {
          ext.bitmaps = {
            bitmapCount: dataView.getUint32(0),
            directorySize: readU64(dataView, 8, 'bitmap_directory_size'),
            directoryOffset: readU64(dataView, 16, 'bitmap_directory_offset'),
          }
        } catch {
          throw corrupt('bitmaps header extension has an out-of-range field')
        }
        break
      case EXT_CRYPTO_HEADER:
        if (length < 16) throw corrupt('encryption header extension is too short')
        try {
          ext.cryptoHeader = {
            offset: readU64(dataView, 0, 'crypto header offset'),
            length: readU64(dataView, 8, 'crypto header length'),
          }
        } catch {
          throw corrupt('encryption header extension has an out-of-range field')
        }
        break
      case EXT_DATA_FILE:
        ext.dataFile = decodeString(data)
        break
      default:
        ext.unknown.push({ type, data: data.slice() })
    }
    at = dataStart + alignUp(length, EXT_ALIGNMENT)
  }
  return ext
}

/** The backing file name stored in the header cluster, or undefined. */
export function parseBackingFileName(h: Qcow2Header, headerCluster: Uint8Array): string | undefined {
  if (h.backingFileOffset === 0) return undefined
  const end = h.backingFileOffset + h.backingFileSize
  if (end > headerCluster.length) throw corrupt('backing file name lies past the end of the file')
  return textDecoder.decode(headerCluster.subarray(h.backingFileOffset, end))
}

/*
 * The qcow2 header (spec: "Header") and its extensions (spec: "Header extensions"): pure
 * values -> bytes, the counterpart of header.ts. Used to write new images; everything written
 * here parses back with parseHeader / parseHeaderExtensions / parseBackingFileName.
 *
 * Layout of a header cluster as written here (the order QEMU uses):
 *   fixed header (header_length bytes), backing format extension, feature name table
 *   extension, end-of-extensions marker, backing file name (not NUL-terminated), zeros.
 */
import { InvalidRequestError } from '../errors.js'
import {
  AUTOCLEAR_BITMAPS_BIT,
  AUTOCLEAR_DATA_FILE_RAW_BIT,
  COMPAT_LAZY_REFCOUNTS_BIT,
  EXT_ALIGNMENT,
  EXT_END,
  EXT_FEATURE_NAME_TABLE,
  EXT_HEADER_SIZE,
  FEATURE_NAME_ENTRY_SIZE,
  FEATURE_NAME_MAX_LENGTH,
  FEATURE_TYPE_AUTOCLEAR,
  FEATURE_TYPE_COMPATIBLE,
  FEATURE_TYPE_INCOMPATIBLE,
  HEADER_LENGTH_ALIGNMENT,
  HeaderOffset,
  INCOMPAT_COMPRESSION_BIT,
  INCOMPAT_CORRUPT_BIT,
  INCOMPAT_DATA_FILE_BIT,
  INCOMPAT_DIRTY_BIT,
  INCOMPAT_EXTL2_BIT,
  MAX_BACKING_FILE_NAME_SIZE,
  QCOW_MAGIC,
  QCOW_VERSION_3,
  V3_MIN_HEADER_LENGTH,
} from './constants.js'
import type { FeatureBits, FeatureName, Qcow2Header } from './header.js'
import { alignUp, writeU64 } from './int64.js'

/** header_length of a version 3 header with the compression_type field (and its padding). */
export const V3_HEADER_LENGTH_WITH_COMPRESSION_TYPE = 112

/** Size of the end-of-extensions marker (type 0, length 0). */
export const EXT_END_SIZE = EXT_HEADER_SIZE

/**
 * The feature names QEMU writes into its feature name table, so `qemu-img info` and other
 * tools can name any bit they do not know.
 */
export const KNOWN_FEATURE_NAMES: readonly FeatureName[] = [
  { type: FEATURE_TYPE_INCOMPATIBLE, bit: INCOMPAT_DIRTY_BIT, name: 'dirty bit' },
  { type: FEATURE_TYPE_INCOMPATIBLE, bit: INCOMPAT_CORRUPT_BIT, name: 'corrupt bit' },
  { type: FEATURE_TYPE_INCOMPATIBLE, bit: INCOMPAT_DATA_FILE_BIT, name: 'external data file' },
  { type: FEATURE_TYPE_INCOMPATIBLE, bit: INCOMPAT_COMPRESSION_BIT, name: 'compression type' },
  { type: FEATURE_TYPE_INCOMPATIBLE, bit: INCOMPAT_EXTL2_BIT, name: 'extended L2 entries' },
  { type: FEATURE_TYPE_COMPATIBLE, bit: COMPAT_LAZY_REFCOUNTS_BIT, name: 'lazy refcounts' },
  { type: FEATURE_TYPE_AUTOCLEAR, bit: AUTOCLEAR_BITMAPS_BIT, name: 'bitmaps' },
  { type: FEATURE_TYPE_AUTOCLEAR, bit: AUTOCLEAR_DATA_FILE_RAW_BIT, name: 'raw external data' },
]

const textEncoder = new TextEncoder()

function writeFeatureBits(view: DataView, byteOffset: number, bits: FeatureBits): void {
  view.setUint32(byteOffset, bits.hi >>> 0)
  view.setUint32(byteOffset + 4, bits.lo >>> 0)
}

/**
 * The fixed part of a version 3 header: header.headerLength bytes (104, or 112 with the
 * compression_type field). backing_file_offset/size are written as given.
 */
export function encodeHeader(header: Qcow2Header): Uint8Array {
  if (header.version !== QCOW_VERSION_3) {
    throw new InvalidRequestError(`only version 3 headers are written (got version ${header.version})`)
  }
  const length = header.headerLength
  if (length !== V3_MIN_HEADER_LENGTH && length !== V3_HEADER_LENGTH_WITH_COMPRESSION_TYPE) {
    throw new InvalidRequestError(`header_length ${length} is not ${V3_MIN_HEADER_LENGTH} or ${V3_HEADER_LENGTH_WITH_COMPRESSION_TYPE}`)
  }
  if (header.compressionType !== 0 && length < V3_HEADER_LENGTH_WITH_COMPRESSION_TYPE) {
    throw new InvalidRequestError('compression_type needs a header_length of 112')
  }
  const bytes = new Uint8Array(length)
  const view = new DataView(bytes.buffer)
  view.setUint32(HeaderOffset.magic, QCOW_MAGIC)
  view.setUint32(HeaderOffset.version, header.version)
  writeU64(view, HeaderOffset.backingFileOffset, header.backingFileOffset)
  view.setUint32(HeaderOffset.backingFileSize, header.backingFileSize)
  view.setUint32(HeaderOffset.clusterBits, header.clusterBits)
  writeU64(view, HeaderOffset.size, header.virtualSize)
  view.setUint32(HeaderOffset.cryptMethod, header.cryptMethod)
  view.setUint32(HeaderOffset.l1Size, header.l1Size)
  writeU64(view, HeaderOffset.l1TableOffset, header.l1TableOffset)
  writeU64(view, HeaderOffset.refcountTableOffset, header.refcountTableOffset)
  view.setUint32(HeaderOffset.refcountTableClusters, header.refcountTableClusters)
  view.setUint32(HeaderOffset.snapshotCount, header.snapshotCount)
  writeU64(view, HeaderOffset.snapshotsOffset, header.snapshotsOffset)
  writeFeatureBits(view, HeaderOffset.incompatibleFeatures, header.incompatibleFeatures)
  writeFeatureBits(view, HeaderOffset.compatibleFeatures, header.compatibleFeatures)
  writeFeatureBits(view, HeaderOffset.autoclearFeatures, header.autoclearFeatures)
  view.setUint32(HeaderOffset.refcountOrder, header.refcountOrder)
  view.setUint32(HeaderOffset.headerLength, length)
  if (length >= V3_HEADER_LENGTH_WITH_COMPRESSION_TYPE) view.setUint8(HeaderOffset.compressionType, header.compressionType)
  return bytes
}

/** One header extension: u32 type, u32 length, data, zero padding to a multiple of 8. */
export function encodeHeaderExtension(type: number, data: Uint8Array): Uint8Array {
  const bytes = new Uint8Array(EXT_HEADER_SIZE + alignUp(data.length, EXT_ALIGNMENT))
  const view = new DataView(bytes.buffer)
  view.setUint32(0, type >>> 0)
  view.setUint32(4, data.length)
  bytes.set(data, EXT_HEADER_SIZE)
  return bytes
}

/** A string extension (backing format, data file name): the UTF-8 bytes, no terminator. */
export function encodeStringExtension(type: number, text: string): Uint8Array {
  return encodeHeaderExtension(type, textEncoder.encode(text))
}

/** The feature name table extension: 48 bytes per entry (type, bit, name padded with zeros). */
export function encodeFeatureNameTable(entries: readonly FeatureName[]): Uint8Array {
  const data = new Uint8Array(entries.length * FEATURE_NAME_ENTRY_SIZE)
  entries.forEach((entry, i) => {
    const name = textEncoder.encode(entry.name)
    if (name.length > FEATURE_NAME_MAX_LENGTH) {
      throw new InvalidRequestError(`feature name '${entry.name}' is longer than ${FEATURE_NAME_MAX_LENGTH} bytes`)
    }
    const at = i * FEATURE_NAME_ENTRY_SIZE
    data[at] = entry.type
    data[at + 1] = entry.bit
    data.set(name, at + 2)
  })
  return encodeHeaderExtension(EXT_FEATURE_NAME_TABLE, data)
}

/** The end-of-extensions marker. */
export function encodeEndOfExtensions(): Uint8Array {
  return encodeHeaderExtension(EXT_END, new Uint8Array(0))
}

/** The bytes of a backing file name as stored in the header cluster. */
export function encodeBackingFileName(name: string): Uint8Array {
  const bytes = textEncoder.encode(name)
  if (bytes.length === 0) throw new InvalidRequestError('backing file name is empty')
  if (bytes.length > MAX_BACKING_FILE_NAME_SIZE) {
    throw new InvalidRequestError(`backing file name is ${bytes.length} bytes long; qcow2 allows at most ${MAX_BACKING_FILE_NAME_SIZE}`)
  }
  return bytes
}

export interface HeaderClusterParts {
  /** The fixed header; its backing file fields are filled in here. */
  header: Qcow2Header
  /** Encoded extensions (without the end marker), in the order to write them. */
  extensions: readonly Uint8Array[]
  /** Backing file name, stored after the end marker. */
  backingFileName?: string
}

/**
 * The used part of the header cluster: header, extensions, end marker, backing file name.
 * Returns the bytes (the rest of the cluster is zeros) and the header as written (with
 * backing_file_offset/size set). Throws InvalidRequestError if it does not fit in a cluster.
 */
export function encodeHeaderCluster(parts: HeaderClusterParts): { bytes: Uint8Array; header: Qcow2Header } {
  const clusterSize = 2 ** parts.header.clusterBits
  const extensionBytes = parts.extensions.reduce((sum, ext) => sum + ext.length, 0)
  const nameOffset = parts.header.headerLength + extensionBytes + EXT_END_SIZE
  const name = parts.backingFileName === undefined ? undefined : encodeBackingFileName(parts.backingFileName)
  const used = nameOffset + (name?.length ?? 0)
  if (parts.header.headerLength % HEADER_LENGTH_ALIGNMENT !== 0) {
    throw new InvalidRequestError(`header_length ${parts.header.headerLength} is not a multiple of ${HEADER_LENGTH_ALIGNMENT}`)
  }
  if (used > clusterSize) {
    const what = name ? `the backing file name (${name.length} bytes)` : 'the header extensions'
    throw new InvalidRequestError(
      `the header, its extensions and ${what} need ${used} bytes, more than one ${clusterSize}-byte cluster; use a larger cluster size` +
        (name ? ' or a shorter backing file name' : ''),
    )
  }
  const header: Qcow2Header = {
    ...parts.header,
    backingFileOffset: name ? nameOffset : 0,
    backingFileSize: name ? name.length : 0,
  }
  const bytes = new Uint8Array(used)
  bytes.set(encodeHeader(header), 0)
  let at = header.headerLength
  for (const ext of parts.extensions) {
    bytes.set(ext, at)
    at += ext.length
  }
  bytes.set(encodeEndOfExtensions(), at)
  if (name) bytes.set(name, nameOffset)
  return { bytes, header }
}

/*
 * Creating a new qcow2 image (`qcow2fs create`): option checks, the layout, and the writes.
 *
 * Design notes:
 *  - Always version 3 (compat 1.1) with header_length 112 (the compression_type field).
 *  - Layout, as QEMU lays out a new image: header in cluster 0, refcount table from cluster 1,
 *    refcount blocks after it, then the L1 table (all zeros: no L2 table exists yet). Each
 *    of these has refcount 1 and nothing else is allocated. For ordinary sizes that is table
 *    at cluster 1, block at cluster 2, L1 at cluster 3, byte for byte what qemu-img writes.
 *    When one refcount block cannot count every cluster (large L1 tables with small clusters
 *    or narrow refcounts), more blocks follow the first and the table grows to more clusters;
 *    the sizes are found together because each one changes the number of clusters to count.
 *  - The file ends where the L1 table ends (not rounded to a cluster), like qemu-img's; a disk
 *    of size 0 has no L1 table (l1_size 0, offset 0) and ends after the refcount blocks.
 *  - The header cluster holds, in QEMU's order: the backing format extension, the feature name
 *    table (only with clusters larger than 4 KiB, as QEMU does, so small clusters keep room
 *    for the backing file name), the end marker, then the backing file name as given
 *    (a relative name stays relative: it is resolved against the image's directory on open).
 *  - The backing format is stored whenever there is a backing file: the one given, or the one
 *    probed (qcow2 magic -> qcow2, anything else -> raw). Only qcow2 and raw are accepted,
 *    the formats the engine can read. The backing file must exist and open; without an explicit
 *    size the new disk takes its virtual size (rounded up to 512 like every size).
 *  - Every option problem is found before anything is written (checkCreateOptions throws
 *    InvalidRequestError); backing file problems are found by planImage, also before writing.
 *  - Write order (writeImage): file length, refcount blocks, refcount table, sync, header,
 *    sync. Until the header lands the file has no qcow2 magic, so a crash part-way leaves a
 *    file nobody mistakes for a valid image.
 *  - Creating the file itself (exclusively: an existing file is never overwritten) is the
 *    caller's job; this module only writes through a BlockFile.
 */
import { InvalidRequestError } from '../errors.js'
import {
  COMPAT_LAZY_REFCOUNTS_BIT,
  COMPRESSION_TYPE_ZLIB,
  COMPRESSION_TYPE_ZSTD,
  CRYPT_NONE,
  EXT_BACKING_FORMAT,
  INCOMPAT_COMPRESSION_BIT,
  INCOMPAT_EXTL2_BIT,
  MAX_CLUSTER_BITS,
  MAX_L1_TABLE_BYTES,
  MAX_REFCOUNT_ORDER,
  MAX_REFCOUNT_TABLE_BYTES,
  MIN_CLUSTER_BITS,
  MIN_CLUSTER_BITS_EXTENDED_L2,
  QCOW_VERSION_3,
  SECTOR_SIZE,
  TABLE_ENTRY_SIZE,
} from '../format/constants.js'
import { type Geometry, l1EntriesFor, makeGeometry } from '../format/geometry.js'
import type { FeatureBits, Qcow2Header } from '../format/header.js'
import {
  KNOWN_FEATURE_NAMES,
  V3_HEADER_LENGTH_WITH_COMPRESSION_TYPE,
  encodeFeatureNameTable,
  encodeHeaderCluster,
  encodeStringExtension,
} from '../format/header-write.js'
import { alignUp, isPowerOfTwo, writeU64 } from '../format/int64.js'
import { refcountBlockEntries, setRefcount } from '../format/refcount.js'
import { Qcow2Image } from '../image.js'
import type { BlockFile } from '../io/block-file.js'
import { log } from '../log.js'
import { openBackingFile, probeFormat, resolveBackingPath } from './backing.js'

export const DEFAULT_CLUSTER_SIZE = 65536
export const DEFAULT_REFCOUNT_BITS = 16
/** Smallest cluster size that gets a feature name table (QEMU leaves it out below). */
export const FEATURE_TABLE_MIN_CLUSTER_SIZE = 8192
/**
 * Largest virtual size accepted: the last multiple of 512 below 2^53, where JS numbers stop
 * being exact (the engine's offsets are JS numbers).
 */
export const MAX_VIRTUAL_SIZE = Math.floor(Number.MAX_SAFE_INTEGER / SECTOR_SIZE) * SECTOR_SIZE

export type CompressionTypeName = 'zlib' | 'zstd'
export type BackingFormat = 'qcow2' | 'raw'

/** What the user asked for; every field optional, defaults as qemu-img's. */
export interface CreateOptions {
  /** Virtual size in bytes, rounded up to a multiple of 512. Optional with a backing file. */
  virtualSize?: number
  /** Bytes per cluster: a power of two from 512 to 2 MiB (default 64 KiB). */
  clusterSize?: number
  /** Extended L2 entries (subclusters); needs clusters of at least 16 KiB. */
  extendedL2?: boolean
  /** Backing file name, stored as given (relative to the new image's directory). */
  backingFile?: string
  /** 'qcow2' or 'raw'; probed from the backing file when absent. */
  backingFormat?: string
  /** Compression type for compressed clusters (default zlib). */
  compressionType?: string
  /** Refcount width: a power of two from 1 to 64 (default 16). */
  refcountBits?: number
  /** Lazy refcounts (compatible feature bit 0). */
  lazyRefcounts?: boolean
}

/** Checked options, as header values. */
export interface CreateSpec {
  clusterBits: number
  extendedL2: boolean
  refcountOrder: number
  compressionType: typeof COMPRESSION_TYPE_ZLIB | typeof COMPRESSION_TYPE_ZSTD
  lazyRefcounts: boolean
  /** Rounded virtual size; undefined until taken from the backing file. */
  virtualSize: number | undefined
  backingFile: string | undefined
  backingFormat: BackingFormat | undefined
}

/** Where everything of a new image lies. Offsets and lengths in bytes. */
export interface ImageLayout {
  clusterSize: number
  virtualSize: number
  refcountTableOffset: number
  refcountTableClusters: number
  /** Offset of the first refcount block; the others follow it contiguously. */
  refcountBlocksOffset: number
  refcountBlockCount: number
  /** 0 when l1Size is 0. */
  l1TableOffset: number
  l1Size: number
  /** Clusters in use (all with refcount 1): header, refcount table and blocks, L1 table. */
  usedClusters: number
  /** Length of the new file: the end of the L1 table (or of the refcount blocks). */
  fileLength: number
}

/** Everything needed to write a new image, found before anything is written. */
export interface ImagePlan {
  spec: CreateSpec & { virtualSize: number }
  layout: ImageLayout
  /** The header as written (backing name fields filled in). */
  header: Qcow2Header
  /** Used part of the header cluster. */
  headerBytes: Uint8Array
  /** Where the backing file was found (resolved path), when there is one. */
  backingPath: string | undefined
}

function invalid(message: string): InvalidRequestError {
  return new InvalidRequestError(message)
}

function checkInteger(value: number, what: string): void {
  if (!Number.isSafeInteger(value)) throw invalid(`${what} must be a whole number (got ${value})`)
}

/**
 * Checks every option that can be checked without touching a file (including the layout when
 * the size is known). Throws InvalidRequestError with a one-line message naming the option.
 */
export function checkCreateOptions(options: CreateOptions): CreateSpec {
  const clusterSize = options.clusterSize ?? DEFAULT_CLUSTER_SIZE
  checkInteger(clusterSize, 'cluster size')
  if (!isPowerOfTwo(clusterSize) || clusterSize < 2 ** MIN_CLUSTER_BITS || clusterSize > 2 ** MAX_CLUSTER_BITS) {
    throw invalid(`cluster size must be a power of two between 512 and 2M (got ${clusterSize})`)
  }
  const clusterBits = Math.log2(clusterSize)

  const refcountBits = options.refcountBits ?? DEFAULT_REFCOUNT_BITS
  checkInteger(refcountBits, 'refcount bits')
  if (!isPowerOfTwo(refcountBits) || refcountBits > 2 ** MAX_REFCOUNT_ORDER) {
    throw invalid(`refcount width must be a power of two and at most 64 bits (got ${refcountBits})`)
  }

  const compressionName = options.compressionType ?? 'zlib'
  if (compressionName !== 'zlib' && compressionName !== 'zstd') {
    throw invalid(`compression type must be zlib or zstd (got '${compressionName}')`)
  }

  const extendedL2 = options.extendedL2 === true
  if (extendedL2 && clusterBits < MIN_CLUSTER_BITS_EXTENDED_L2) {
    throw invalid(`extended L2 entries are only supported with cluster sizes of at least ${2 ** MIN_CLUSTER_BITS_EXTENDED_L2} bytes (got ${clusterSize})`)
  }

  let backingFormat: BackingFormat | undefined
  if (options.backingFormat !== undefined) {
    if (options.backingFile === undefined) throw invalid('a backing format needs a backing file')
    if (options.backingFormat !== 'qcow2' && options.backingFormat !== 'raw') {
      throw invalid(`backing format '${options.backingFormat}' is not supported (qcow2 or raw)`)
    }
    backingFormat = options.backingFormat
  }
  if (options.backingFile === '') throw invalid('backing file name is empty')

  let virtualSize: number | undefined
  if (options.virtualSize === undefined) {
    if (options.backingFile === undefined) throw invalid('a size is needed (it may be left out only with a backing file)')
  } else {
    virtualSize = roundVirtualSize(options.virtualSize)
  }

  const spec: CreateSpec = {
    clusterBits,
    extendedL2,
    refcountOrder: Math.log2(refcountBits),
    compressionType: compressionName === 'zstd' ? COMPRESSION_TYPE_ZSTD : COMPRESSION_TYPE_ZLIB,
    lazyRefcounts: options.lazyRefcounts === true,
    virtualSize,
    backingFile: options.backingFile,
    backingFormat,
  }
  // The header cluster must hold the backing name: 'qcow2' and 'raw' pad to the same length,
  // so this holds whatever format the probe finds later.
  const layout = planLayout(spec, virtualSize ?? 0)
  buildHeaderCluster(spec, layout, backingFormat ?? 'qcow2')
  return spec
}

/** A requested size rounded up to whole 512-byte sectors, checked against the limits. */
export function roundVirtualSize(requestedSize: number): number {
  if (!Number.isSafeInteger(requestedSize) || requestedSize < 0) {
    throw invalid(`size must be a whole number of bytes, 0 or more (got ${requestedSize})`)
  }
  const size = alignUp(requestedSize, SECTOR_SIZE)
  if (size > MAX_VIRTUAL_SIZE) throw invalid(`size ${requestedSize} is too large (at most ${MAX_VIRTUAL_SIZE} bytes)`)
  return size
}

/**
 * The layout of a new image of virtualSize bytes. Throws InvalidRequestError when the L1
 * table would pass QEMU's 32 MiB limit (the image could not be opened).
 */
export function planLayout(spec: Pick<CreateSpec, 'clusterBits' | 'extendedL2' | 'refcountOrder'>, virtualSize: number): ImageLayout {
  const geometry: Geometry = makeGeometry(spec.clusterBits, spec.extendedL2)
  const clusterSize = geometry.clusterSize
  const l1Size = l1EntriesFor(geometry, virtualSize)
  const l1Bytes = l1Size * TABLE_ENTRY_SIZE
  if (l1Bytes > MAX_L1_TABLE_BYTES) {
    throw invalid(
      `size ${virtualSize} needs an L1 table of ${l1Bytes} bytes, more than the 32 MiB qcow2 allows with ${clusterSize}-byte clusters; use a larger cluster size`,
    )
  }
  const l1Clusters = Math.ceil(l1Bytes / clusterSize)
  const entriesPerBlock = refcountBlockEntries(spec.clusterBits, spec.refcountOrder)
  const entriesPerTableCluster = clusterSize / TABLE_ENTRY_SIZE
  // Both counts only grow, and are bounded (the L1 table is), so this ends.
  let tableClusters = 1
  let blockCount = 1
  for (;;) {
    const used = 1 + tableClusters + blockCount + l1Clusters
    const blocksNeeded = Math.ceil(used / entriesPerBlock)
    const tableNeeded = Math.ceil(Math.max(blockCount, blocksNeeded) / entriesPerTableCluster)
    if (blocksNeeded <= blockCount && tableNeeded <= tableClusters) break
    blockCount = Math.max(blockCount, blocksNeeded)
    tableClusters = Math.max(tableClusters, tableNeeded)
  }
  if (tableClusters * clusterSize > MAX_REFCOUNT_TABLE_BYTES) {
    throw invalid(`size ${virtualSize} needs a refcount table larger than 8 MiB; use a larger cluster size or fewer refcount bits`)
  }
  const refcountTableOffset = clusterSize
  const refcountBlocksOffset = refcountTableOffset + tableClusters * clusterSize
  const afterBlocks = refcountBlocksOffset + blockCount * clusterSize
  return {
    clusterSize,
    virtualSize,
    refcountTableOffset,
    refcountTableClusters: tableClusters,
    refcountBlocksOffset,
    refcountBlockCount: blockCount,
    l1TableOffset: l1Size > 0 ? afterBlocks : 0,
    l1Size,
    usedClusters: 1 + tableClusters + blockCount + l1Clusters,
    fileLength: afterBlocks + l1Bytes,
  }
}

function bitsOf(...bits: number[]): FeatureBits {
  let lo = 0
  for (const bit of bits) lo |= 1 << bit
  return { hi: 0, lo: lo >>> 0 }
}

/** The header cluster of a new image (used part) and the header as written. */
export function buildHeaderCluster(
  spec: CreateSpec,
  layout: ImageLayout,
  backingFormat: BackingFormat | undefined,
): { bytes: Uint8Array; header: Qcow2Header } {
  const incompatible: number[] = []
  if (spec.compressionType !== COMPRESSION_TYPE_ZLIB) incompatible.push(INCOMPAT_COMPRESSION_BIT)
  if (spec.extendedL2) incompatible.push(INCOMPAT_EXTL2_BIT)
  const header: Qcow2Header = {
    version: QCOW_VERSION_3,
    backingFileOffset: 0,
    backingFileSize: 0,
    clusterBits: spec.clusterBits,
    virtualSize: layout.virtualSize,
    cryptMethod: CRYPT_NONE,
    l1Size: layout.l1Size,
    l1TableOffset: layout.l1TableOffset,
    refcountTableOffset: layout.refcountTableOffset,
    refcountTableClusters: layout.refcountTableClusters,
    snapshotCount: 0,
    snapshotsOffset: 0,
    incompatibleFeatures: bitsOf(...incompatible),
    compatibleFeatures: spec.lazyRefcounts ? bitsOf(COMPAT_LAZY_REFCOUNTS_BIT) : bitsOf(),
    autoclearFeatures: bitsOf(),
    refcountOrder: spec.refcountOrder,
    headerLength: V3_HEADER_LENGTH_WITH_COMPRESSION_TYPE,
    compressionType: spec.compressionType,
  }
  const extensions: Uint8Array[] = []
  if (spec.backingFile !== undefined && backingFormat !== undefined) {
    extensions.push(encodeStringExtension(EXT_BACKING_FORMAT, backingFormat))
  }
  if (layout.clusterSize >= FEATURE_TABLE_MIN_CLUSTER_SIZE) extensions.push(encodeFeatureNameTable(KNOWN_FEATURE_NAMES))
  const parts: Parameters<typeof encodeHeaderCluster>[0] = { header, extensions }
  if (spec.backingFile !== undefined) parts.backingFileName = spec.backingFile
  return encodeHeaderCluster(parts)
}

/** Format and virtual size of an existing backing file. */
export interface BackingInfo {
  path: string
  format: BackingFormat
  virtualSize: number
}

/**
 * Opens the backing file named `backingName` (relative to the new image's directory) read-only:
 * probes its format when `format` is undefined and reads its virtual size (a qcow2 backing
 * file is opened with its own chain, so a broken chain is refused now, not at first use).
 * Without image locks, as qemu-img create opens it (force-share): creating an overlay of a
 * backing file in use, even written, is allowed; the overlay's own users lock it later.
 */
export async function inspectBacking(imagePath: string, backingName: string, format: BackingFormat | undefined): Promise<BackingInfo> {
  const backingPath = resolveBackingPath(imagePath, backingName)
  const file = openBackingFile(imagePath, backingName, 'none')
  let found: BackingFormat
  let rawSize: number
  try {
    found = format ?? probeFormat(file)
    rawSize = file.size
  } finally {
    file.close()
  }
  if (found === 'raw') return { path: backingPath, format: found, virtualSize: rawSize }
  const image = await Qcow2Image.open(backingPath, { readOnly: true, lock: false })
  try {
    return { path: backingPath, format: found, virtualSize: image.virtualSize }
  } finally {
    await image.close()
  }
}

/**
 * Checks the options, inspects the backing file, and lays the image out: everything that can
 * fail, before any byte is written. `imagePath` is where the image will be created (backing
 * names are resolved against its directory).
 */
export async function planImage(imagePath: string, options: CreateOptions): Promise<ImagePlan> {
  const checked = checkCreateOptions(options)
  let backing: BackingInfo | undefined
  if (checked.backingFile !== undefined) backing = await inspectBacking(imagePath, checked.backingFile, checked.backingFormat)
  const virtualSize = checked.virtualSize ?? roundVirtualSize(backing?.virtualSize ?? 0)
  const spec = { ...checked, virtualSize, backingFormat: backing?.format }
  const layout = planLayout(spec, virtualSize)
  const { bytes, header } = buildHeaderCluster(spec, layout, backing?.format)
  log.open('create %s: %o', imagePath, layout)
  return { spec, layout, header, headerBytes: bytes, backingPath: backing?.path }
}

/** The refcount blocks of a new image, back to back: refcount 1 for every used cluster. */
export function encodeRefcountBlocks(layout: ImageLayout, refcountOrder: number): Uint8Array {
  const bits = 2 ** refcountOrder
  // Only the used entries are non-zero; the rest of the blocks stay holes in the file.
  const bytes = new Uint8Array(Math.ceil((layout.usedClusters * bits) / 8))
  for (let cluster = 0; cluster < layout.usedClusters; cluster++) setRefcount(bytes, cluster, refcountOrder, 1)
  return bytes
}

/** The refcount table of a new image (used entries only): one entry per refcount block. */
export function encodeRefcountTable(layout: ImageLayout): Uint8Array {
  const bytes = new Uint8Array(layout.refcountBlockCount * TABLE_ENTRY_SIZE)
  const view = new DataView(bytes.buffer)
  for (let i = 0; i < layout.refcountBlockCount; i++) {
    writeU64(view, i * TABLE_ENTRY_SIZE, layout.refcountBlocksOffset + i * layout.clusterSize)
  }
  return bytes
}

/**
 * Writes a planned image into `file`, which must be empty and writable: file length (the L1
 * table is all zeros), refcount blocks, refcount table, sync, header, sync.
 */
export function writeImage(file: BlockFile, plan: ImagePlan): void {
  if (file.size !== 0) throw invalid(`'${file.path}' is not empty; a new image is only written into an empty file`)
  const { layout } = plan
  file.truncate(layout.fileLength)
  file.pwrite(encodeRefcountBlocks(layout, plan.spec.refcountOrder), layout.refcountBlocksOffset, 'refblock')
  file.pwrite(encodeRefcountTable(layout), layout.refcountTableOffset, 'reftable')
  file.sync()
  file.pwrite(plan.headerBytes, 0, 'header')
  file.sync()
}

/**
 * Plans and writes a new image at `imagePath` into the empty file `openNew` creates there.
 * `openNew` is called only after every check passed.
 */
export async function createImage(imagePath: string, options: CreateOptions, openNew: (path: string) => BlockFile): Promise<ImagePlan> {
  const plan = await planImage(imagePath, options)
  const file = openNew(imagePath)
  try {
    writeImage(file, plan)
  } finally {
    file.close()
  }
  return plan
}


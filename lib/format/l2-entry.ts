/*
 * L2 table entries (spec: "Standard Cluster Descriptor", "Compressed Clusters Descriptor",
 * "Extended L2 Entries") and the subcluster type table.
 *
 * An entry is read as halves: `hi` = bits 32-63, `lo` = bits 0-31. With extended L2 the
 * 64-bit subcluster bitmap follows: its high word holds the "reads as zeros" bits
 * (bit 32+x for subcluster x), its low word the allocation bits (bit x).
 */
import {
  COMPRESSED_SECTOR_SIZE,
  L2E_OFFSET_MASK_HI,
  L2E_OFFSET_MASK_LO,
  MAX_HOST_OFFSET_BITS,
  OFLAG_COMPRESSED_HI,
  OFLAG_COPIED_HI,
  OFLAG_ZERO_LO,
  SUBCLUSTERS_PER_CLUSTER,
} from './constants.js'
import { TWO_POW_32 } from './int64.js'

/** Cluster types, derived from the first 64 bits of an entry. */
export const ClusterType = {
  UNALLOCATED: 0,
  ZERO_PLAIN: 1,
  ZERO_ALLOC: 2,
  NORMAL: 3,
  COMPRESSED: 4,
} as const
export type ClusterType = (typeof ClusterType)[keyof typeof ClusterType]

/**
 * Subcluster types, as QEMU classifies them. Without extended L2 a cluster is one subcluster
 * and UNALLOCATED_ALLOC / INVALID never occur.
 */
export const SubclusterType = {
  /** No host cluster; reads from the backing file, or zeros. */
  UNALLOCATED_PLAIN: 0,
  /** Host cluster allocated, this subcluster not: reads from the backing file, or zeros. */
  UNALLOCATED_ALLOC: 1,
  /** Reads as zeros, no host cluster. */
  ZERO_PLAIN: 2,
  /** Reads as zeros; a host cluster is allocated. */
  ZERO_ALLOC: 3,
  /** Data at the host offset. */
  NORMAL: 4,
  /** Compressed cluster. */
  COMPRESSED: 5,
  /** Contradictory bits (alloc and zero both set, or alloc without host offset): I/O error. */
  INVALID: 6,
} as const
export type SubclusterType = (typeof SubclusterType)[keyof typeof SubclusterType]

export const subclusterTypeNames: Record<SubclusterType, string> = {
  0: 'unallocated',
  1: 'unallocated (host cluster allocated)',
  2: 'zero',
  3: 'zero (host cluster allocated)',
  4: 'normal',
  5: 'compressed',
  6: 'invalid',
}

export function isCompressedEntry(hi: number): boolean {
  return (hi & OFLAG_COMPRESSED_HI) !== 0
}

export function isCopiedEntry(hi: number): boolean {
  return (hi & OFLAG_COPIED_HI) !== 0
}

/** Host cluster offset (bits 9-55) of a standard (not compressed) entry. */
export function l2EntryHostOffset(hi: number, lo: number): number {
  return (hi & L2E_OFFSET_MASK_HI) * TWO_POW_32 + ((lo & L2E_OFFSET_MASK_LO) >>> 0)
}

/**
 * The cluster type of an entry. `extendedL2`: bit 0 (zero flag) is unused then.
 * `externalDataFile`: offset 0 with COPIED set is a valid data cluster (guest cluster 0 may map
 * to data file offset 0).
 */
export function clusterTypeOf(hi: number, lo: number, extendedL2: boolean, externalDataFile: boolean): ClusterType {
  if ((hi & OFLAG_COMPRESSED_HI) !== 0) return ClusterType.COMPRESSED
  const hostOffset = l2EntryHostOffset(hi, lo)
  if (!extendedL2 && (lo & OFLAG_ZERO_LO) !== 0) {
    return hostOffset !== 0 ? ClusterType.ZERO_ALLOC : ClusterType.ZERO_PLAIN
  }
  if (hostOffset === 0) {
    if (externalDataFile && (hi & OFLAG_COPIED_HI) !== 0) return ClusterType.NORMAL
    return ClusterType.UNALLOCATED
  }
  return ClusterType.NORMAL
}

/**
 * Type of subcluster `scIndex` (0-31) of an extended L2 entry with bitmap halves
 * `zeroBits` (bitmap bits 32-63) and `allocBits` (bits 0-31). For a standard entry pass
 * extendedL2 = false (the bitmap arguments are ignored).
 */
export function subclusterTypeOf(
  hi: number,
  lo: number,
  zeroBits: number,
  allocBits: number,
  scIndex: number,
  extendedL2: boolean,
  externalDataFile: boolean,
): SubclusterType {
  const type = clusterTypeOf(hi, lo, extendedL2, externalDataFile)
  if (!extendedL2) {
    switch (type) {
      case ClusterType.COMPRESSED:
        return SubclusterType.COMPRESSED
      case ClusterType.ZERO_PLAIN:
        return SubclusterType.ZERO_PLAIN
      case ClusterType.ZERO_ALLOC:
        return SubclusterType.ZERO_ALLOC
      case ClusterType.NORMAL:
        return SubclusterType.NORMAL
      default:
        return SubclusterType.UNALLOCATED_PLAIN
    }
  }
  // Compressed clusters have no subclusters; their bitmap is reserved and ignored on read.
  if (type === ClusterType.COMPRESSED) return SubclusterType.COMPRESSED
  const bit = 1 << scIndex
  if (type === ClusterType.NORMAL) {
    // Any subcluster both allocated and zero makes the whole entry invalid.
    if ((zeroBits & allocBits) !== 0) return SubclusterType.INVALID
    if ((zeroBits & bit) !== 0) return SubclusterType.ZERO_ALLOC
    if ((allocBits & bit) !== 0) return SubclusterType.NORMAL
    return SubclusterType.UNALLOCATED_ALLOC
  }
  // No host offset: any allocation bit is invalid.
  if (allocBits !== 0) return SubclusterType.INVALID
  if ((zeroBits & bit) !== 0) return SubclusterType.ZERO_PLAIN
  return SubclusterType.UNALLOCATED_PLAIN
}

/** Bit mask of subclusters [first, end) in a uint32 bitmap word; 0 <= first <= end <= 32. */
export function subclusterRangeMask(first: number, end: number): number {
  const upTo = (n: number): number => (n >= SUBCLUSTERS_PER_CLUSTER ? 0xffffffff : ((1 << n) - 1) >>> 0)
  return (upTo(end) & ~upTo(first)) >>> 0
}

// ---- Compressed cluster descriptor ----

/** Bit position x where the sector count starts: x = 62 - (cluster_bits - 8). */
export function compressedSizeShift(clusterBits: number): number {
  return 62 - (clusterBits - 8)
}

export interface CompressedDescriptor {
  /** Host byte offset of the compressed data (usually not aligned). */
  hostOffset: number
  /** Number of 512-byte sectors holding the data, counting the one at hostOffset. */
  sectorCount: number
  /** Bytes to read: sectorCount * 512 - (hostOffset % 512). May run into the next data. */
  compressedSize: number
}

/**
 * Decodes bits 0-61 of a compressed entry. Returns undefined if the offset uses bits above 55
 * or does not fit a JS number.
 */
export function decodeCompressedDescriptor(hi: number, lo: number, clusterBits: number): CompressedDescriptor | undefined {
  const shiftInHi = compressedSizeShift(clusterBits) - 32
  const descriptorHi = hi & 0x3fffffff // bits 62 and 63 are flags, not descriptor bits
  const offsetHi = descriptorHi & (((1 << shiftInHi) >>> 0) - 1)
  // Host offsets use at most bits 0-55; JS numbers are exact to 2^53.
  if (offsetHi >= 2 ** (MAX_HOST_OFFSET_BITS - 32) || offsetHi >= 0x200000) return undefined
  const hostOffset = offsetHi * TWO_POW_32 + (lo >>> 0)
  const sectorMask = (1 << (clusterBits - 8)) - 1
  const sectorCount = ((descriptorHi >>> shiftInHi) & sectorMask) + 1
  const compressedSize = sectorCount * COMPRESSED_SECTOR_SIZE - (hostOffset % COMPRESSED_SECTOR_SIZE)
  return { hostOffset, sectorCount, compressedSize }
}

/**
 * Encodes a compressed entry (bit 62 set, COPIED clear) for `compressedLength` bytes of data at
 * hostOffset. The sector count is the number of additional sectors touched beyond the first.
 */
export function encodeCompressedEntry(hostOffset: number, compressedLength: number, clusterBits: number): { hi: number; lo: number } {
  const shiftInHi = compressedSizeShift(clusterBits) - 32
  const additionalSectors =
    Math.floor((hostOffset + compressedLength - 1) / COMPRESSED_SECTOR_SIZE) - Math.floor(hostOffset / COMPRESSED_SECTOR_SIZE)
  if (additionalSectors < 0 || additionalSectors > (1 << (clusterBits - 8)) - 1) {
    throw new RangeError(`compressed length ${compressedLength} does not fit the descriptor`)
  }
  const offsetHi = Math.floor(hostOffset / TWO_POW_32)
  if (offsetHi >= (1 << shiftInHi) >>> 0) throw new RangeError('compressed host offset too large for the descriptor')
  const hi = (OFLAG_COMPRESSED_HI | (additionalSectors << shiftInHi) | offsetHi) >>> 0
  return { hi, lo: hostOffset >>> 0 }
}

/*
 * Sizes derived from the header, and the guest-offset -> table-index arithmetic
 * (spec: "Cluster mapping"). Offsets are JS numbers (exact to 2^53); indexes fit in 32 bits.
 */
import {
  EXTENDED_L2_ENTRY_SIZE,
  SUBCLUSTERS_PER_CLUSTER,
  TABLE_ENTRY_SIZE,
} from './constants.js'

export interface Geometry {
  clusterBits: number
  /** Bytes per cluster. */
  clusterSize: number
  extendedL2: boolean
  /** Bytes per L2 entry: 8, or 16 with extended L2. */
  l2EntrySize: number
  /** L2 entries per L2 table (one cluster). */
  l2Entries: number
  /** Guest bytes one L2 table maps. */
  l2CoverageBytes: number
  /** Bytes per subcluster (clusterSize / 32 with extended L2, else clusterSize). */
  subclusterSize: number
  subclusterBits: number
}

export function makeGeometry(clusterBits: number, extendedL2: boolean): Geometry {
  const clusterSize = 2 ** clusterBits
  const l2EntrySize = extendedL2 ? EXTENDED_L2_ENTRY_SIZE : TABLE_ENTRY_SIZE
  const l2Entries = clusterSize / l2EntrySize
  const subclusterBits = extendedL2 ? clusterBits - Math.log2(SUBCLUSTERS_PER_CLUSTER) : clusterBits
  return {
    clusterBits,
    clusterSize,
    extendedL2,
    l2EntrySize,
    l2Entries,
    l2CoverageBytes: l2Entries * clusterSize,
    subclusterSize: 2 ** subclusterBits,
    subclusterBits,
  }
}

/** Index of the L1 entry whose L2 table maps guestOffset. */
export function l1IndexOf(g: Geometry, guestOffset: number): number {
  return Math.floor(guestOffset / g.l2CoverageBytes)
}

/** Index of the L2 entry (within its table) that maps guestOffset. */
export function l2IndexOf(g: Geometry, guestOffset: number): number {
  return Math.floor(guestOffset / g.clusterSize) % g.l2Entries
}

/** Byte offset of guestOffset within its cluster. */
export function offsetIntoCluster(g: Geometry, offset: number): number {
  return offset % g.clusterSize
}

/** Index of the subcluster (0-31) that holds a byte at offsetInCluster. */
export function subclusterIndexOf(g: Geometry, offsetInCluster: number): number {
  return Math.floor(offsetInCluster / g.subclusterSize)
}

/** Number of clusters needed to hold `bytes`. */
export function sizeToClusters(g: Geometry, bytes: number): number {
  return Math.ceil(bytes / g.clusterSize)
}

/** Minimum number of L1 entries for a disk of virtualSize bytes. */
export function l1EntriesFor(g: Geometry, virtualSize: number): number {
  return Math.ceil(virtualSize / g.l2CoverageBytes)
}

/*
 * Guest -> host mapping: turns a guest offset into a run of bytes that all read the same way
 * (host data, zeros, backing file, or one compressed cluster).
 *
 * Design notes:
 *  - A run never crosses an L2 table boundary, and never extends past one compressed cluster.
 *  - Host data runs are extended across clusters while host offsets stay contiguous, so one
 *    128 KiB FUSE read of a freshly written image becomes one pread.
 *  - Validation happens at lookup, per region: an L2 table offset that is not cluster aligned
 *    or lies past EOF, a data cluster offset that is not aligned, a compressed descriptor that
 *    does not fit, or an INVALID subcluster bitmap raises CorruptImageError (EIO) for the
 *    requested range only; the rest of the image stays readable.
 */
import { CorruptImageError } from '../errors.js'
import { type Geometry, l1IndexOf, l2IndexOf } from '../format/geometry.js'
import { hex } from '../format/int64.js'
import {
  type CompressedDescriptor,
  SubclusterType,
  decodeCompressedDescriptor,
  l2EntryHostOffset,
  subclusterTypeOf,
} from '../format/l2-entry.js'
import type { L1Table } from '../meta/l1-table.js'
import type { L2SliceCache } from '../meta/l2-cache.js'

export const RunKind = {
  /** Bytes stored at hostOffset in the data file (the image itself or an external data file). */
  DATA: 0,
  /** Reads as zeros. */
  ZERO: 1,
  /** Not allocated here: read from the backing file, or zeros without one. */
  BACKING: 2,
  /** Part of one compressed cluster; `descriptor` says where its data lies. */
  COMPRESSED: 3,
} as const
export type RunKind = (typeof RunKind)[keyof typeof RunKind]

export interface MappedRun {
  kind: RunKind
  /** Guest bytes covered by the run (> 0). */
  bytes: number
  /** DATA: host offset of the first byte. */
  hostOffset: number
  /** COMPRESSED: the cluster's descriptor, and the offset of the run's start in the cluster. */
  descriptor?: CompressedDescriptor
  offsetInCluster: number
}

export interface MapperOptions {
  /** An external data file holds guest data; offset 0 with COPIED set is then valid. */
  externalDataFile: boolean
}

export class ClusterMapper {
  readonly geometry: Geometry
  #l1: L1Table
  #l2Cache: L2SliceCache
  #externalDataFile: boolean

  constructor(geometry: Geometry, l1: L1Table, l2Cache: L2SliceCache, options: MapperOptions) {
    this.geometry = geometry
    this.#l1 = l1
    this.#l2Cache = l2Cache
    this.#externalDataFile = options.externalDataFile
  }

  /** The run of same-kind bytes starting at guestOffset, at most maxBytes long. */
  map(guestOffset: number, maxBytes: number): MappedRun {
    const g = this.geometry
    const toTableEnd = g.l2CoverageBytes - (guestOffset % g.l2CoverageBytes)
    const limit = Math.min(maxBytes, toTableEnd)
    const l2Offset = this.#l1.l2Offset(l1IndexOf(g, guestOffset))
    if (l2Offset === 0) return { kind: RunKind.BACKING, bytes: limit, hostOffset: 0, offsetInCluster: 0 }

    const firstOffsetInCluster = guestOffset % g.clusterSize
    let l2Index = l2IndexOf(g, guestOffset)
    let offsetInCluster = firstOffsetInCluster
    let kind = -1
    let hostStart = 0
    let total = 0
    let descriptor: CompressedDescriptor | undefined
    while (total < limit) {
      const { slice, indexInSlice } = this.#l2Cache.slice(l2Offset, l2Index)
      const at = indexInSlice * g.l2EntrySize
      const view = slice.view
      const hi = view.getUint32(at)
      const lo = view.getUint32(at + 4)
      const zeroBits = g.extendedL2 ? view.getUint32(at + 8) : 0
      const allocBits = g.extendedL2 ? view.getUint32(at + 12) : 0
      let scIndex = Math.floor(offsetInCluster / g.subclusterSize)
      const type = subclusterTypeOf(hi, lo, zeroBits, allocBits, scIndex, g.extendedL2, this.#externalDataFile)
      // Bytes of this cluster, from offsetInCluster, that share this subcluster type.
      let spanEnd = (scIndex + 1) * g.subclusterSize
      if (g.extendedL2 && type !== SubclusterType.COMPRESSED) {
        while (spanEnd < g.clusterSize) {
          scIndex++
          if (subclusterTypeOf(hi, lo, zeroBits, allocBits, scIndex, true, this.#externalDataFile) !== type) break
          spanEnd += g.subclusterSize
        }
      } else {
        spanEnd = g.clusterSize
      }
      let runKind: RunKind
      let host = 0
      switch (type) {
        case SubclusterType.NORMAL: {
          const clusterHost = l2EntryHostOffset(hi, lo)
          if (clusterHost % g.clusterSize !== 0) {
            throw new CorruptImageError(`data cluster offset ${hex(clusterHost)} is not cluster aligned (L2 table ${hex(l2Offset)} index ${hex(l2Index)})`)
          }
          runKind = RunKind.DATA
          host = clusterHost + offsetInCluster
          break
        }
        case SubclusterType.ZERO_PLAIN:
        case SubclusterType.ZERO_ALLOC:
          runKind = RunKind.ZERO
          break
        case SubclusterType.UNALLOCATED_PLAIN:
        case SubclusterType.UNALLOCATED_ALLOC:
          runKind = RunKind.BACKING
          break
        case SubclusterType.COMPRESSED: {
          if (kind !== -1) return this.#finish(kind, total, hostStart, descriptor, firstOffsetInCluster)
          const decoded = decodeCompressedDescriptor(hi, lo, g.clusterBits)
          if (decoded === undefined) {
            throw new CorruptImageError(`compressed cluster descriptor at L2 table ${hex(l2Offset)} index ${hex(l2Index)} has an invalid offset`)
          }
          return {
            kind: RunKind.COMPRESSED,
            bytes: Math.min(limit, g.clusterSize - offsetInCluster),
            hostOffset: 0,
            descriptor: decoded,
            offsetInCluster,
          }
        }
        default:
          throw new CorruptImageError(`invalid subcluster allocation bitmap at L2 table ${hex(l2Offset)} index ${hex(l2Index)}`)
      }
      if (kind === -1) {
        kind = runKind
        hostStart = host
      } else if (runKind !== kind || (runKind === RunKind.DATA && host !== hostStart + total)) {
        break
      }
      total += Math.min(spanEnd - offsetInCluster, limit - total)
      if (spanEnd < g.clusterSize) break
      l2Index++
      offsetInCluster = 0
    }
    return this.#finish(kind, total, hostStart, descriptor, firstOffsetInCluster)
  }

  #finish(kind: number, bytes: number, hostOffset: number, descriptor: CompressedDescriptor | undefined, offsetInCluster: number): MappedRun {
    const run: MappedRun = { kind: kind as RunKind, bytes, hostOffset, offsetInCluster }
    if (descriptor) run.descriptor = descriptor
    return run
  }
}

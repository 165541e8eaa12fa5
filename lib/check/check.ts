/*
 * The consistency check of a qcow2 image, counted the way `qemu-img check` counts (QEMU's
 * qcow2 check is the oracle; its vocabulary and counters are kept so the two can be compared):
 *
 *  - references: every cluster the metadata uses (header, L1 and L2 tables of the active
 *    image and of every snapshot, data and compressed clusters, the snapshot table, the
 *    refcount table and blocks, persistent bitmaps) is counted in an in-memory table;
 *  - corruptions: a cluster whose stated refcount is below its references (also one used
 *    twice: two L2 entries, an L2 table over the refcount table), references past the end of
 *    the file, misaligned tables and data clusters, reserved bits, subcluster bitmaps with a
 *    subcluster both allocated and zero, compressed descriptors with COPIED or a bitmap, COPIED
 *    flags that disagree with the refcount, refcount overflow;
 *  - leaks: a cluster whose stated refcount is above its references;
 *  - check errors: refcounts that cannot be read (refcount block at an unaligned offset).
 *
 * Design notes:
 *  - Reading never throws on damage: bytes past the end of the file read as zeros, as in QEMU.
 *  - An L2 (or L1) table referenced several times is read and walked once, with a multiplicity:
 *    the counts are those of walking it each time (what qemu-img does), but the work stays
 *    bounded by the file size. A total work budget (bytes of tables walked) stops a hostile
 *    image whose tables point at each other far more often than any real image; the check then
 *    fails with a check error instead of running for hours.
 *  - The counts of one pass live in a PassResult; lib/check/repair.ts runs passes with fixes
 *    (the same code, with `fix` flags) and the double check after a repair.
 */
import {
  L1E_RESERVED_MASK_HI,
  L1E_RESERVED_MASK_LO,
  L2E_STD_RESERVED_MASK_HI,
  L2E_STD_RESERVED_MASK_LO,
  MAX_L1_TABLE_BYTES,
  OFLAG_COPIED_HI,
  OFLAG_ZERO_LO,
  SECTOR_SIZE,
  TABLE_ENTRY_SIZE,
} from '../format/constants.js'
import type { Geometry } from '../format/geometry.js'
import { compressedSizeShift, ClusterType, clusterTypeOf, decodeCompressedDescriptor, l2EntryHostOffset } from '../format/l2-entry.js'
import { l1EntryL2Offset } from '../format/l1-entry.js'
import { TWO_POW_32 } from '../format/int64.js'
import type { BlockFile } from '../io/block-file.js'
import { type ImageLayout, readImageLayout, readPadded, snapshotEntryIncomplete } from './layout.js'
import { OnDiskRefcounts } from './on-disk-refcounts.js'

/** The counters of `qemu-img check` (BdrvCheckResult and its fragmentation info). */
export interface CheckCounts {
  checkErrors: number
  corruptions: number
  leaks: number
  corruptionsFixed: number
  leaksFixed: number
  /** (highest cluster in use + 1) * cluster size. */
  imageEndOffset: number
  /** Guest clusters of the virtual disk. */
  totalClusters: number
  /** Guest clusters with a host cluster (data, preallocated zero, compressed) in the active L1. */
  allocatedClusters: number
  fragmentedClusters: number
  compressedClusters: number
}

export function emptyCounts(): CheckCounts {
  return {
    checkErrors: 0,
    corruptions: 0,
    leaks: 0,
    corruptionsFixed: 0,
    leaksFixed: 0,
    imageEndOffset: 0,
    totalClusters: 0,
    allocatedClusters: 0,
    fragmentedClusters: 0,
    compressedClusters: 0,
  }
}

/** What a pass may fix: leaks (refcount too high), errors (everything else it can). */
export interface FixFlags {
  leaks: boolean
  errors: boolean
}

export const NO_FIX: FixFlags = { leaks: false, errors: false }

/** Receives one line per problem found (qemu-img's wording), in the order found. */
export type Reporter = (line: string) => void

/**
 * What a reference to a host cluster is for, to name the structures that share a cluster when
 * they should not (an L2 table over the refcount table, data over an L1 table...).
 */
export const ClusterUse = {
  HEADER: 1,
  L1: 2,
  L2: 3,
  DATA: 4,
  COMPRESSED: 5,
  SNAPSHOT_TABLE: 6,
  REFCOUNT_TABLE: 7,
  REFCOUNT_BLOCK: 8,
  BITMAP_DIRECTORY: 9,
  BITMAP_TABLE: 10,
  BITMAP_DATA: 11,
} as const
export type ClusterUse = (typeof ClusterUse)[keyof typeof ClusterUse]

const useNames: Record<ClusterUse, string> = {
  1: 'the header',
  2: 'an L1 table',
  3: 'an L2 table',
  4: 'guest data',
  5: 'compressed guest data',
  6: 'the snapshot table',
  7: 'the refcount table',
  8: 'a refcount block',
  9: 'the bitmap directory',
  10: 'a bitmap table',
  11: 'bitmap data',
}

function isMetadata(use: ClusterUse): boolean {
  return use !== ClusterUse.DATA && use !== ClusterUse.COMPRESSED && use !== ClusterUse.BITMAP_DATA
}

/** Host clusters the in-memory table may track beyond the file (a reference just past its end). */
const EXTRA_CLUSTERS = 2
/**
 * Work budget: table bytes walked, at most this many times the file size, plus a constant.
 * Sound images need under 3 times (each L2 table walked for the active L1, the snapshots and
 * the COPIED check; each distinct L1 table once).
 */
const WORK_BUDGET_FILE_MULTIPLE = 8
const WORK_BUDGET_CONSTANT_BYTES = 16 * 1024 * 1024

/** 64-bit value given as halves, in lowercase hex without leading zeros (C's %" PRIx64). */
export function hexU64(hi: number, lo: number): string {
  hi >>>= 0
  lo >>>= 0
  if (hi === 0) return lo.toString(16)
  return hi.toString(16) + lo.toString(16).padStart(8, '0')
}

function hexNumber(n: number): string {
  return n.toString(16)
}

/** The L1/L2 entry of a table, read as halves. */
function wordAt(view: DataView, byteOffset: number): number {
  return view.getUint32(byteOffset)
}

/**
 * One check pass over an image: counts references, compares them with the stated refcounts,
 * checks COPIED flags. `fix` turns on the repairs QEMU makes during those steps.
 */
export class CheckPass {
  readonly layout: ImageLayout
  readonly counts: CheckCounts = emptyCounts()
  /** The stated refcounts (replaced when the repair rebuilds them). */
  onDisk: OnDiskRefcounts
  /** References per host cluster, counted by calculate(). */
  computed: Uint32Array
  /** Host clusters tracked: the file's clusters, more if a reference lies just past the end. */
  clusterCount: number
  /** A refcount structure problem that only a rebuild fixes (QEMU's `rebuild`). */
  rebuild = false
  /** The first use counted for each host cluster (ClusterUse; 0: none). */
  #uses: Uint8Array
  /** Clusters with metadata sharing them with another use: the other uses seen. */
  #overlaps = new Map<number, Set<ClusterUse>>()
  #file: BlockFile
  #imagePath: string
  #g: Geometry
  #report: Reporter
  #maxComputed: number
  #workLeft: number
  #outOfWork = false
  #overflowExplained = false

  constructor(file: BlockFile, imagePath: string, report: Reporter, layout?: ImageLayout) {
    this.#file = file
    this.#imagePath = imagePath
    this.#report = report
    this.layout = layout ?? readImageLayout(file, imagePath)
    this.#g = this.layout.geometry
    const h = this.layout.header
    this.onDisk = new OnDiskRefcounts(file, this.#g, this.layout.refcountTable, h.refcountOrder)
    this.clusterCount = Math.ceil(this.layout.fileSize / this.#g.clusterSize)
    this.computed = new Uint32Array(this.clusterCount + EXTRA_CLUSTERS)
    this.#uses = new Uint8Array(this.clusterCount + EXTRA_CLUSTERS)
    this.#maxComputed = Math.min(this.onDisk.maxRefcount, 0xffffffff)
    this.#workLeft = WORK_BUDGET_FILE_MULTIPLE * this.layout.fileSize + WORK_BUDGET_CONSTANT_BYTES
    const sectors = Math.floor(h.virtualSize / SECTOR_SIZE)
    this.counts.totalClusters = Math.ceil((sectors * SECTOR_SIZE) / this.#g.clusterSize)
  }

  get file(): BlockFile {
    return this.#file
  }

  get imagePath(): string {
    return this.#imagePath
  }

  report(line: string): void {
    this.#report(line)
  }

  /** Takes `bytes` of table walking from the budget; false (with a check error, once) when spent. */
  #spend(bytes: number): boolean {
    if (this.#outOfWork) return false
    this.#workLeft -= bytes
    if (this.#workLeft >= 0) return true
    this.#outOfWork = true
    this.counts.checkErrors++
    this.report(
      `ERROR the tables of this image are referenced far more often than the file can hold ` +
        `(over ${WORK_BUDGET_FILE_MULTIPLE} times its size); the check stops counting references here`,
    )
    return false
  }

  /**
   * Counts `times` references to every cluster of [hostOffset, hostOffset + bytes) (QEMU's
   * qcow2_inc_refcounts_imrt, with a multiplicity).
   */
  inc(hostOffset: number, bytes: number, times = 1, use: ClusterUse = ClusterUse.DATA): void {
    if (bytes <= 0 || times <= 0) return
    const cs = this.#g.clusterSize
    if (hostOffset < 0 || !Number.isSafeInteger(hostOffset) || hostOffset + bytes - this.layout.fileSize >= cs) {
      this.report(
        'ERROR: counting reference for region exceeding the end of the file by one cluster or more: ' +
          `offset 0x${hexNumber(hostOffset)} size 0x${hexNumber(bytes)}`,
      )
      this.counts.corruptions += times
      return
    }
    const first = Math.floor(hostOffset / cs)
    const last = Math.floor((hostOffset + bytes - 1) / cs)
    for (let cluster = first; cluster <= last; cluster++) {
      if (cluster >= this.clusterCount) this.clusterCount = cluster + 1
      const firstUse = this.#uses[cluster]! as ClusterUse | 0
      if (firstUse === 0) {
        this.#uses[cluster] = use
      } else if (firstUse !== use && (isMetadata(firstUse) || isMetadata(use))) {
        const others = this.#overlaps.get(cluster) ?? new Set<ClusterUse>()
        others.add(use)
        this.#overlaps.set(cluster, others)
      }
      const current = this.computed[cluster]!
      const room = this.#maxComputed - current
      if (times <= room) {
        this.computed[cluster] = current + times
      } else {
        this.computed[cluster] = this.#maxComputed
        this.report(`ERROR: overflow cluster offset=0x${hexNumber(cluster * cs)}`)
        if (!this.#overflowExplained) {
          this.#overflowExplained = true
          this.report(
            `(refcount_bits ${2 ** this.onDisk.refcountOrder} cannot count these references: widen it with ` +
              `'qemu-img amend -o refcount_bits=...', or copy the image with 'qemu-img convert')`,
          )
        }
        this.counts.corruptions += times - room
      }
    }
  }

  // ---- calculate ------------------------------------------------------------------------------

  /** Counts every reference (QEMU's calculate_refcounts). */
  calculate(fix: FixFlags): void {
    const { header, snapshots } = this.layout
    const cs = this.#g.clusterSize
    this.inc(0, cs, 1, ClusterUse.HEADER)
    this.#checkL1Tables([{ hostOffset: header.l1TableOffset, entries: header.l1Size }], true, fix)
    if (this.layout.externalDataFile && snapshots.length > 0) {
      this.report(`ERROR ${snapshots.length} snapshots in image with data file`)
      this.counts.corruptions++
    }
    const snapshotL1s: { hostOffset: number; entries: number }[] = []
    for (const sn of snapshots) {
      if (sn.l1TableOffset % cs !== 0) {
        this.report(
          `ERROR snapshot ${sn.id} (${sn.name}) l1_offset=0x${hexNumber(sn.l1TableOffset)}: ` +
            'L1 table is not cluster aligned; snapshot table entry corrupted',
        )
        this.counts.corruptions++
        continue
      }
      if (sn.l1Size > MAX_L1_TABLE_BYTES / TABLE_ENTRY_SIZE) {
        this.report(
          `ERROR snapshot ${sn.id} (${sn.name}) l1_size=0x${hexNumber(sn.l1Size)}: ` +
            'L1 table is too large; snapshot table entry corrupted',
        )
        this.counts.corruptions++
        continue
      }
      snapshotL1s.push({ hostOffset: sn.l1TableOffset, entries: sn.l1Size })
    }
    this.#checkL1Tables(snapshotL1s, false, fix)
    this.inc(header.snapshotsOffset, this.layout.snapshotTableBytes, 1, ClusterUse.SNAPSHOT_TABLE)
    this.inc(header.refcountTableOffset, header.refcountTableClusters * cs, 1, ClusterUse.REFCOUNT_TABLE)
    this.#countBitmaps()
    this.#checkRefcountBlocks(fix)
  }

  /**
   * Counts L1 tables and the L2 tables they point to. Tables at the same place (snapshots
   * share them) are walked once with a multiplicity; `fragInfo` is for the active L1 only.
   */
  #checkL1Tables(tables: { hostOffset: number; entries: number }[], fragInfo: boolean, fix: FixFlags): void {
    const byPlace = new Map<string, { hostOffset: number; entries: number; times: number }>()
    for (const t of tables) {
      if (t.entries === 0) continue
      const key = `${t.hostOffset}/${t.entries}`
      const seen = byPlace.get(key)
      if (seen) seen.times++
      else byPlace.set(key, { ...t, times: 1 })
    }
    const l2Times = new Map<number, number>()
    const cs = this.#g.clusterSize
    for (const { hostOffset, entries, times } of byPlace.values()) {
      const bytes = entries * TABLE_ENTRY_SIZE
      this.inc(hostOffset, bytes, times, ClusterUse.L1)
      // Past the end of the file the table reads as zeros: no entries to walk.
      const inFile = Math.max(0, Math.min(bytes, this.layout.fileSize - hostOffset))
      if (inFile === 0) continue
      if (!this.#spend(inFile)) return
      const table = readPadded(this.#file, hostOffset, inFile)
      const view = new DataView(table.buffer)
      for (let at = 0; at + TABLE_ENTRY_SIZE <= inFile; at += TABLE_ENTRY_SIZE) {
        const hi = wordAt(view, at)
        const lo = wordAt(view, at + 4)
        if (hi === 0 && lo === 0) continue
        if ((hi & L1E_RESERVED_MASK_HI) !== 0 || (lo & L1E_RESERVED_MASK_LO) !== 0) {
          this.report(`ERROR found L1 entry with reserved bits set: ${hexU64(hi, lo)}`)
          this.counts.corruptions += times
        }
        const l2Offset = l1EntryL2Offset(hi, lo)
        this.inc(l2Offset, cs, times, ClusterUse.L2)
        if (l2Offset % cs !== 0) {
          this.report(`ERROR l2_offset=${hexNumber(l2Offset)}: Table is not cluster aligned; L1 entry corrupted`)
          this.counts.corruptions += times
        }
        l2Times.set(l2Offset, (l2Times.get(l2Offset) ?? 0) + times)
      }
    }
    for (const [l2Offset, times] of l2Times) {
      if (!this.#checkL2(l2Offset, times, fragInfo, fix)) return
    }
  }

  /** Counts the references of one L2 table walked `times` times. False when out of budget. */
  #checkL2(l2Offset: number, times: number, fragInfo: boolean, fix: FixFlags): boolean {
    const g = this.#g
    const cs = g.clusterSize
    const { externalDataFile } = this.layout
    // Past the end of the file the table reads as zeros: every entry is unallocated.
    const inFile = Math.max(0, Math.min(cs, this.layout.fileSize - l2Offset))
    if (inFile === 0) return true
    if (!this.#spend(cs)) return false
    const table = readPadded(this.#file, l2Offset, cs)
    const view = new DataView(table.buffer)
    let nextContiguousOffset = 0
    for (let l2Index = 0; l2Index < g.l2Entries; l2Index++) {
      const at = l2Index * g.l2EntrySize
      let hi = wordAt(view, at)
      const lo = wordAt(view, at + 4)
      const zeroBits = g.extendedL2 ? wordAt(view, at + 8) : 0
      const allocBits = g.extendedL2 ? wordAt(view, at + 12) : 0
      if (hi === 0 && lo === 0 && zeroBits === 0 && allocBits === 0) continue
      const type = clusterTypeOf(hi, lo, g.extendedL2, externalDataFile)
      if (type !== ClusterType.COMPRESSED && ((hi & L2E_STD_RESERVED_MASK_HI) !== 0 || (lo & L2E_STD_RESERVED_MASK_LO) !== 0)) {
        this.report(`ERROR found l2 entry with reserved bits set: ${hexU64(hi, lo)}`)
        this.counts.corruptions += times
      }
      switch (type) {
        case ClusterType.COMPRESSED: {
          if ((hi & OFLAG_COPIED_HI) !== 0) {
            const offsetMaskHi = 2 ** (compressedSizeShift(g.clusterBits) - 32) - 1
            this.report(
              `ERROR: coffset=0x${hexU64(hi & offsetMaskHi, lo)}: copied flag must never be set for compressed clusters`,
            )
            hi = (hi & ~OFLAG_COPIED_HI) >>> 0
            this.counts.corruptions += times
          }
          if (externalDataFile) {
            this.report(`ERROR compressed cluster ${l2Index} with data file, entry=0x${hexU64(hi, lo)}`)
            this.counts.corruptions += times
            break
          }
          if (zeroBits !== 0 || allocBits !== 0) {
            this.report(`ERROR compressed cluster ${l2Index} with non-zero subcluster allocation bitmap, entry=0x${hexU64(hi, lo)}`)
            this.counts.corruptions += times
            break
          }
          const descriptor = decodeCompressedDescriptor(hi, lo, g.clusterBits)
          if (descriptor === undefined) {
            // An offset beyond what a JS number holds exactly lies far past any file.
            this.report(
              'ERROR: counting reference for region exceeding the end of the file by one cluster or more: ' +
                `compressed cluster entry 0x${hexU64(hi, lo)}`,
            )
            this.counts.corruptions += times
          } else {
            this.inc(descriptor.hostOffset, descriptor.compressedSize, times, ClusterUse.COMPRESSED)
          }
          if (fragInfo) {
            this.counts.allocatedClusters += times
            this.counts.compressedClusters += times
            // Compressed clusters count as fragmented (they share sectors).
            this.counts.fragmentedClusters += times
          }
          break
        }
        case ClusterType.ZERO_ALLOC:
        case ClusterType.NORMAL: {
          const hostOffset = l2EntryHostOffset(hi, lo)
          if ((zeroBits & allocBits) !== 0) {
            this.report(`ERROR offset=${hexNumber(hostOffset)}: Allocated cluster has corrupted subcluster allocation bitmap`)
            this.counts.corruptions += times
          }
          if (hostOffset % cs !== 0) {
            const containsData = g.extendedL2 ? allocBits !== 0 : (lo & OFLAG_ZERO_LO) === 0
            if (!containsData) {
              this.report(
                `${fix.errors ? 'Repairing' : 'ERROR'} offset=${hexNumber(hostOffset)}: ` +
                  'Preallocated cluster is not properly aligned; L2 entry corrupted.',
              )
              if (fix.errors) {
                // The entry becomes a plain zero cluster (zero subclusters); the cluster it
                // named is no longer referenced. Later walks of this table see the new entry.
                this.#zeroEntry(l2Offset, l2Index, zeroBits, allocBits)
                this.counts.corruptionsFixed++
                continue
              }
            } else {
              this.report(`ERROR offset=${hexNumber(hostOffset)}: Data cluster is not properly aligned; L2 entry corrupted.`)
            }
            this.counts.corruptions += times
          }
          if (fragInfo) {
            this.counts.allocatedClusters += times
            if (nextContiguousOffset !== 0 && hostOffset !== nextContiguousOffset) this.counts.fragmentedClusters += times
            nextContiguousOffset = hostOffset + cs
          }
          if (!externalDataFile) this.inc(hostOffset, cs, times)
          break
        }
        case ClusterType.ZERO_PLAIN:
          break
        case ClusterType.UNALLOCATED:
          if (allocBits !== 0) {
            this.report('ERROR: Unallocated cluster has non-zero subcluster allocation map')
            this.counts.corruptions += times
          }
          break
      }
    }
    return true
  }

  /** Rewrites an L2 entry as a zero cluster (extended L2: its allocated subclusters zero). */
  #zeroEntry(l2Offset: number, l2Index: number, zeroBits: number, allocBits: number): void {
    const g = this.#g
    const entry = new Uint8Array(g.l2EntrySize)
    const view = new DataView(entry.buffer)
    if (g.extendedL2) {
      view.setUint32(8, (zeroBits | allocBits) >>> 0)
    } else {
      view.setUint32(4, OFLAG_ZERO_LO)
    }
    this.#file.pwrite(entry, l2Offset + l2Index * g.l2EntrySize, 'l2')
    this.#file.sync()
  }

  /** Persistent bitmaps: the directory, each bitmap table, each bitmap data cluster. */
  #countBitmaps(): void {
    const bitmaps = this.layout.bitmaps
    if (bitmaps === undefined) return
    const cs = this.#g.clusterSize
    this.inc(bitmaps.directoryOffset, bitmaps.directorySize, 1, ClusterUse.BITMAP_DIRECTORY)
    for (const bitmap of bitmaps.list) {
      const bytes = bitmap.tableEntries * TABLE_ENTRY_SIZE
      this.inc(bitmap.tableOffset, bytes, 1, ClusterUse.BITMAP_TABLE)
      const inFile = Math.max(0, Math.min(bytes, this.layout.fileSize - bitmap.tableOffset))
      if (inFile === 0 || !this.#spend(inFile)) continue
      const table = readPadded(this.#file, bitmap.tableOffset, inFile)
      const view = new DataView(table.buffer)
      for (let at = 0; at + TABLE_ENTRY_SIZE <= inFile; at += TABLE_ENTRY_SIZE) {
        const hi = view.getUint32(at)
        const lo = view.getUint32(at + 4)
        // Bits 9-55 offset, bit 0 "all ones" (only without an offset), the rest reserved.
        const hostOffset = (hi & 0x00ffffff) * TWO_POW_32 + ((lo & 0xfffffe00) >>> 0)
        const reserved = (hi & 0xff000000) !== 0 || (lo & 0x1fe) !== 0
        if (reserved || (hostOffset !== 0 && ((lo & 1) !== 0 || hostOffset % cs !== 0))) {
          this.report(`ERROR bitmap '${bitmap.name}' table entry ${at / TABLE_ENTRY_SIZE} is invalid: ${hexU64(hi, lo)}`)
          this.counts.corruptions++
          continue
        }
        if (hostOffset !== 0) this.inc(hostOffset, cs, 1, ClusterUse.BITMAP_DATA)
      }
    }
  }

  /** The refcount table's entries and blocks (QEMU's check_refblocks). */
  #checkRefcountBlocks(fix: FixFlags): void {
    const cs = this.#g.clusterSize
    for (let tableIndex = 0; tableIndex < this.onDisk.tableEntries; tableIndex++) {
      if (this.onDisk.reservedBitsSet(tableIndex)) {
        this.report(`ERROR refcount table entry ${tableIndex} has reserved bits set`)
        this.counts.corruptions++
        this.rebuild = true
        continue
      }
      const blockOffset = this.onDisk.blockOffset(tableIndex)
      if (blockOffset % cs !== 0) {
        this.report(`ERROR refcount block ${tableIndex} is not cluster aligned; refcount table entry corrupted`)
        this.counts.corruptions++
        this.rebuild = true
        continue
      }
      const cluster = blockOffset / cs
      if (cluster >= this.clusterCount) {
        // QEMU grows the file to take the block in; the repair here rebuilds the structure.
        this.report(`${fix.errors ? 'Repairing' : 'ERROR'} refcount block ${tableIndex} is outside image`)
        this.counts.corruptions++
        if (fix.errors) this.rebuild = true
        continue
      }
      if (blockOffset !== 0) {
        this.inc(blockOffset, cs, 1, ClusterUse.REFCOUNT_BLOCK)
        const references = this.computed[cluster]!
        if (references !== 1) {
          this.report(`ERROR refcount block ${tableIndex} refcount=${references}`)
          this.counts.corruptions++
          this.rebuild = true
        }
      }
    }
  }

  // ---- compare --------------------------------------------------------------------------------

  /**
   * Compares stated refcounts with the references (QEMU's compare_refcounts). With `fix`,
   * leaks and (stated refcount above 0) too-low refcounts are set to the references in place.
   * A crash part way leaves each refcount either as it was or right: never worse.
   */
  compare(fix: FixFlags): void {
    let highest = 0
    for (let cluster = 0; cluster < this.clusterCount; cluster++) {
      const stated = this.onDisk.get(cluster)
      if (stated === undefined) {
        this.report(`Can't get refcount for cluster ${cluster}: Input/output error`)
        this.counts.checkErrors++
        continue
      }
      const references = this.computed[cluster]!
      if (stated > 0 || references > 0) highest = cluster
      this.#explainOverlap(cluster)
      if (stated === references) continue
      let fixAs: 'leak' | 'corruption' | undefined
      if (stated === 0) this.rebuild = true
      else if (stated > references && fix.leaks) fixAs = 'leak'
      else if (stated < references && fix.errors) fixAs = 'corruption'
      const word = fixAs !== undefined ? 'Repairing' : stated < references ? 'ERROR' : 'Leaked'
      this.report(`${word} cluster ${cluster} refcount=${stated} reference=${references}`)
      if (fixAs !== undefined) {
        this.onDisk.set(cluster, references)
        if (fixAs === 'leak') this.counts.leaksFixed++
        else this.counts.corruptionsFixed++
      } else if (stated < references) {
        this.counts.corruptions++
      } else {
        this.counts.leaks++
      }
    }
    if (this.onDisk.flush()) this.#file.sync()
    this.counts.imageEndOffset = (highest + 1) * this.#g.clusterSize
  }

  /**
   * One line naming the structures that share a cluster, when metadata is among them (not
   * counted: the reference count of the cluster already is). Printed before the cluster's
   * refcount line.
   */
  #explainOverlap(cluster: number): void {
    const others = this.#overlaps.get(cluster)
    if (others === undefined) return
    const uses = [this.#uses[cluster]! as ClusterUse, ...others].map((u) => useNames[u])
    this.report(`Overlap: cluster ${cluster} is used as ${uses.slice(0, -1).join(', ')} and as ${uses[uses.length - 1]}`)
  }

  // ---- COPIED ---------------------------------------------------------------------------------

  /**
   * COPIED flags of the active L1 and L2 entries against the stated refcounts (QEMU's
   * check_oflag_copied). `repair` sets or clears the flags to match.
   */
  checkCopied(repair: boolean): void {
    const { header, externalDataFile } = this.layout
    const g = this.#g
    const cs = g.clusterSize
    const l1Bytes = header.l1Size * TABLE_ENTRY_SIZE
    const inFile = Math.max(0, Math.min(l1Bytes, this.layout.fileSize - header.l1TableOffset))
    if (inFile === 0) return
    const l1 = readPadded(this.#file, header.l1TableOffset, inFile)
    const l1View = new DataView(l1.buffer)
    // L2 tables walked once each, with the number of L1 entries that point to them.
    const l2Times = new Map<number, number>()
    for (let l1Index = 0; l1Index < inFile / TABLE_ENTRY_SIZE; l1Index++) {
      const hi = l1View.getUint32(l1Index * TABLE_ENTRY_SIZE)
      const lo = l1View.getUint32(l1Index * TABLE_ENTRY_SIZE + 4)
      const l2Offset = l1EntryL2Offset(hi, lo)
      if (l2Offset === 0) continue
      const refcount = this.onDisk.get(Math.floor(l2Offset / cs))
      if (refcount === undefined) continue
      const copied = (hi & OFLAG_COPIED_HI) !== 0
      if ((refcount === 1) !== copied) {
        this.report(
          `${repair ? 'Repairing' : 'ERROR'} OFLAG_COPIED L2 cluster: l1_index=${l1Index} ` +
            `l1_entry=${hexU64(hi, lo)} refcount=${refcount}`,
        )
        if (repair) {
          const entry = new Uint8Array(TABLE_ENTRY_SIZE)
          const view = new DataView(entry.buffer)
          view.setUint32(0, refcount === 1 ? (hi | OFLAG_COPIED_HI) >>> 0 : (hi & ~OFLAG_COPIED_HI) >>> 0)
          view.setUint32(4, lo)
          this.#file.pwrite(entry, header.l1TableOffset + l1Index * TABLE_ENTRY_SIZE, 'l1')
          this.#file.sync()
          this.counts.corruptionsFixed++
        } else {
          this.counts.corruptions++
        }
      }
      l2Times.set(l2Offset, (l2Times.get(l2Offset) ?? 0) + 1)
    }
    for (const [l2Offset, times] of l2Times) {
      if (l2Offset >= this.layout.fileSize) continue
      if (!this.#spend(cs)) return
      const table = readPadded(this.#file, l2Offset, cs)
      const view = new DataView(table.buffer)
      let changed = 0
      for (let l2Index = 0; l2Index < g.l2Entries; l2Index++) {
        const at = l2Index * g.l2EntrySize
        const hi = view.getUint32(at)
        const lo = view.getUint32(at + 4)
        const type = clusterTypeOf(hi, lo, g.extendedL2, externalDataFile)
        if (type !== ClusterType.NORMAL && type !== ClusterType.ZERO_ALLOC) continue
        const refcount = externalDataFile ? 1 : this.onDisk.get(Math.floor(l2EntryHostOffset(hi, lo) / cs))
        if (refcount === undefined) continue
        const copied = (hi & OFLAG_COPIED_HI) !== 0
        if ((refcount === 1) === copied) continue
        this.report(`${repair ? 'Repairing' : 'ERROR'} OFLAG_COPIED data cluster: l2_entry=${hexU64(hi, lo)} refcount=${refcount}`)
        if (repair) {
          view.setUint32(at, refcount === 1 ? (hi | OFLAG_COPIED_HI) >>> 0 : (hi & ~OFLAG_COPIED_HI) >>> 0)
          changed++
        } else {
          this.counts.corruptions += times
        }
      }
      if (changed > 0) {
        this.#file.pwrite(table, l2Offset, 'l2')
        this.#file.sync()
        this.counts.corruptionsFixed += changed
      }
    }
  }

  // ---- snapshots ------------------------------------------------------------------------------

  /**
   * v3 snapshot table entries without the 16 bytes of extra data every v3 entry needs. Returns
   * their number (corruptions, kept apart from the refcount counts as QEMU keeps them).
   */
  checkSnapshotTable(fix: FixFlags = NO_FIX): number {
    const { header, snapshots } = this.layout
    let incomplete = 0
    snapshots.forEach((snapshot, i) => {
      if (!snapshotEntryIncomplete(header, snapshot)) return
      this.report(`${fix.errors ? 'Repairing' : 'ERROR'} snapshot table entry ${i} is incomplete`)
      incomplete++
    })
    return incomplete
  }
}

/** Runs a check without fixes: the counts qemu-img check prints. */
export function checkImage(file: BlockFile, imagePath: string, report: Reporter = () => {}): CheckCounts {
  const pass = new CheckPass(file, imagePath, report)
  const snapshotCorruptions = pass.checkSnapshotTable()
  pass.calculate(NO_FIX)
  pass.compare(NO_FIX)
  pass.checkCopied(false)
  pass.counts.corruptions += snapshotCorruptions
  return pass.counts
}

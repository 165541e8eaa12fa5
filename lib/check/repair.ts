/*
 * Repairs, as `qemu-img check -r leaks|all` makes them, and the "double check" after them.
 *
 *  - leaks: stated refcounts above the references are lowered to them. When the refcount
 *    structure itself is broken (a referenced cluster with refcount 0, a misaligned or shared
 *    refcount block) nothing is changed and the repair fails: that needs `all`.
 *  - all: also too-low refcounts are raised; misaligned preallocated zero clusters become
 *    plain zero clusters; when the structure is broken, a new refcount structure is built from
 *    the references (see rebuildRefcountStructure), then the old structure's clusters, now
 *    leaked, are freed in the new one.
 *  - all, last: a snapshot table with v3 entries lacking their 16 bytes of extra data is written
 *    anew (lib/check/snapshot-table.ts).
 *  - both: COPIED flags are set to match the refcounts (with `leaks` only when nothing else is
 *    left wrong), and after a repair that leaves no corruption and no check error, the dirty
 *    and corrupt header bits are cleared.
 *
 * Crash safety: every step leaves an image that is at worst leaky, never one whose metadata
 * points at a freed cluster. Refcounts fixed in place move from the stated value to the counted
 * one (any subset of them is no worse than before); a rebuilt structure is written in clusters past everything the image uses, synced, and only
 * then does one header write (offset and size together) switch to it; the old structure is
 * freed after the switch. L2 and L1 entries are fixed (COPIED, zeroed entries) only after the
 * refcounts they depend on are durable.
 *
 * Not repaired (counted, left as they are): misaligned data clusters, entries with reserved
 * bits, invalid subcluster bitmaps and compressed descriptors (QEMU does not fix these either).
 */
import { HeaderOffset, INCOMPAT_CORRUPT_BIT, INCOMPAT_DIRTY_BIT, MAX_REFCOUNT_TABLE_BYTES, QCOW_VERSION_3, TABLE_ENTRY_SIZE } from '../format/constants.js'
import { writeU64 } from '../format/int64.js'
import { refcountBlockEntries, setRefcount } from '../format/refcount.js'
import type { BlockFile } from '../io/block-file.js'
import { type CheckCounts, CheckPass, NO_FIX, type Reporter, checkImage } from './check.js'
import { CheckFailedError, readPadded } from './layout.js'
import { rewriteSnapshotTable } from './snapshot-table.js'

export type RepairMode = 'leaks' | 'all'

export interface RepairResult {
  /**
   * The counts to show: those of the double check when anything was fixed (with the fixed
   * numbers of the repair), else those of the repairing pass.
   */
  counts: CheckCounts
  /** Counts of the repairing pass itself (what was found, fixed and left). */
  repairPass: CheckCounts
  /** The header's dirty or corrupt bit was cleared. */
  headerBitsCleared: boolean
}

/**
 * Repairs an image opened writable. Throws CheckFailedError when the image cannot be checked
 * or the repair cannot proceed (QEMU's "Check failed").
 */
export function repairImage(file: BlockFile, imagePath: string, mode: RepairMode, report: Reporter = () => {}): RepairResult {
  if (!file.writable) throw new CheckFailedError(`'${imagePath}' is open read-only and cannot be repaired`)
  const fix = { leaks: true, errors: mode === 'all' }
  const pass = new CheckPass(file, imagePath, report)
  const snapshotCorruptions = pass.checkSnapshotTable(fix)
  pass.calculate(fix)
  const preCompare = { ...pass.counts }
  pass.compare(NO_FIX)
  let counts: CheckCounts
  let copiedPass: CheckPass
  if (pass.rebuild && fix.errors) {
    const found = { ...pass.counts }
    report('Rebuilding refcount structure')
    rebuildRefcountStructure(pass)
    // The references again, over the new structure; the old structure's clusters are leaks now.
    const second = new CheckPass(file, imagePath, report)
    second.calculate(NO_FIX)
    const calculated = { ...second.counts }
    second.compare({ leaks: true, errors: false })
    if (second.rebuild) report('ERROR rebuilt refcount structure is still broken')
    counts = {
      ...calculated,
      checkErrors: found.checkErrors + calculated.checkErrors,
      corruptionsFixed: found.corruptionsFixed + Math.max(0, found.corruptions - calculated.corruptions),
      leaksFixed: found.leaksFixed + found.leaks,
      leaks: second.counts.leaks,
      imageEndOffset: second.counts.imageEndOffset,
    }
    Object.assign(second.counts, counts)
    copiedPass = second
  } else {
    if (pass.rebuild) {
      report('ERROR need to rebuild refcount structures')
      throw new CheckFailedError(`'${imagePath}': the refcount structure is broken and must be rebuilt (repair all)`)
    }
    if (pass.counts.leaks > 0 || pass.counts.corruptions > 0) {
      Object.assign(pass.counts, preCompare)
      pass.compare(fix)
    }
    copiedPass = pass
  }
  const c = copiedPass.counts
  copiedPass.checkCopied(fix.errors || (c.checkErrors === 0 && c.corruptions === 0 && c.leaks === 0))
  counts = { ...copiedPass.counts }
  if (snapshotCorruptions > 0 && fix.errors) {
    // Incomplete snapshot entries: the table is written anew, now that refcounts are right.
    rewriteSnapshotTable(file, imagePath)
    counts.corruptionsFixed += snapshotCorruptions
  } else {
    counts.corruptions += snapshotCorruptions
  }
  let headerBitsCleared = false
  if (counts.checkErrors === 0 && counts.corruptions === 0) headerBitsCleared = clearDirtyAndCorruptBits(file)
  const repairPass = { ...counts }
  if (counts.leaksFixed === 0 && counts.corruptionsFixed === 0) return { counts, repairPass, headerBitsCleared }
  // The double check: a fresh pass over the repaired image, with what the repair fixed.
  const final = checkImage(file, imagePath, report)
  return { counts: { ...final, leaksFixed: counts.leaksFixed, corruptionsFixed: counts.corruptionsFixed }, repairPass, headerBitsCleared }
}

/** Clears the dirty and corrupt incompatible bits (v3 images). True if they were set. */
function clearDirtyAndCorruptBits(file: BlockFile): boolean {
  const head = readPadded(file, 0, HeaderOffset.incompatibleFeatures + 8)
  const view = new DataView(head.buffer)
  if (view.getUint32(HeaderOffset.version) < QCOW_VERSION_3) return false
  const lo = view.getUint32(HeaderOffset.incompatibleFeatures + 4)
  const mask = (1 << INCOMPAT_DIRTY_BIT) | (1 << INCOMPAT_CORRUPT_BIT)
  if ((lo & mask) === 0) return false
  const bits = new Uint8Array(4)
  new DataView(bits.buffer).setUint32(0, (lo & ~mask) >>> 0)
  file.pwrite(bits, HeaderOffset.incompatibleFeatures + 4, 'header')
  file.sync()
  return true
}

/**
 * The in-memory refcounts of the rebuild: the counted references, growing when the new
 * structure needs clusters past them.
 */
class RefcountArray {
  #values: Uint32Array
  #keep: ReadonlySet<number>
  length: number

  /** `keep`: clusters never allocated although unreferenced (the old structure's blocks). */
  constructor(values: Uint32Array, length: number, keep: ReadonlySet<number>) {
    this.#values = values
    this.#keep = keep
    this.length = length
  }

  get(cluster: number): number {
    return cluster < this.length ? this.#values[cluster]! : 0
  }

  set(cluster: number, value: number): void {
    if (cluster >= this.length) this.grow(cluster + 1)
    this.#values[cluster] = value
  }

  grow(length: number): void {
    if (length > this.#values.length) {
      const next = new Uint32Array(Math.max(length, this.#values.length * 2))
      next.set(this.#values.subarray(0, this.length))
      this.#values = next
    }
    this.length = Math.max(this.length, length)
  }

  /**
   * Takes `count` contiguous free clusters, searching from `from.cluster` (which moves to the
   * first free cluster seen), else at the end; returns the first one's index.
   */
  allocate(count: number, from: { cluster: number }): number {
    let cluster = from.cluster
    let run = 0
    let firstGap = true
    for (; cluster < this.length && run < count; cluster++) {
      if (this.get(cluster) === 0 && !this.#keep.has(cluster)) {
        run++
        if (firstGap) {
          from.cluster = cluster
          firstGap = false
        }
      } else {
        run = 0
      }
    }
    if (run < count) {
      // Past the end nothing is kept but what the old table names there.
      while (run < count) {
        if (this.#keep.has(cluster)) run = 0
        else run++
        cluster++
      }
      this.grow(cluster)
    }
    const first = cluster - run
    for (let i = 0; i < count; i++) this.set(first + i, 1)
    return first
  }
}

/**
 * Writes a new refcount structure (blocks and table) holding the references counted by `pass`
 * and switches the header to it. The old structure stays valid until that switch; its clusters
 * are leaks afterwards.
 *
 * Placement follows QEMU's rebuild (so a repaired image looks like qemu-img's): each needed
 * refcount block takes the first free cluster at or after the start of the range it covers,
 * the table the first free run from the start of the file; blocks the new clusters need are
 * added until the table stops growing. Only free clusters (no reference) are written, so a
 * crash before the switch leaves the image as it was. Everything is laid out in memory
 * first, then written: blocks, sync, table, sync, header, sync. Clusters the old table names
 * (even through an entry that is misaligned or has reserved bits) are never written: the old
 * structure stays intact until the switch.
 */
export function rebuildRefcountStructure(pass: CheckPass): void {
  const { file, layout } = pass
  const g = layout.geometry
  const cs = g.clusterSize
  const order = layout.header.refcountOrder
  const entriesPerBlock = refcountBlockEntries(g.clusterBits, order)
  const keep = new Set<number>()
  for (let tableIndex = 0; tableIndex < pass.onDisk.tableEntries; tableIndex++) {
    const blockOffset = pass.onDisk.blockOffset(tableIndex)
    if (blockOffset !== 0) keep.add(Math.floor(blockOffset / cs))
  }
  const refcounts = new RefcountArray(pass.computed, pass.clusterCount, keep)
  const tableEntriesPerCluster = cs / TABLE_ENTRY_SIZE
  const blockOffsets: number[] = []
  let tableEntries = 0

  /** Gives every block index with a used cluster in [first, end) a block; true if the table grew. */
  const placeBlocks = (first: number, end: number): boolean => {
    let grown = false
    const from = { cluster: 0 }
    for (let cluster = first; cluster < end; cluster++) {
      if (refcounts.get(cluster) === 0) continue
      const blockIndex = Math.floor(cluster / entriesPerBlock)
      const blockStart = blockIndex * entriesPerBlock
      if (!((blockOffsets[blockIndex] ?? 0) > 0)) {
        // A block never goes below the range it covers: ranges before it are laid out.
        if (from.cluster < blockStart) from.cluster = blockStart
        const blockCluster = refcounts.allocate(1, from)
        if (blockCluster >= end) end = blockCluster + 1
        if (tableEntries <= blockIndex) {
          tableEntries = Math.ceil((blockIndex + 1) / tableEntriesPerCluster) * tableEntriesPerCluster
          if (tableEntries * TABLE_ENTRY_SIZE > MAX_REFCOUNT_TABLE_BYTES) {
            throw new CheckFailedError(`'${pass.imagePath}': a new refcount table would be larger than ${MAX_REFCOUNT_TABLE_BYTES} bytes`)
          }
          grown = true
        }
        blockOffsets[blockIndex] = blockCluster * cs
      }
      cluster = blockStart + entriesPerBlock - 1
    }
    return grown
  }

  placeBlocks(0, refcounts.length)
  let tableCluster: number
  let tableClusters: number
  do {
    tableClusters = Math.ceil((tableEntries * TABLE_ENTRY_SIZE) / cs)
    tableCluster = refcounts.allocate(tableClusters, { cluster: 0 })
  } while (placeBlocks(tableCluster, tableCluster + tableClusters))

  const table = new Uint8Array(tableClusters * cs)
  const tableView = new DataView(table.buffer)
  blockOffsets.forEach((blockOffset, blockIndex) => {
    if (!(blockOffset > 0)) return
    const block = new Uint8Array(cs)
    const first = blockIndex * entriesPerBlock
    for (let entry = 0; entry < entriesPerBlock; entry++) {
      const value = refcounts.get(first + entry)
      if (value !== 0) setRefcount(block, entry, order, value)
    }
    file.pwrite(block, blockOffset, 'refblock')
    writeU64(tableView, blockIndex * TABLE_ENTRY_SIZE, blockOffset)
  })
  file.sync()
  const tableOffset = tableCluster * cs
  file.pwrite(table, tableOffset, 'reftable')
  file.sync()
  // refcount_table_offset (u64) and refcount_table_clusters (u32) are adjacent: one write.
  const switchBytes = new Uint8Array(12)
  const switchView = new DataView(switchBytes.buffer)
  writeU64(switchView, 0, tableOffset)
  switchView.setUint32(8, tableClusters)
  file.pwrite(switchBytes, HeaderOffset.refcountTableOffset, 'header')
  file.sync()
}

/*
 * Refcounts and host cluster allocation (spec: "Host cluster management").
 *
 * Design notes:
 *  - The refcount table lives in memory whole; refcount blocks are loaded on demand and kept
 *    (clean ones may be dropped past a bound, dirty ones never).
 *  - Increments are applied in memory at once and reach the disk at the next metadata flush,
 *    before any L2/L1 entry that uses them (see the ordering in lib/engine/metadata.ts).
 *  - Decrements are deferred: recorded now, applied only after the metadata that dropped the
 *    reference is durable. A cluster whose refcount reaches 0 is reusable only after that, so a
 *    crash can never leave an on-disk L2 entry pointing at a cluster that was reused.
 *  - Allocation scans for free clusters from a hint, and otherwise takes clusters past
 *    `allocationEnd`, the first cluster past everything this process knows to be in use.
 *  - A missing refcount block is created at allocationEnd; its own refcount goes into itself
 *    when it covers itself (the usual case), otherwise into the block that covers it.
 *  - When the refcount table is too small it moves: a larger table at allocationEnd, written
 *    whole, then the header switch (by the owner, through `tableMoved`), then the old table's
 *    clusters are freed (deferred).
 */
import { CorruptImageError, NoSpaceError } from '../errors.js'
import { MAX_REFCOUNT_TABLE_BYTES, TABLE_ENTRY_SIZE } from '../format/constants.js'
import type { Geometry } from '../format/geometry.js'
import { hex, writeU64 } from '../format/int64.js'
import { getRefcount, maxRefcount, reftableEntryOffset, refcountBlockEntries, setRefcount } from '../format/refcount.js'
import type { BlockFile } from '../io/block-file.js'

/** Clean refcount blocks kept in memory: 64 (4 MiB with 64 KiB clusters). */
const MAX_CLEAN_BLOCKS = 64

export interface RefcountLayout {
  tableOffset: number
  tableClusters: number
  refcountOrder: number
}

export class Refcounts {
  readonly refcountOrder: number
  readonly maxRefcount: number
  #file: BlockFile
  #g: Geometry
  #entriesPerBlock: number
  #tableOffset: number
  #tableClusters: number
  #table: Uint8Array
  #tableView: DataView
  #dirtyTableIndexes = new Set<number>()
  /** The table moved in memory and must be written whole, then the header switched. */
  #tableMoved = false
  #blocks = new Map<number, Uint8Array>()
  #dirtyBlocks = new Set<number>()
  #deferred: number[] = []
  #freeHint = 0
  #allocationEnd: number
  #layoutVersion = 0
  /** Told of every cluster whose refcount drops to 0 (the compressed-write cache drops it). */
  onFreed: ((cluster: number) => void) | undefined

  constructor(file: BlockFile, geometry: Geometry, layout: RefcountLayout) {
    this.#file = file
    this.#g = geometry
    this.refcountOrder = layout.refcountOrder
    this.maxRefcount = maxRefcount(layout.refcountOrder)
    this.#entriesPerBlock = refcountBlockEntries(geometry.clusterBits, layout.refcountOrder)
    this.#tableOffset = layout.tableOffset
    this.#tableClusters = layout.tableClusters
    this.#table = new Uint8Array(layout.tableClusters * geometry.clusterSize)
    if (file.pread(this.#table, layout.tableOffset) !== this.#table.length) {
      throw new CorruptImageError(`refcount table at ${hex(layout.tableOffset)} lies past the end of the file`)
    }
    this.#tableView = new DataView(this.#table.buffer)
    this.#allocationEnd = Math.ceil(file.size / geometry.clusterSize)
  }

  get tableOffset(): number {
    return this.#tableOffset
  }
  get tableClusters(): number {
    return this.#tableClusters
  }
  /** Changes whenever a refcount block is added or the table moves (lib/meta/overlap-guard.ts). */
  get layoutVersion(): number {
    return this.#layoutVersion
  }

  /** The cluster-aligned refcount block offsets the table points to. */
  *blockOffsets(): Generator<number> {
    for (let i = 0; i < this.#tableEntries(); i++) {
      const blockOffset = this.#blockOffsetAt(i)
      if (blockOffset !== 0 && blockOffset % this.#g.clusterSize === 0) yield blockOffset
    }
  }

  /** First cluster index past everything known to be in use. */
  get allocationEnd(): number {
    return this.#allocationEnd
  }

  #tableEntries(): number {
    return this.#table.length / TABLE_ENTRY_SIZE
  }

  #blockOffsetAt(tableIndex: number): number {
    if (tableIndex >= this.#tableEntries()) return 0
    const at = tableIndex * TABLE_ENTRY_SIZE
    return reftableEntryOffset(this.#tableView.getUint32(at), this.#tableView.getUint32(at + 4))
  }

  #loadBlock(blockOffset: number): Uint8Array {
    let block = this.#blocks.get(blockOffset)
    if (block) return block
    if (blockOffset % this.#g.clusterSize !== 0) {
      throw new CorruptImageError(`refcount block offset ${hex(blockOffset)} is not cluster aligned`)
    }
    block = new Uint8Array(this.#g.clusterSize)
    if (this.#file.pread(block, blockOffset) !== block.length) {
      throw new CorruptImageError(`refcount block at ${hex(blockOffset)} lies past the end of the file`)
    }
    if (this.#blocks.size >= MAX_CLEAN_BLOCKS + this.#dirtyBlocks.size) {
      for (const key of this.#blocks.keys()) {
        if (!this.#dirtyBlocks.has(key)) {
          this.#blocks.delete(key)
          break
        }
      }
    }
    this.#blocks.set(blockOffset, block)
    return block
  }

  /** Refcount of the host cluster with index `cluster` (host offset / cluster size). */
  get(cluster: number): number {
    const blockOffset = this.#blockOffsetAt(Math.floor(cluster / this.#entriesPerBlock))
    if (blockOffset === 0) return 0
    return getRefcount(this.#loadBlock(blockOffset), cluster % this.#entriesPerBlock, this.refcountOrder)
  }

  /** Sets a refcount in memory, creating the refcount block (and growing the table) if needed. */
  set(cluster: number, value: number): void {
    if (value > this.maxRefcount) {
      throw new NoSpaceError(`refcount of cluster ${hex(cluster * this.#g.clusterSize)} would overflow ${2 ** this.refcountOrder} bits`)
    }
    const tableIndex = Math.floor(cluster / this.#entriesPerBlock)
    let blockOffset = this.#blockOffsetAt(tableIndex)
    if (blockOffset === 0) {
      if (value === 0) return
      blockOffset = this.#createBlock(tableIndex)
    }
    const block = this.#loadBlock(blockOffset)
    setRefcount(block, cluster % this.#entriesPerBlock, this.refcountOrder, value)
    this.#dirtyBlocks.add(blockOffset)
    if (cluster >= this.#allocationEnd && value > 0) this.#allocationEnd = cluster + 1
  }

  increment(cluster: number): void {
    this.set(cluster, this.get(cluster) + 1)
  }

  /** Records a decrement to apply after the next durable metadata flush. */
  decrementLater(cluster: number): void {
    this.#deferred.push(cluster)
  }

  hasDeferred(): boolean {
    return this.#deferred.length > 0
  }

  /** Applies deferred decrements in memory; freed clusters become allocatable. */
  applyDeferred(): void {
    const deferred = this.#deferred
    this.#deferred = []
    for (const cluster of deferred) {
      const current = this.get(cluster)
      if (current === 0) {
        throw new CorruptImageError(`refcount of cluster ${hex(cluster * this.#g.clusterSize)} would drop below zero`)
      }
      this.set(cluster, current - 1)
      if (current === 1) {
        if (cluster < this.#freeHint) this.#freeHint = cluster
        this.onFreed?.(cluster)
      }
    }
  }

  /**
   * Allocates `count` contiguous free host clusters with refcount 1; returns the host offset of
   * the first. Never returns cluster 0 (the header).
   */
  allocate(count: number): number {
    let start = Math.max(this.#freeHint, 1)
    let firstGap = -1
    // Below allocationEnd, look for a free run; at or past it everything is free.
    while (start < this.#allocationEnd) {
      let run = 0
      while (run < count && this.get(start + run) === 0) run++
      if (run === count) break
      if (run > 0 && firstGap < 0) firstGap = start
      start += run + 1
    }
    this.#freeHint = firstGap >= 0 ? firstGap : start + count
    if (start + count > this.#allocationEnd) this.#allocationEnd = start + count
    for (let i = 0; i < count; i++) this.set(start + i, 1)
    return start * this.#g.clusterSize
  }

  /** Creates a zeroed refcount block for tableIndex at allocationEnd; returns its offset. */
  #createBlock(tableIndex: number): number {
    if (tableIndex >= this.#tableEntries()) this.#growTable(tableIndex)
    const existing = this.#blockOffsetAt(tableIndex)
    if (existing !== 0) return existing
    let cluster = this.#allocationEnd
    while (this.get(cluster) !== 0) cluster++
    this.#allocationEnd = cluster + 1
    const blockOffset = cluster * this.#g.clusterSize
    this.#blocks.set(blockOffset, new Uint8Array(this.#g.clusterSize))
    this.#dirtyBlocks.add(blockOffset)
    writeU64(this.#tableView, tableIndex * TABLE_ENTRY_SIZE, blockOffset)
    this.#dirtyTableIndexes.add(tableIndex)
    this.#layoutVersion++
    // The block's own refcount: in itself when it covers itself, else wherever it belongs.
    this.set(cluster, 1)
    return blockOffset
  }

  /** Moves the refcount table to a larger place at allocationEnd, able to hold `tableIndex`. */
  #growTable(tableIndex: number): void {
    const cs = this.#g.clusterSize
    const neededClusters = Math.ceil(((tableIndex + 1) * TABLE_ENTRY_SIZE) / cs)
    // Leave room: the new table and the blocks describing it must fit too.
    const newClusters = Math.max(neededClusters + 1, this.#tableClusters * 2)
    if (newClusters * cs > MAX_REFCOUNT_TABLE_BYTES) {
      throw new NoSpaceError('refcount table would grow past its limit (8 MiB)', 'EFBIG')
    }
    let start = this.#allocationEnd
    for (let i = 0; i < newClusters; ) {
      if (this.get(start + i) !== 0) {
        start += i + 1
        i = 0
      } else {
        i++
      }
    }
    const oldOffset = this.#tableOffset
    const oldClusters = this.#tableClusters
    const table = new Uint8Array(newClusters * cs)
    table.set(this.#table)
    this.#table = table
    this.#tableView = new DataView(table.buffer)
    this.#tableOffset = start * cs
    this.#tableClusters = newClusters
    this.#tableMoved = true
    this.#layoutVersion++
    this.#allocationEnd = Math.max(this.#allocationEnd, start + newClusters)
    for (let i = 0; i < newClusters; i++) this.set(start + i, 1)
    const oldFirst = oldOffset / cs
    for (let i = 0; i < oldClusters; i++) this.decrementLater(oldFirst + i)
  }

  hasDirty(): boolean {
    return this.#dirtyBlocks.size > 0 || this.#dirtyTableIndexes.size > 0 || this.#tableMoved
  }

  /** Flush stage 1: writes dirty refcount blocks. Returns true if anything was written. */
  writeBlocks(): boolean {
    if (this.#dirtyBlocks.size === 0) return false
    const offsets = [...this.#dirtyBlocks].sort((a, b) => a - b)
    for (const offset of offsets) this.#file.pwrite(this.#blocks.get(offset)!, offset, 'refblock')
    this.#dirtyBlocks.clear()
    return true
  }

  /**
   * Flush stage 2: writes the refcount table entries that changed (or the whole table if it
   * moved). Returns 'moved' when the header must now point at the new table.
   */
  writeTable(): 'none' | 'entries' | 'moved' {
    if (this.#tableMoved) {
      this.#file.pwrite(this.#table, this.#tableOffset, 'reftable')
      this.#tableMoved = false
      this.#dirtyTableIndexes.clear()
      return 'moved'
    }
    if (this.#dirtyTableIndexes.size === 0) return 'none'
    const indexes = [...this.#dirtyTableIndexes].sort((a, b) => a - b)
    const first = indexes[0]!
    const last = indexes[indexes.length - 1]!
    const bytes = this.#table.subarray(first * TABLE_ENTRY_SIZE, (last + 1) * TABLE_ENTRY_SIZE)
    this.#file.pwrite(bytes, this.#tableOffset + first * TABLE_ENTRY_SIZE, 'reftable')
    this.#dirtyTableIndexes.clear()
    return 'entries'
  }
}

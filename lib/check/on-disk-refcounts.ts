/*
 * The refcounts an image states (its refcount table and blocks), read the way QEMU reads them
 * during a check: a cluster past the table, or whose table entry is 0, has refcount 0; a block
 * past the end of the file reads as zeros; a block at an unaligned offset cannot be read (the
 * lookup fails, and qemu-img counts a check error).
 *
 * The repair writes through the same object: set() changes a cached block, flush() writes the
 * changed blocks. Blocks are cached up to a byte bound (dirty blocks stay until flushed).
 */
import { REFT_OFFSET_MASK_LO, TABLE_ENTRY_SIZE } from '../format/constants.js'
import type { Geometry } from '../format/geometry.js'
import { getRefcount, maxRefcount, refcountBlockEntries, reftableEntryOffset, setRefcount } from '../format/refcount.js'
import type { BlockFile } from '../io/block-file.js'
import { readPadded } from './layout.js'

/** Clean blocks kept in memory: 16 MiB, and at least 4 blocks. */
const CACHE_BYTES = 16 * 1024 * 1024

/** Refcount table entry bits 0-8 are reserved (REFT_RESERVED_MASK). */
const REFT_RESERVED_MASK_LO = ~REFT_OFFSET_MASK_LO >>> 0

export class OnDiskRefcounts {
  readonly refcountOrder: number
  readonly entriesPerBlock: number
  /** The largest refcount an entry can hold (capped at 2^53 - 1). */
  readonly maxRefcount: number
  #file: BlockFile
  #g: Geometry
  #table: Uint8Array
  #view: DataView
  #blocks = new Map<number, Uint8Array>()
  #dirty = new Set<number>()
  #maxCleanBlocks: number

  constructor(file: BlockFile, geometry: Geometry, table: Uint8Array, refcountOrder: number) {
    this.#file = file
    this.#g = geometry
    this.#table = table
    this.#view = new DataView(table.buffer, table.byteOffset, table.byteLength)
    this.refcountOrder = refcountOrder
    this.entriesPerBlock = refcountBlockEntries(geometry.clusterBits, refcountOrder)
    this.maxRefcount = maxRefcount(refcountOrder)
    this.#maxCleanBlocks = Math.max(4, Math.floor(CACHE_BYTES / geometry.clusterSize))
  }

  /** Entries in the refcount table. */
  get tableEntries(): number {
    return this.#table.length / TABLE_ENTRY_SIZE
  }

  /**
   * The refcount block offset of table entry `tableIndex` (reserved bits masked off). An offset
   * past 2^53 (far outside any file) comes out as one just below 2^53 with the same offset
   * into its cluster, so that it is still outside the image, and aligned exactly when it is.
   */
  blockOffset(tableIndex: number): number {
    if (tableIndex >= this.tableEntries) return 0
    const at = tableIndex * TABLE_ENTRY_SIZE
    const hi = this.#view.getUint32(at)
    const lo = this.#view.getUint32(at + 4)
    if (hi >= 0x200000) return 2 ** 53 - this.#g.clusterSize + (reftableEntryOffset(0, lo) % this.#g.clusterSize)
    return reftableEntryOffset(hi, lo)
  }

  /** True if table entry `tableIndex` has reserved bits (0-8) set. */
  reservedBitsSet(tableIndex: number): boolean {
    return (this.#view.getUint32(tableIndex * TABLE_ENTRY_SIZE + 4) & REFT_RESERVED_MASK_LO) !== 0
  }

  #block(blockOffset: number): Uint8Array {
    let block = this.#blocks.get(blockOffset)
    if (block) {
      // Most recently used last (Map keeps insertion order).
      this.#blocks.delete(blockOffset)
      this.#blocks.set(blockOffset, block)
      return block
    }
    block = readPadded(this.#file, blockOffset, this.#g.clusterSize)
    if (this.#blocks.size - this.#dirty.size >= this.#maxCleanBlocks) {
      for (const key of this.#blocks.keys()) {
        if (!this.#dirty.has(key)) {
          this.#blocks.delete(key)
          break
        }
      }
    }
    this.#blocks.set(blockOffset, block)
    return block
  }

  /** The stated refcount of host cluster `cluster`, or undefined if its block is unaligned. */
  get(cluster: number): number | undefined {
    const blockOffset = this.blockOffset(Math.floor(cluster / this.entriesPerBlock))
    if (blockOffset === 0) return 0
    if (blockOffset % this.#g.clusterSize !== 0) return undefined
    return getRefcount(this.#block(blockOffset), cluster % this.entriesPerBlock, this.refcountOrder)
  }

  /** Changes a refcount in its (existing, aligned) block; written by flush(). */
  set(cluster: number, value: number): void {
    const blockOffset = this.blockOffset(Math.floor(cluster / this.entriesPerBlock))
    if (blockOffset === 0 || blockOffset % this.#g.clusterSize !== 0) {
      throw new RangeError(`cluster ${cluster} has no usable refcount block`)
    }
    setRefcount(this.#block(blockOffset), cluster % this.entriesPerBlock, this.refcountOrder, value)
    this.#dirty.add(blockOffset)
  }

  /** Writes the changed blocks (not synced). Returns true if anything was written. */
  flush(): boolean {
    if (this.#dirty.size === 0) return false
    for (const blockOffset of [...this.#dirty].sort((a, b) => a - b)) {
      this.#file.pwrite(this.#blocks.get(blockOffset)!, blockOffset, 'refblock')
    }
    this.#dirty.clear()
    return true
  }
}

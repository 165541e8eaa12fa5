/*
 * The active L1 table, held in memory whole (at most 32 MiB, QEMU's limit).
 *
 * Design notes:
 *  - Entries changed in memory are written at the metadata flush, after the L2 tables they
 *    point to are durable.
 *  - Growing moves the table: a new, larger table is allocated by the caller, written whole at
 *    the flush, and only then does the header point at it; the old table's clusters are freed
 *    after that (deferred).
 */
import { CorruptImageError } from '../errors.js'
import { TABLE_ENTRY_SIZE } from '../format/constants.js'
import { hex } from '../format/int64.js'
import { encodeL1Entry, l1EntryL2Offset } from '../format/l1-entry.js'
import { OFLAG_COPIED_HI } from '../format/constants.js'
import type { BlockFile } from '../io/block-file.js'

export class L1Table {
  #bytes: Uint8Array
  #view: DataView
  #size: number
  #offset: number
  #clusterSize: number
  #dirty = new Set<number>()
  #moved = false
  #layoutVersion = 0

  constructor(bytes: Uint8Array, size: number, offset: number, clusterSize: number) {
    this.#bytes = bytes
    this.#view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength)
    this.#size = size
    this.#offset = offset
    this.#clusterSize = clusterSize
  }

  /** Number of entries (l1_size). */
  get size(): number {
    return this.#size
  }
  /** Host offset of the table (l1_table_offset). */
  get offset(): number {
    return this.#offset
  }
  /** Changes whenever an entry or the table's place changes (see lib/meta/overlap-guard.ts). */
  get layoutVersion(): number {
    return this.#layoutVersion
  }

  /** The cluster-aligned L2 table offsets the entries point to (misaligned ones left out). */
  *l2Offsets(): Generator<number> {
    for (let i = 0; i < this.#size; i++) {
      const at = i * TABLE_ENTRY_SIZE
      const l2Offset = l1EntryL2Offset(this.#view.getUint32(at), this.#view.getUint32(at + 4))
      if (l2Offset !== 0 && l2Offset % this.#clusterSize === 0) yield l2Offset
    }
  }

  /** L2 table offset of entry l1Index (0: unallocated, also past the end). Throws if misaligned. */
  l2Offset(l1Index: number): number {
    if (l1Index >= this.#size) return 0
    const at = l1Index * TABLE_ENTRY_SIZE
    const l2Offset = l1EntryL2Offset(this.#view.getUint32(at), this.#view.getUint32(at + 4))
    if (l2Offset % this.#clusterSize !== 0) {
      throw new CorruptImageError(`L2 table offset ${hex(l2Offset)} is not cluster aligned (L1 index ${hex(l1Index)})`)
    }
    return l2Offset
  }

  /** COPIED flag of entry l1Index. */
  copied(l1Index: number): boolean {
    if (l1Index >= this.#size) return false
    return (this.#view.getUint32(l1Index * TABLE_ENTRY_SIZE) & OFLAG_COPIED_HI) !== 0
  }

  set(l1Index: number, l2Offset: number, copied: boolean): void {
    const { hi, lo } = encodeL1Entry({ l2Offset, copied })
    const at = l1Index * TABLE_ENTRY_SIZE
    this.#view.setUint32(at, hi)
    this.#view.setUint32(at + 4, lo)
    this.#dirty.add(l1Index)
    this.#layoutVersion++
  }

  /** Replaces the table by a larger one at newOffset (already allocated); entries are kept. */
  grow(newSize: number, newOffset: number): void {
    const bytes = new Uint8Array(Math.ceil((newSize * TABLE_ENTRY_SIZE) / this.#clusterSize) * this.#clusterSize)
    bytes.set(this.#bytes.subarray(0, this.#size * TABLE_ENTRY_SIZE))
    this.#bytes = bytes
    this.#view = new DataView(bytes.buffer)
    this.#size = newSize
    this.#offset = newOffset
    this.#moved = true
    this.#dirty.clear()
    this.#layoutVersion++
  }

  hasDirty(): boolean {
    return this.#moved || this.#dirty.size > 0
  }

  /** Writes changed entries, or the whole table if it moved ('moved': the header must follow). */
  writeDirty(file: BlockFile): 'none' | 'entries' | 'moved' {
    if (this.#moved) {
      file.pwrite(this.#bytes, this.#offset, 'l1')
      this.#moved = false
      this.#dirty.clear()
      return 'moved'
    }
    if (this.#dirty.size === 0) return 'none'
    const indexes = [...this.#dirty].sort((a, b) => a - b)
    const first = indexes[0]!
    const last = indexes[indexes.length - 1]!
    file.pwrite(this.#bytes.subarray(first * TABLE_ENTRY_SIZE, (last + 1) * TABLE_ENTRY_SIZE), this.#offset + first * TABLE_ENTRY_SIZE, 'l1')
    this.#dirty.clear()
    return 'entries'
  }
}

/*
 * L2 table cache, in slices.
 *
 * Design notes:
 *  - The cache holds fixed-size slices of L2 tables (at most 4 KiB each, or one cluster when
 *    clusters are smaller), in on-disk byte order, keyed by host offset of the slice. A slice of
 *    a 64 KiB-cluster image maps 32 MiB of guest space (16 MiB with extended L2), so a random
 *    read loads 4 KiB of metadata, not a whole (up to 2 MiB) table.
 *  - It is bounded in bytes (the `cache-size` mount option) through lru-cache; at least two
 *    slices are kept whatever the bound.
 *  - Dirty slices live outside the LRU, in a map that is never evicted (lru-cache's dispose is
 *    synchronous and cannot write back); the metadata flush writes them and hands them back to
 *    the LRU as clean slices.
 */
import { LRUCache } from 'lru-cache'
import { CorruptImageError } from '../errors.js'
import type { Geometry } from '../format/geometry.js'
import { hex } from '../format/int64.js'
import type { BlockFile } from '../io/block-file.js'

/** Largest slice: 4 KiB (one page) of L2 entries. */
export const L2_SLICE_MAX_BYTES = 4096
/** Default bound of the L2 cache when the user gives none: 32 MiB, QEMU's default maximum. */
export const DEFAULT_L2_CACHE_BYTES = 32 * 1024 * 1024
/** Minimum number of slices the cache keeps, whatever the configured size. */
const MIN_SLICES = 2

export interface L2Slice {
  bytes: Uint8Array
  view: DataView
  /** Host offset of the slice. */
  hostOffset: number
}

export class L2SliceCache {
  readonly sliceBytes: number
  /** L2 entries per slice. */
  readonly sliceEntries: number
  #file: BlockFile
  #cache: LRUCache<number, L2Slice>
  #dirty = new Map<number, L2Slice>()
  #hits = 0
  #misses = 0

  constructor(file: BlockFile, geometry: Geometry, maxBytes: number = DEFAULT_L2_CACHE_BYTES) {
    this.#file = file
    this.sliceBytes = Math.min(geometry.clusterSize, L2_SLICE_MAX_BYTES)
    this.sliceEntries = this.sliceBytes / geometry.l2EntrySize
    // Bounded by bytes, not entry count: lru-cache preallocates its index for `max` entries,
    // which with 512-byte slices and a 32 MiB bound would cost 65536 slots at every open.
    const sliceBytes = this.sliceBytes
    this.#cache = new LRUCache<number, L2Slice>({
      maxSize: Math.max(MIN_SLICES * sliceBytes, maxBytes),
      sizeCalculation: () => sliceBytes,
    })
  }

  /**
   * The slice holding entry `l2Index` of the L2 table at l2Offset, and the entry's index within
   * the slice. Reads the slice on a miss; throws CorruptImageError if it lies past EOF.
   */
  slice(l2Offset: number, l2Index: number): { slice: L2Slice; indexInSlice: number } {
    const sliceIndex = Math.floor(l2Index / this.sliceEntries)
    const sliceOffset = l2Offset + sliceIndex * this.sliceBytes
    let slice = this.#dirty.get(sliceOffset) ?? this.#cache.get(sliceOffset)
    if (slice === undefined) {
      this.#misses++
      // Checked before reading: a crafted offset may lie beyond what a file position can be.
      if (!Number.isSafeInteger(sliceOffset) || sliceOffset + this.sliceBytes > this.#file.size) {
        throw new CorruptImageError(`L2 table at ${hex(l2Offset)} lies past the end of the image file`)
      }
      const bytes = new Uint8Array(this.sliceBytes)
      const n = this.#file.pread(bytes, sliceOffset)
      if (n !== bytes.length) {
        throw new CorruptImageError(`L2 table at ${hex(l2Offset)} lies past the end of the image file`)
      }
      slice = { bytes, view: new DataView(bytes.buffer), hostOffset: sliceOffset }
      this.#cache.set(sliceOffset, slice)
    } else {
      this.#hits++
    }
    return { slice, indexInSlice: l2Index - sliceIndex * this.sliceEntries }
  }

  /** Marks a slice returned by `slice` as modified: it stays in memory until written. */
  markDirty(slice: L2Slice): void {
    this.#dirty.set(slice.hostOffset, slice)
    this.#cache.delete(slice.hostOffset)
  }

  get dirtyCount(): number {
    return this.#dirty.size
  }

  /**
   * Installs a whole L2 table whose bytes the caller has just written to the file at l2Offset
   * (a new or copied table), as clean slices.
   */
  installTable(l2Offset: number, table: Uint8Array): void {
    for (let at = 0; at < table.length; at += this.sliceBytes) {
      const bytes = table.slice(at, at + this.sliceBytes)
      const sliceOffset = l2Offset + at
      this.#dirty.delete(sliceOffset)
      this.#cache.set(sliceOffset, { bytes, view: new DataView(bytes.buffer), hostOffset: sliceOffset })
    }
  }

  /** Drops every cached slice of the L2 table at l2Offset (the table was freed). */
  forgetTable(l2Offset: number, clusterSize: number): void {
    for (let at = 0; at < clusterSize; at += this.sliceBytes) {
      this.#dirty.delete(l2Offset + at)
      this.#cache.delete(l2Offset + at)
    }
  }

  /** Writes every dirty slice; they become clean. Returns true if anything was written. */
  writeDirty(): boolean {
    if (this.#dirty.size === 0) return false
    const slices = [...this.#dirty.values()].sort((a, b) => a.hostOffset - b.hostOffset)
    for (const slice of slices) this.#file.pwrite(slice.bytes, slice.hostOffset, 'l2')
    this.#dirty.clear()
    for (const slice of slices) this.#cache.set(slice.hostOffset, slice)
    return true
  }

  stats(): { hits: number; misses: number; slices: number } {
    return { hits: this.#hits, misses: this.#misses, slices: this.#cache.size }
  }

  /** Drops clean slices (dirty ones stay). */
  clear(): void {
    this.#cache.clear()
  }
}

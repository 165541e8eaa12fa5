/*
 * The write path: guest writes, zero writes and resizes, turned into data writes and metadata
 * changes (see lib/engine/metadata.ts for when those reach the disk, and in what order).
 *
 * Design notes, per guest cluster touched by a write:
 *  - The L2 table must be ours: a missing table is allocated (written zeroed at once); a table
 *    shared with a snapshot (refcount > 1) is copied first (L2 COW).
 *  - In place: a NORMAL cluster with COPIED set (refcount 1). Without extended L2 the bytes go
 *    straight to the host cluster. With extended L2 the touched subclusters are written; a
 *    partly touched subcluster that was not allocated is completed from what a read returns
 *    there (backing file or zeros), and the touched subclusters get their allocation bits.
 *    A ZERO_ALLOC cluster (v3 zero flag on an allocated cluster) is rewritten whole in place.
 *  - New cluster, subcluster-aware (extended L2, cluster without host offset): only the touched
 *    subclusters are written and allocated; untouched ones keep their bits, so they still read
 *    through to the backing file or as zeros.
 *  - New cluster, whole (compressed, shared with a snapshot, or no extended L2): the cluster is
 *    read as it is (decompressed, from the backing file, zeros), merged with the write, written
 *    to a new host cluster; the old host cluster(s) are released (deferred decrement).
 *  - All-zero writes become zero clusters (v3) or zero subclusters (extended L2) where that is
 *    correct, and are skipped where the range already reads as zeros. Never where the backing
 *    file would then show through: v2 images have no zero flag, so zeros are written as data.
 *  - Everything here is synchronous; callers serialize writes with the image's async lock.
 */
import { CorruptImageError, NoSpaceError } from '../errors.js'
import {
  MAX_L1_TABLE_BYTES,
  OFLAG_COPIED_HI,
  OFLAG_ZERO_LO,
  QCOW_VERSION_3,
  TABLE_ENTRY_SIZE,
} from '../format/constants.js'
import { type Geometry, l1EntriesFor, l1IndexOf, l2IndexOf } from '../format/geometry.js'
import { hex, splitU64 } from '../format/int64.js'
import {
  ClusterType,
  SubclusterType,
  clusterTypeOf,
  decodeCompressedDescriptor,
  encodeCompressedEntry,
  isCopiedEntry,
  l2EntryHostOffset,
  subclusterRangeMask,
  subclusterTypeOf,
} from '../format/l2-entry.js'
import type { BlockFile } from '../io/block-file.js'
import type { L1Table } from '../meta/l1-table.js'
import type { L2Slice, L2SliceCache } from '../meta/l2-cache.js'
import type { Refcounts } from '../meta/refcounts.js'
import type { ReadPath } from './read-path.js'

const ALL_SUBCLUSTERS = 0xffffffff

export interface WritePathOptions {
  geometry: Geometry
  version: number
  file: BlockFile
  l1: L1Table
  l2Cache: L2SliceCache
  refcounts: Refcounts
  readPath: ReadPath
  /** Guest bytes below this offset may read from a backing file (0: no backing file). */
  backingSize: () => number
}

/**
 * One piece of a write or zero write, inside one guest cluster, offered to a router before the
 * normal path handles it (the `compress` mount option: lib/engine/compress/pipeline.ts).
 */
export interface RoutedChunk {
  clusterGuestOffset: number
  offsetInCluster: number
  /** The bytes (all zero for a zero write). */
  chunk: Uint8Array
  /** The cluster has no host offset (unallocated or zero, no data of its own). */
  fresh: boolean
  /** The piece comes from a zero write (writeZeroes, or a resize making a range read as zeros). */
  zeroing: boolean
  /** Whether the piece's range of a fresh cluster reads as zeros now (not from a backing file). */
  readsZero: () => boolean
}

export interface WriteRouter {
  /** Takes the piece (returns true), or leaves it to the normal path (false). */
  route(piece: RoutedChunk): boolean
  /** Guest clusters [firstCluster, endCluster) lose their mappings (a shrink, a discard). */
  discard(firstCluster: number, endCluster: number): void
}

/** Where one guest cluster's L2 entry lives, and its current value. */
interface EntryRef {
  slice: L2Slice
  /** Byte offset of the entry in the slice. */
  at: number
  hi: number
  lo: number
  zeroBits: number
  allocBits: number
}

export class WritePath {
  #g: Geometry
  #version: number
  #file: BlockFile
  #l1: L1Table
  #l2Cache: L2SliceCache
  #refcounts: Refcounts
  #readPath: ReadPath
  #backingSize: () => number
  #zeros: Uint8Array
  /** Guest data was written since the last flush (a sync is owed). */
  dataWritten = false
  /** Sees every piece first when set (the `compress` mount option). */
  router: WriteRouter | undefined
  /** False while the router itself writes through this path. */
  #routing = true

  constructor(options: WritePathOptions) {
    this.#g = options.geometry
    this.#version = options.version
    this.#file = options.file
    this.#l1 = options.l1
    this.#l2Cache = options.l2Cache
    this.#refcounts = options.refcounts
    this.#readPath = options.readPath
    this.#backingSize = options.backingSize
    this.#zeros = new Uint8Array(this.#g.clusterSize)
  }

  /** Writes buf at guestOffset (the caller has sized the disk to hold it). */
  write(buf: Uint8Array, guestOffset: number): void {
    const cs = this.#g.clusterSize
    let done = 0
    while (done < buf.length) {
      const pos = guestOffset + done
      const offsetInCluster = pos % cs
      const bytes = Math.min(cs - offsetInCluster, buf.length - done)
      this.#writeInCluster(pos - offsetInCluster, offsetInCluster, buf.subarray(done, done + bytes), false)
      done += bytes
    }
  }

  /** Makes [guestOffset, guestOffset + bytes) read as zeros. */
  writeZeroes(guestOffset: number, bytes: number): void {
    const cs = this.#g.clusterSize
    let done = 0
    while (done < bytes) {
      const pos = guestOffset + done
      const offsetInCluster = pos % cs
      const n = Math.min(cs - offsetInCluster, bytes - done)
      this.#writeInCluster(pos - offsetInCluster, offsetInCluster, this.#zeros.subarray(0, n), true)
      done += n
    }
  }

  /** write() that bypasses the router (the router's own writes). */
  writeDirect(buf: Uint8Array, guestOffset: number): void {
    this.#unrouted(() => this.write(buf, guestOffset))
  }

  /** writeZeroes() that bypasses the router. */
  writeZeroesDirect(guestOffset: number, bytes: number): void {
    this.#unrouted(() => this.writeZeroes(guestOffset, bytes))
  }

  #unrouted(step: () => void): void {
    const before = this.#routing
    this.#routing = false
    try {
      step()
    } finally {
      this.#routing = before
    }
  }

  /**
   * Maps the fresh guest cluster at clusterGuestOffset to `compressedBytes` bytes of compressed
   * data at the host offset `place` returns (called once the L2 table is ready, so the table is
   * allocated before the data's host space). The entry gets an all-zero subcluster bitmap
   * (extended L2: compressed clusters have no subclusters). Returns the host offset.
   */
  installCompressed(clusterGuestOffset: number, compressedBytes: number, place: (bytes: number) => number): number {
    const g = this.#g
    const ref = this.#entryForWrite(clusterGuestOffset)
    this.#checkBitmap(ref, clusterGuestOffset)
    const type = clusterTypeOf(ref.hi, ref.lo, g.extendedL2, false)
    if (type !== ClusterType.UNALLOCATED && type !== ClusterType.ZERO_PLAIN) {
      throw new CorruptImageError(`guest cluster ${hex(clusterGuestOffset)} was allocated while its compressed data was on the way`)
    }
    const hostOffset = place(compressedBytes)
    const { hi, lo } = encodeCompressedEntry(hostOffset, compressedBytes, g.clusterBits)
    this.#setEntry(ref, hi, lo, 0, 0)
    return hostOffset
  }

  // ---- one cluster ----

  #writeInCluster(clusterGuestOffset: number, offsetInCluster: number, chunk: Uint8Array, zeroing: boolean): void {
    const g = this.#g
    const ref = this.#entryForWrite(clusterGuestOffset)
    this.#checkBitmap(ref, clusterGuestOffset)
    if (this.router && this.#routing) {
      const type = clusterTypeOf(ref.hi, ref.lo, g.extendedL2, false)
      const fresh = type === ClusterType.UNALLOCATED || type === ClusterType.ZERO_PLAIN
      const readsZero = () => this.#freshRangeReadsZero(ref, clusterGuestOffset, offsetInCluster, chunk.length)
      if (this.router.route({ clusterGuestOffset, offsetInCluster, chunk, fresh, zeroing, readsZero })) return
    }
    if (isAllZero(chunk) && this.#tryZeroWrite(clusterGuestOffset, offsetInCluster, chunk.length, ref)) return

    const type = clusterTypeOf(ref.hi, ref.lo, g.extendedL2, false)
    const host = l2EntryHostOffset(ref.hi, ref.lo)
    const copied = isCopiedEntry(ref.hi)
    const firstSc = Math.floor(offsetInCluster / g.subclusterSize)
    const endSc = Math.ceil((offsetInCluster + chunk.length) / g.subclusterSize)

    if (type === ClusterType.NORMAL && copied) {
      this.#checkDataCluster(host)
      if (!g.extendedL2) {
        this.#file.pwrite(chunk, host + offsetInCluster, 'data')
        this.dataWritten = true
        return
      }
      this.#writeSubclusterRange(clusterGuestOffset, offsetInCluster, chunk, host, firstSc, endSc)
      const touched = subclusterRangeMask(firstSc, endSc)
      if ((ref.allocBits & touched) >>> 0 !== touched || (ref.zeroBits & touched) !== 0) {
        this.#setEntry(ref, ref.hi, ref.lo, (ref.zeroBits & ~touched) >>> 0, (ref.allocBits | touched) >>> 0)
      }
      return
    }
    if (type === ClusterType.ZERO_ALLOC && copied) {
      // v3 zero flag on an allocated cluster (no extended L2): rewrite it whole, in place.
      this.#checkDataCluster(host)
      this.#file.pwrite(this.#mergedCluster(clusterGuestOffset, offsetInCluster, chunk), host, 'data')
      this.dataWritten = true
      this.#setEntry(ref, ref.hi, (ref.lo & ~OFLAG_ZERO_LO) >>> 0, 0, 0)
      return
    }

    const newHost = this.#refcounts.allocate(1)
    const { hi: newHi, lo: newLo } = splitU64(newHost)
    const entryHi = (newHi | OFLAG_COPIED_HI) >>> 0
    if (g.extendedL2 && (type === ClusterType.UNALLOCATED || type === ClusterType.ZERO_PLAIN)) {
      // Subcluster-aware allocation: only the touched subclusters are written.
      this.#writeSubclusterRange(clusterGuestOffset, offsetInCluster, chunk, newHost, firstSc, endSc)
      const touched = subclusterRangeMask(firstSc, endSc)
      this.#setEntry(ref, entryHi, newLo, (ref.zeroBits & ~touched) >>> 0, touched)
      return
    }
    // Whole-cluster copy: compressed, shared, or no extended L2.
    this.#writeWholeCluster(clusterGuestOffset, offsetInCluster, chunk, newHost)
    let zeroBits = 0
    let allocBits = 0
    if (g.extendedL2) {
      const touched = subclusterRangeMask(firstSc, endSc)
      if (type === ClusterType.COMPRESSED) {
        allocBits = ALL_SUBCLUSTERS
      } else {
        allocBits = (ref.allocBits | touched) >>> 0
        zeroBits = (ref.zeroBits & ~touched) >>> 0
      }
    }
    this.#releaseCluster(ref)
    this.#setEntry(ref, entryHi, newLo, zeroBits, allocBits)
  }

  /**
   * Writes subclusters [firstSc, endSc) of the cluster at hostCluster: the chunk, completed in
   * partly touched subclusters with what a read returns there now.
   */
  #writeSubclusterRange(clusterGuestOffset: number, offsetInCluster: number, chunk: Uint8Array, hostCluster: number, firstSc: number, endSc: number): void {
    const scs = this.#g.subclusterSize
    const start = firstSc * scs
    const end = endSc * scs
    let out = chunk
    if (start !== offsetInCluster || end !== offsetInCluster + chunk.length) {
      out = new Uint8Array(end - start)
      const head = offsetInCluster - start
      const tailStart = head + chunk.length
      if (head > 0) this.#readPath.readSync(out.subarray(0, head), clusterGuestOffset + start)
      if (tailStart < out.length) this.#readPath.readSync(out.subarray(tailStart), clusterGuestOffset + start + tailStart)
      out.set(chunk, head)
    }
    this.#file.pwrite(out, hostCluster + start, 'data')
    this.dataWritten = true
  }

  /**
   * Writes the whole cluster at the new hostCluster: what a read returns there now, with chunk
   * laid over it. When the cluster lies past the end of the file and the rest of it reads as
   * zeros, only the chunk is written and the file is extended over the cluster (bytes past the
   * old end of a file read as zeros): a 4 KiB write into a fresh 64 KiB cluster writes 4 KiB.
   */
  #writeWholeCluster(clusterGuestOffset: number, offsetInCluster: number, chunk: Uint8Array, hostCluster: number): void {
    const cs = this.#g.clusterSize
    const merged = this.#mergedCluster(clusterGuestOffset, offsetInCluster, chunk)
    const chunkEnd = offsetInCluster + chunk.length
    if (
      merged !== chunk &&
      hostCluster >= this.#file.size &&
      isAllZero(merged.subarray(0, offsetInCluster)) &&
      isAllZero(merged.subarray(chunkEnd))
    ) {
      if (chunkEnd < cs) this.#file.truncate(hostCluster + cs)
      this.#file.pwrite(chunk, hostCluster + offsetInCluster, 'data')
    } else {
      this.#file.pwrite(merged, hostCluster, 'data')
    }
    this.dataWritten = true
  }

  /** The whole cluster as a read returns it now, with chunk laid over it. */
  #mergedCluster(clusterGuestOffset: number, offsetInCluster: number, chunk: Uint8Array): Uint8Array {
    const cs = this.#g.clusterSize
    if (offsetInCluster === 0 && chunk.length === cs) return chunk
    const cluster = new Uint8Array(cs)
    this.#readPath.readSync(cluster, clusterGuestOffset)
    cluster.set(chunk, offsetInCluster)
    return cluster
  }

  /**
   * An all-zero write of [offsetInCluster, +bytes). Returns true if handled without writing
   * data: the range already reads as zeros, or zero flags/bits express it.
   */
  #tryZeroWrite(clusterGuestOffset: number, offsetInCluster: number, bytes: number, ref: EntryRef): boolean {
    const g = this.#g
    const type = clusterTypeOf(ref.hi, ref.lo, g.extendedL2, false)
    const backingShowsThrough = clusterGuestOffset + offsetInCluster < this.#backingSize()
    if (!g.extendedL2) {
      if (type === ClusterType.ZERO_PLAIN || type === ClusterType.ZERO_ALLOC) return true
      if (type === ClusterType.UNALLOCATED && !backingShowsThrough) return true
      if (this.#version < QCOW_VERSION_3 || bytes !== g.clusterSize) return false
      // A whole cluster of zeros: the zero flag, and the old allocation released.
      this.#releaseCluster(ref)
      this.#setEntry(ref, 0, OFLAG_ZERO_LO, 0, 0)
      return true
    }
    if (type === ClusterType.COMPRESSED) {
      // A compressed cluster has no subclusters: only a whole-cluster zero avoids a rewrite.
      if (bytes !== g.clusterSize) return false
      this.#releaseCluster(ref)
      this.#setEntry(ref, 0, 0, ALL_SUBCLUSTERS, 0)
      return true
    }
    const scs = g.subclusterSize
    const firstFull = Math.ceil(offsetInCluster / scs)
    const endFull = Math.floor((offsetInCluster + bytes) / scs)
    // Partly covered subclusters at either end must already read as zeros.
    const readsZero = (sc: number): boolean => {
      const t = subclusterTypeOf(ref.hi, ref.lo, ref.zeroBits, ref.allocBits, sc, true, false)
      if (t === SubclusterType.ZERO_PLAIN || t === SubclusterType.ZERO_ALLOC) return true
      const unallocated = t === SubclusterType.UNALLOCATED_PLAIN || t === SubclusterType.UNALLOCATED_ALLOC
      return unallocated && clusterGuestOffset + sc * scs >= this.#backingSize()
    }
    const headSc = Math.floor(offsetInCluster / scs)
    const tailSc = Math.floor((offsetInCluster + bytes - 1) / scs)
    if (offsetInCluster % scs !== 0 && !readsZero(headSc)) return false
    if ((offsetInCluster + bytes) % scs !== 0 && !readsZero(tailSc)) return false
    if (endFull <= firstFull) return true
    const mask = subclusterRangeMask(firstFull, endFull)
    const zeroBits = (ref.zeroBits | mask) >>> 0
    const allocBits = (ref.allocBits & ~mask) >>> 0
    if (zeroBits === ALL_SUBCLUSTERS && type === ClusterType.NORMAL) {
      // Nothing of the host cluster is used any more: let it go.
      this.#releaseCluster(ref)
      this.#setEntry(ref, 0, 0, ALL_SUBCLUSTERS, 0)
      return true
    }
    if (zeroBits !== ref.zeroBits || allocBits !== ref.allocBits) this.#setEntry(ref, ref.hi, ref.lo, zeroBits, allocBits)
    return true
  }

  /** Whether [offsetInCluster, +bytes) of a cluster without host offset reads as zeros. */
  #freshRangeReadsZero(ref: EntryRef, clusterGuestOffset: number, offsetInCluster: number, bytes: number): boolean {
    const g = this.#g
    if (!g.extendedL2) {
      const type = clusterTypeOf(ref.hi, ref.lo, false, false)
      return type === ClusterType.ZERO_PLAIN || clusterGuestOffset + offsetInCluster >= this.#backingSize()
    }
    const scs = g.subclusterSize
    const last = Math.floor((offsetInCluster + bytes - 1) / scs)
    for (let sc = Math.floor(offsetInCluster / scs); sc <= last; sc++) {
      const t = subclusterTypeOf(ref.hi, ref.lo, ref.zeroBits, ref.allocBits, sc, true, false)
      if (t === SubclusterType.ZERO_PLAIN) continue
      if (t === SubclusterType.UNALLOCATED_PLAIN && clusterGuestOffset + Math.max(sc * scs, offsetInCluster) >= this.#backingSize()) continue
      return false
    }
    return true
  }

  // ---- metadata helpers ----

  /** The L2 entry of the cluster at clusterGuestOffset, in an L2 table this image owns. */
  #entryForWrite(clusterGuestOffset: number): EntryRef {
    const g = this.#g
    const l1Index = l1IndexOf(g, clusterGuestOffset)
    if (l1Index >= this.#l1.size) {
      throw new CorruptImageError(`guest offset ${hex(clusterGuestOffset)} lies past the L1 table`)
    }
    let l2Offset = this.#l1.l2Offset(l1Index)
    if (l2Offset === 0) {
      l2Offset = this.#refcounts.allocate(1)
      const table = new Uint8Array(g.clusterSize)
      this.#file.pwrite(table, l2Offset, 'l2')
      this.#l2Cache.installTable(l2Offset, table)
      this.#l1.set(l1Index, l2Offset, true)
    } else if (!this.#l1.copied(l1Index)) {
      this.#checkMetadataCluster(l2Offset, 'L2 table')
      if (this.#refcounts.get(l2Offset / g.clusterSize) === 1) {
        this.#l1.set(l1Index, l2Offset, true)
      } else {
        // Shared with a snapshot: copy the table, point the active L1 at the copy.
        const table = new Uint8Array(g.clusterSize)
        if (this.#file.pread(table, l2Offset) !== table.length) {
          throw new CorruptImageError(`L2 table at ${hex(l2Offset)} lies past the end of the image file`)
        }
        const copy = this.#refcounts.allocate(1)
        this.#file.pwrite(table, copy, 'l2')
        this.#l2Cache.installTable(copy, table)
        this.#l1.set(l1Index, copy, true)
        this.#refcounts.decrementLater(l2Offset / g.clusterSize)
        l2Offset = copy
      }
    }
    const l2Index = l2IndexOf(g, clusterGuestOffset)
    const { slice, indexInSlice } = this.#l2Cache.slice(l2Offset, l2Index)
    const at = indexInSlice * g.l2EntrySize
    const view = slice.view
    return {
      slice,
      at,
      hi: view.getUint32(at),
      lo: view.getUint32(at + 4),
      zeroBits: g.extendedL2 ? view.getUint32(at + 8) : 0,
      allocBits: g.extendedL2 ? view.getUint32(at + 12) : 0,
    }
  }

  #setEntry(ref: EntryRef, hi: number, lo: number, zeroBits: number, allocBits: number): void {
    const view = ref.slice.view
    view.setUint32(ref.at, hi)
    view.setUint32(ref.at + 4, lo)
    if (this.#g.extendedL2) {
      view.setUint32(ref.at + 8, zeroBits)
      view.setUint32(ref.at + 12, allocBits)
    }
    ref.hi = hi
    ref.lo = lo
    ref.zeroBits = zeroBits
    ref.allocBits = allocBits
    this.#l2Cache.markDirty(ref.slice)
  }

  /** Releases (deferred) the host cluster(s) an entry references, before it is overwritten. */
  #releaseCluster(ref: EntryRef): void {
    const cs = this.#g.clusterSize
    const type = clusterTypeOf(ref.hi, ref.lo, this.#g.extendedL2, false)
    if (type === ClusterType.COMPRESSED) {
      const d = decodeCompressedDescriptor(ref.hi, ref.lo, this.#g.clusterBits)
      if (d === undefined) throw new CorruptImageError('compressed cluster descriptor has an invalid offset')
      const first = Math.floor(d.hostOffset / cs)
      const last = Math.floor((d.hostOffset + d.compressedSize - 1) / cs)
      for (let c = first; c <= last; c++) this.#refcounts.decrementLater(c)
      this.#readPath.forgetCompressed(d.hostOffset)
      return
    }
    const host = l2EntryHostOffset(ref.hi, ref.lo)
    if (host !== 0) this.#refcounts.decrementLater(host / cs)
  }

  /**
   * An extended L2 entry whose bitmap contradicts itself (a subcluster both allocated and zero,
   * or allocated without a host cluster) is corrupt: refuse to build on it (QEMU does the same).
   */
  #checkBitmap(ref: EntryRef, clusterGuestOffset: number): void {
    if (!this.#g.extendedL2 || (ref.zeroBits === 0 && ref.allocBits === 0)) return
    if (subclusterTypeOf(ref.hi, ref.lo, ref.zeroBits, ref.allocBits, 0, true, false) === SubclusterType.INVALID) {
      throw new CorruptImageError(`invalid subcluster allocation bitmap for guest offset ${hex(clusterGuestOffset)}`)
    }
  }

  #checkDataCluster(host: number): void {
    if (host % this.#g.clusterSize !== 0) throw new CorruptImageError(`data cluster offset ${hex(host)} is not cluster aligned`)
  }

  #checkMetadataCluster(offset: number, what: string): void {
    if (offset % this.#g.clusterSize !== 0) throw new CorruptImageError(`${what} offset ${hex(offset)} is not cluster aligned`)
    if (!Number.isSafeInteger(offset) || offset + this.#g.clusterSize > this.#file.size) {
      throw new CorruptImageError(`${what} at ${hex(offset)} lies past the end of the image file`)
    }
  }

  // ---- resize ----

  /**
   * Grows the L1 table (if needed) so guest offsets below newSize can be mapped. The new table
   * is written at the next metadata flush, then the header switches to it.
   */
  ensureL1Covers(newSize: number): void {
    const needed = l1EntriesFor(this.#g, newSize)
    if (needed <= this.#l1.size) return
    // Grow by at least half again, as QEMU does, so appending writes do not move it each time.
    let newEntries = Math.max(needed, Math.floor((this.#l1.size * 3) / 2) + 1)
    if (newEntries * TABLE_ENTRY_SIZE > MAX_L1_TABLE_BYTES) newEntries = needed
    if (newEntries * TABLE_ENTRY_SIZE > MAX_L1_TABLE_BYTES) {
      throw new NoSpaceError(`virtual size ${newSize} needs an L1 table larger than 32 MiB`, 'EFBIG')
    }
    const cs = this.#g.clusterSize
    const clusters = Math.ceil((newEntries * TABLE_ENTRY_SIZE) / cs)
    const oldOffset = this.#l1.offset
    const oldClusters = Math.ceil((this.#l1.size * TABLE_ENTRY_SIZE) / cs)
    const newOffset = this.#refcounts.allocate(clusters)
    this.#l1.grow(newEntries, newOffset)
    if (oldClusters > 0 && oldOffset !== 0) {
      for (let i = 0; i < oldClusters; i++) this.#refcounts.decrementLater(oldOffset / cs + i)
    }
  }

  /**
   * Drops every mapping of [start, end): whole clusters and L2 tables are released; the part of
   * a cluster before `start` is kept and the rest of that cluster is made to read as zeros, so
   * old bytes cannot reappear when the disk grows again.
   */
  discardRange(start: number, end: number): void {
    const g = this.#g
    const cs = g.clusterSize
    const firstCluster = Math.ceil(start / cs)
    if (this.router && this.#routing && Math.ceil(end / cs) > firstCluster) this.router.discard(firstCluster, Math.ceil(end / cs))
    if (start % cs !== 0) {
      // A partly kept cluster: zero its tail, if anything maps it.
      const clusterStart = start - (start % cs)
      if (this.#l1.l2Offset(l1IndexOf(g, clusterStart)) !== 0) this.writeZeroes(start, firstCluster * cs - start)
    }
    const lastCluster = Math.ceil(end / cs)
    for (let c = firstCluster; c < lastCluster; ) {
      const guest = c * cs
      const l1Index = l1IndexOf(g, guest)
      if (l1Index >= this.#l1.size) break
      const tableStart = l1Index * g.l2Entries
      const tableEnd = tableStart + g.l2Entries
      const l2Offset = this.#l1.l2Offset(l1Index)
      if (l2Offset === 0) {
        c = tableEnd
        continue
      }
      if (c === tableStart && tableEnd <= lastCluster && this.#l1.copied(l1Index)) {
        // The whole table goes: release its clusters and the table itself.
        this.#releaseTable(l1Index, l2Offset)
        c = tableEnd
        continue
      }
      const ref = this.#entryForWrite(guest)
      if (ref.hi !== 0 || ref.lo !== 0 || ref.zeroBits !== 0 || ref.allocBits !== 0) {
        this.#releaseCluster(ref)
        this.#setEntry(ref, 0, 0, 0, 0)
      }
      c++
    }
  }

  #releaseTable(l1Index: number, l2Offset: number): void {
    const g = this.#g
    for (let i = 0; i < g.l2Entries; i++) {
      const { slice, indexInSlice } = this.#l2Cache.slice(l2Offset, i)
      const at = indexInSlice * g.l2EntrySize
      const ref: EntryRef = {
        slice,
        at,
        hi: slice.view.getUint32(at),
        lo: slice.view.getUint32(at + 4),
        zeroBits: 0,
        allocBits: 0,
      }
      if (ref.hi !== 0 || ref.lo !== 0) this.#releaseCluster(ref)
    }
    this.#l2Cache.forgetTable(l2Offset, g.clusterSize)
    this.#l1.set(l1Index, 0, false)
    this.#refcounts.decrementLater(l2Offset / g.clusterSize)
  }
}

/** A zeroed buffer to compare against; grown on demand. */
let zeroReference = new Uint8Array(64 * 1024)

/** True if every byte is zero (a native memcmp against a zeroed buffer). */
export function isAllZero(buf: Uint8Array): boolean {
  if (zeroReference.length < buf.length) zeroReference = new Uint8Array(buf.length)
  return Buffer.compare(buf, zeroReference.subarray(0, buf.length)) === 0
}


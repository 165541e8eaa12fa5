/*
 * Metadata write ordering: the one place it is decided. Every metadata flush goes through
 * flushMetadata(), in this order, each step durable (fdatasync) before the next one that depends
 * on it. Invariants that hold after a crash at any point:
 *
 *  O1  Guest data and COW copies are durable before the L2 entries that map them.
 *  O2  Refcount increments are durable before any L2 or L1 entry that references the cluster.
 *  O3  A new refcount block is durable before the refcount table entry that points to it; a
 *      moved refcount table before the header switch to it.
 *  O4  A new or copied L2 table is durable before the L1 entry that points to it; a moved L1
 *      table before the header switch to it.
 *  O5  Refcount decrements are applied only after the metadata that dropped the reference is
 *      durable, and a cluster freed that way is reused only after that: a crash leaves leaks
 *      (refcount > references), never a reference to a freed or reused cluster.
 *  O6  The header (size, feature bits) is written last.
 *
 * Data writes into clusters that are already allocated and COPIED go straight to the file; new
 * clusters are written before their mapping exists on disk, so until the flush they are
 * unreachable (a crash makes them leaks).
 */
import { HeaderOffset } from '../format/constants.js'
import { type FeatureBits } from '../format/header.js'
import { writeU64 } from '../format/int64.js'
import type { BlockFile } from '../io/block-file.js'
import type { L1Table } from '../meta/l1-table.js'
import type { L2SliceCache } from '../meta/l2-cache.js'
import type { Refcounts } from '../meta/refcounts.js'

/** Header fields that can change while an image is open read-write. */
export interface MutableHeader {
  virtualSize: number
  l1Size: number
  l1TableOffset: number
  refcountTableOffset: number
  refcountTableClusters: number
  incompatibleFeatures: FeatureBits
  autoclearFeatures: FeatureBits
}

export interface MetadataState {
  file: BlockFile
  /** Where guest data lives (the image itself, or an external data file). */
  dataFile: BlockFile
  refcounts: Refcounts
  l2Cache: L2SliceCache
  l1: L1Table
  /** Header values as they are on disk. */
  onDisk: MutableHeader
  /** Header values as they should become. */
  wanted: MutableHeader
}

/** Writes one header field group at its offset. */
export function writeHeaderField(file: BlockFile, field: keyof MutableHeader, header: MutableHeader): void {
  switch (field) {
    case 'virtualSize': {
      const buf = new Uint8Array(8)
      writeU64(new DataView(buf.buffer), 0, header.virtualSize)
      file.pwrite(buf, HeaderOffset.size, 'header')
      return
    }
    case 'l1Size':
    case 'l1TableOffset': {
      // l1_size (u32) and l1_table_offset (u64) are adjacent: one write switches both.
      const buf = new Uint8Array(12)
      const view = new DataView(buf.buffer)
      view.setUint32(0, header.l1Size)
      writeU64(view, 4, header.l1TableOffset)
      file.pwrite(buf, HeaderOffset.l1Size, 'header')
      return
    }
    case 'refcountTableOffset':
    case 'refcountTableClusters': {
      // refcount_table_offset (u64) and refcount_table_clusters (u32) are adjacent.
      const buf = new Uint8Array(12)
      const view = new DataView(buf.buffer)
      writeU64(view, 0, header.refcountTableOffset)
      view.setUint32(8, header.refcountTableClusters)
      file.pwrite(buf, HeaderOffset.refcountTableOffset, 'header')
      return
    }
    case 'incompatibleFeatures':
    case 'autoclearFeatures': {
      const bits = header[field]
      const buf = new Uint8Array(8)
      const view = new DataView(buf.buffer)
      view.setUint32(0, bits.hi)
      view.setUint32(4, bits.lo)
      file.pwrite(buf, field === 'incompatibleFeatures' ? HeaderOffset.incompatibleFeatures : HeaderOffset.autoclearFeatures, 'header')
      return
    }
  }
}

function sameBits(a: FeatureBits, b: FeatureBits): boolean {
  return a.hi === b.hi && a.lo === b.lo
}

/** True if anything would be written by flushMetadata. */
export function metadataDirty(s: MetadataState): boolean {
  return (
    s.refcounts.hasDirty() ||
    s.refcounts.hasDeferred() ||
    s.l2Cache.dirtyCount > 0 ||
    s.l1.hasDirty() ||
    s.onDisk.virtualSize !== s.wanted.virtualSize ||
    !sameBits(s.onDisk.incompatibleFeatures, s.wanted.incompatibleFeatures) ||
    !sameBits(s.onDisk.autoclearFeatures, s.wanted.autoclearFeatures)
  )
}

/**
 * After a table's entries were written: sync; if the table moved, switch the header to its new
 * place (the adjacent fields in `fields` go in one write) and sync again.
 */
function switchTableWhenMoved(
  s: MetadataState,
  written: 'none' | 'entries' | 'moved',
  fields: Pick<MutableHeader, 'refcountTableOffset' | 'refcountTableClusters'> | Pick<MutableHeader, 'l1Size' | 'l1TableOffset'>,
): void {
  if (written === 'none') return
  s.file.sync()
  if (written !== 'moved') return
  Object.assign(s.wanted, fields)
  writeHeaderField(s.file, Object.keys(fields)[0] as keyof MutableHeader, s.wanted)
  s.file.sync()
  Object.assign(s.onDisk, fields)
}

/**
 * Makes everything written so far durable, in the order above. `dataWritten` says whether
 * guest data may be waiting in the page cache (then the first sync is needed even with no
 * metadata change).
 */
export function flushMetadata(s: MetadataState, dataWritten: boolean): void {
  const { file } = s
  // O1 + O2: data, COW copies and refcount blocks (increments) together.
  const wroteBlocks = s.refcounts.writeBlocks()
  if (s.dataFile !== file && dataWritten) s.dataFile.sync()
  if (wroteBlocks || dataWritten) file.sync()
  // O3: refcount table entries after the blocks; a moved table, then the header switch.
  switchTableWhenMoved(s, s.refcounts.writeTable(), {
    refcountTableOffset: s.refcounts.tableOffset,
    refcountTableClusters: s.refcounts.tableClusters,
  })
  // O1, O2: L2 entries after the data and refcounts they use.
  if (s.l2Cache.writeDirty()) file.sync()
  // O4: L1 entries after the L2 tables; a moved L1 table, then the header switch.
  switchTableWhenMoved(s, s.l1.writeDirty(file), { l1Size: s.l1.size, l1TableOffset: s.l1.offset })
  // O6: the rest of the header.
  let headerWritten = false
  if (s.onDisk.virtualSize !== s.wanted.virtualSize) {
    writeHeaderField(file, 'virtualSize', s.wanted)
    s.onDisk.virtualSize = s.wanted.virtualSize
    headerWritten = true
  }
  for (const field of ['incompatibleFeatures', 'autoclearFeatures'] as const) {
    if (!sameBits(s.onDisk[field], s.wanted[field])) {
      writeHeaderField(file, field, s.wanted)
      s.onDisk[field] = { ...s.wanted[field] }
      headerWritten = true
    }
  }
  if (headerWritten) file.sync()
  // O5: decrements, now that nothing durable references the clusters they free.
  if (s.refcounts.hasDeferred()) {
    s.refcounts.applyDeferred()
    if (s.refcounts.writeBlocks()) file.sync()
  }
}

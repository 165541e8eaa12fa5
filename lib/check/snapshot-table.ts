/*
 * Rewriting the snapshot table, for the repair of version 3 snapshot entries with less than the
 * 16 bytes of extra data (vm_state_size_large, disk_size) every v3 entry needs. As QEMU does on
 * `check -r all`, the whole table is written anew with complete entries: the missing
 * vm_state_size_large is the entry's 32-bit vm_state_size, the missing disk_size the image's
 * size, and icount (QEMU 5.0) is "not recorded" when missing.
 *
 * Crash safety, on an image whose refcounts were just made right: the new table goes into free
 * clusters that get refcount 1 first (durable), then the table (durable), then one header write
 * switches nb_snapshots and snapshots_offset together, then the old table's clusters are freed.
 * A crash leaves either table in use and at worst leaked clusters.
 */
import { HeaderOffset, SECTOR_SIZE, SNAPSHOT_ENTRY_ALIGNMENT, SNAPSHOT_ENTRY_FIXED_SIZE } from '../format/constants.js'
import { alignUp, writeU64 } from '../format/int64.js'
import type { BlockFile } from '../io/block-file.js'
import { CheckFailedError, readImageLayout, readPadded } from './layout.js'
import { OnDiskRefcounts } from './on-disk-refcounts.js'

/** Extra data QEMU writes: vm_state_size_large, disk_size, icount. */
const FULL_EXTRA_DATA_BYTES = 24

/** Clusters searched for a free run, past the last one in use. */
const SEARCH_SLACK_CLUSTERS = 1024

/** Writes a complete copy of the snapshot table and switches the header to it. */
export function rewriteSnapshotTable(file: BlockFile, imagePath: string): void {
  const layout = readImageLayout(file, imagePath)
  const { header, geometry } = layout
  const cs = geometry.clusterSize
  const oldTable = readPadded(file, header.snapshotsOffset, layout.snapshotTableBytes)
  const oldView = new DataView(oldTable.buffer)
  const diskSize = Math.floor(header.virtualSize / SECTOR_SIZE) * SECTOR_SIZE

  // The new entries.
  const pieces: Uint8Array[] = []
  let newBytes = 0
  let at = 0
  for (let i = 0; i < header.snapshotCount; i++) {
    at = alignUp(at, SNAPSHOT_ENTRY_ALIGNMENT)
    const idSize = oldView.getUint16(at + 12)
    const nameSize = oldView.getUint16(at + 14)
    const extraSize = oldView.getUint32(at + 36)
    const newExtraSize = Math.max(FULL_EXTRA_DATA_BYTES, extraSize)
    const entry = new Uint8Array(SNAPSHOT_ENTRY_FIXED_SIZE + newExtraSize + idSize + nameSize)
    const view = new DataView(entry.buffer)
    entry.set(oldTable.subarray(at, at + SNAPSHOT_ENTRY_FIXED_SIZE))
    view.setUint32(36, newExtraSize)
    entry.set(oldTable.subarray(at + SNAPSHOT_ENTRY_FIXED_SIZE, at + SNAPSHOT_ENTRY_FIXED_SIZE + extraSize), SNAPSHOT_ENTRY_FIXED_SIZE)
    if (extraSize < 8) writeU64(view, SNAPSHOT_ENTRY_FIXED_SIZE, oldView.getUint32(at + 32))
    if (extraSize < 16) writeU64(view, SNAPSHOT_ENTRY_FIXED_SIZE + 8, diskSize)
    if (extraSize < 24) {
      view.setUint32(SNAPSHOT_ENTRY_FIXED_SIZE + 16, 0xffffffff)
      view.setUint32(SNAPSHOT_ENTRY_FIXED_SIZE + 20, 0xffffffff)
    }
    const namesAt = at + SNAPSHOT_ENTRY_FIXED_SIZE + extraSize
    entry.set(oldTable.subarray(namesAt, namesAt + idSize + nameSize), SNAPSHOT_ENTRY_FIXED_SIZE + newExtraSize)
    newBytes = alignUp(newBytes, SNAPSHOT_ENTRY_ALIGNMENT)
    pieces.push(entry)
    newBytes += entry.length
    at = namesAt + idSize + nameSize
  }
  const table = new Uint8Array(newBytes)
  let put = 0
  for (const entry of pieces) {
    put = alignUp(put, SNAPSHOT_ENTRY_ALIGNMENT)
    table.set(entry, put)
    put += entry.length
  }

  // Free clusters whose refcount block exists, for the whole table.
  const refcounts = new OnDiskRefcounts(file, geometry, layout.refcountTable, header.refcountOrder)
  const clusters = Math.ceil(newBytes / cs)
  const limit = Math.ceil(file.size / cs) + SEARCH_SLACK_CLUSTERS
  let first = 1
  let run = 0
  for (let cluster = 1; cluster < limit && run < clusters; cluster++) {
    const refcount = refcounts.get(cluster)
    const blockOffset = refcounts.blockOffset(Math.floor(cluster / refcounts.entriesPerBlock))
    const usable = refcount === 0 && blockOffset !== 0 && blockOffset % cs === 0 && blockOffset < file.size
    if (!usable) {
      run = 0
      continue
    }
    if (run === 0) first = cluster
    run++
  }
  if (run < clusters) throw new CheckFailedError(`'${imagePath}': no free clusters under the refcount blocks for a new snapshot table`)
  for (let i = 0; i < clusters; i++) refcounts.set(first + i, 1)
  refcounts.flush()
  file.sync()
  file.pwrite(table, first * cs, 'header')
  file.sync()
  // nb_snapshots (u32) and snapshots_offset (u64) are adjacent: one write switches both.
  const pointer = new Uint8Array(12)
  const pointerView = new DataView(pointer.buffer)
  pointerView.setUint32(0, header.snapshotCount)
  writeU64(pointerView, 4, first * cs)
  file.pwrite(pointer, HeaderOffset.snapshotCount, 'header')
  file.sync()
  // The old table's clusters are free now.
  if (layout.snapshotTableBytes > 0) {
    const oldFirst = Math.floor(header.snapshotsOffset / cs)
    const oldLast = Math.floor((header.snapshotsOffset + layout.snapshotTableBytes - 1) / cs)
    for (let cluster = oldFirst; cluster <= oldLast; cluster++) {
      const refcount = refcounts.get(cluster)
      if (refcount !== undefined && refcount > 0) refcounts.set(cluster, refcount - 1)
    }
    refcounts.flush()
    file.sync()
  }
}

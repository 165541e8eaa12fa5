/*
 * The internal snapshot table (spec: "Snapshots"): a run of variable-length entries at
 * snapshots_offset, each padded to 8 bytes.
 */
import { CorruptImageError } from '../errors.js'
import {
  MAX_SNAPSHOT_EXTRA_DATA,
  SNAPSHOT_ENTRY_ALIGNMENT,
  SNAPSHOT_ENTRY_FIXED_SIZE,
} from './constants.js'
import { alignUp, readU64 } from './int64.js'

export interface SnapshotEntry {
  /** l1_table_offset of the snapshot's L1 table */
  l1TableOffset: number
  /** l1_size: entries in the snapshot's L1 table */
  l1Size: number
  id: string
  name: string
  dateSeconds: number
  dateNanoseconds: number
  vmClockNanoseconds: number
  /** vm_state_size (or vm_state_size_large when present) */
  vmStateSize: number
  /** disk_size from extra data (v3); undefined when absent (use the image's size). */
  diskSize?: number
  /** icount from extra data, when present */
  icount?: number
}

const textDecoder = new TextDecoder()

/**
 * Parses `count` snapshot entries from `table` (the bytes at snapshots_offset, at least as long
 * as the table). Throws CorruptImageError if an entry runs past the buffer.
 */
export function parseSnapshotTable(table: Uint8Array, count: number): SnapshotEntry[] {
  return parseSnapshotTableWithSize(table, count).entries
}

/** parseSnapshotTable, plus the table's length in bytes (its entries, each padded to 8). */
export function parseSnapshotTableWithSize(table: Uint8Array, count: number): { entries: SnapshotEntry[]; tableBytes: number } {
  const view = new DataView(table.buffer, table.byteOffset, table.byteLength)
  const entries: SnapshotEntry[] = []
  let at = 0
  const need = (bytes: number): void => {
    if (at + bytes > table.length) throw new CorruptImageError('snapshot table runs past the end of the file')
  }
  for (let i = 0; i < count; i++) {
    need(SNAPSHOT_ENTRY_FIXED_SIZE)
    let l1TableOffset: number
    let vmClockNanoseconds: number
    try {
      l1TableOffset = readU64(view, at, 'snapshot l1_table_offset')
      vmClockNanoseconds = readU64(view, at + 24, 'snapshot vm_clock_nsec')
    } catch {
      throw new CorruptImageError(`snapshot ${i} has an out-of-range field`)
    }
    const l1Size = view.getUint32(at + 8)
    const idSize = view.getUint16(at + 12)
    const nameSize = view.getUint16(at + 14)
    const dateSeconds = view.getUint32(at + 16)
    const dateNanoseconds = view.getUint32(at + 20)
    let vmStateSize = view.getUint32(at + 32)
    const extraDataSize = view.getUint32(at + 36)
    if (extraDataSize > MAX_SNAPSHOT_EXTRA_DATA) {
      throw new CorruptImageError(`snapshot ${i} has too much extra data (${extraDataSize} bytes)`)
    }
    at += SNAPSHOT_ENTRY_FIXED_SIZE
    need(extraDataSize + idSize + nameSize)
    let diskSize: number | undefined
    let icount: number | undefined
    try {
      if (extraDataSize >= 8) vmStateSize = readU64(view, at, 'vm_state_size_large')
      if (extraDataSize >= 16) diskSize = readU64(view, at + 8, 'snapshot disk_size')
      if (extraDataSize >= 24) {
        // icount is -1 (all ones) when not recorded.
        const hi = view.getUint32(at + 16)
        const lo = view.getUint32(at + 20)
        icount = hi === 0xffffffff && lo === 0xffffffff ? undefined : readU64(view, at + 16, 'icount')
      }
    } catch {
      throw new CorruptImageError(`snapshot ${i} has an out-of-range extra data field`)
    }
    at += extraDataSize
    const id = textDecoder.decode(table.subarray(at, at + idSize))
    at += idSize
    const name = textDecoder.decode(table.subarray(at, at + nameSize))
    at += nameSize
    at = alignUp(at, SNAPSHOT_ENTRY_ALIGNMENT)
    const entry: SnapshotEntry = { l1TableOffset, l1Size, id, name, dateSeconds, dateNanoseconds, vmClockNanoseconds, vmStateSize }
    if (diskSize !== undefined) entry.diskSize = diskSize
    if (icount !== undefined) entry.icount = icount
    entries.push(entry)
  }
  return { entries, tableBytes: at }
}

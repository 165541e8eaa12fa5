/*
 * What the checker reads of an image before it counts references: the header and its
 * extensions, the refcount table, the active L1 table's place, the snapshot table and the
 * persistent bitmap directory.
 *
 * Design notes:
 *  - Reading is lenient where qemu-img check is: bytes past the end of the file read as zeros
 *    (QEMU's block layer pads short reads), and damage that the check counts (tables past the
 *    end, misaligned snapshot L1 tables) is left for the checker to report. What QEMU refuses
 *    to open, or where its check gives up, is refused here with CheckFailedError (exit 1): a bad
 *    header, an unknown incompatible feature, a refcount or active L1 table that is misaligned
 *    or too large, a snapshot table that cannot be read.
 *  - Every buffer is bounded: the header limits (32 MiB L1, 8 MiB refcount table, 64 MiB
 *    snapshot table, 64 KiB snapshots) hold before anything is allocated.
 */
import { Qcow2Error } from '../errors.js'
import {
  AUTOCLEAR_BITMAPS_BIT,
  MAX_L1_TABLE_BYTES,
  MAX_REFCOUNT_TABLE_BYTES,
  MAX_SNAPSHOTS,
  MAX_SNAPSHOT_EXTRA_DATA,
  MAX_SNAPSHOT_TABLE_BYTES,
  SNAPSHOT_ENTRY_ALIGNMENT,
  SNAPSHOT_ENTRY_FIXED_SIZE,
  SNAPSHOT_EXTRA_DATA_MIN_V3,
  TABLE_ENTRY_SIZE,
} from '../format/constants.js'
import { type Geometry, l1EntriesFor, makeGeometry } from '../format/geometry.js'
import {
  HEADER_PROBE_SIZE,
  type HeaderExtensions,
  type Qcow2Header,
  checkIncompatibleFeatures,
  hasFeatureBit,
  headerFlags,
  parseHeader,
  parseHeaderExtensions,
} from '../format/header.js'
import { alignUp, hex } from '../format/int64.js'
import type { BlockFile } from '../io/block-file.js'

/** The check could not be done (or not completed): qemu-img's "Check failed", exit code 1. */
export class CheckFailedError extends Qcow2Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super('CORRUPT_IMAGE', 'EIO', message, options)
  }
}

/** One internal snapshot as the checker needs it. */
export interface CheckedSnapshot {
  id: string
  name: string
  l1TableOffset: number
  l1Size: number
  extraDataSize: number
}

/** One persistent dirty bitmap's table. */
export interface CheckedBitmap {
  name: string
  tableOffset: number
  /** Entries in the bitmap table (8 bytes each). */
  tableEntries: number
}

export interface ImageLayout {
  header: Qcow2Header
  extensions: HeaderExtensions
  geometry: Geometry
  fileSize: number
  externalDataFile: boolean
  /** The refcount table, zero-filled past the end of the file. */
  refcountTable: Uint8Array
  snapshots: CheckedSnapshot[]
  /**
   * Bytes of the snapshot table as QEMU counts them: from snapshots_offset to the end of the
   * last entry's name (entries start 8-byte aligned; the end is not rounded up).
   */
  snapshotTableBytes: number
  /** Persistent bitmaps; only when the autoclear bit says their data is consistent. */
  bitmaps: { directoryOffset: number; directorySize: number; list: CheckedBitmap[] } | undefined
}

/** Reads `length` bytes at hostOffset; bytes past the end of the file are zeros. */
export function readPadded(file: BlockFile, hostOffset: number, length: number): Uint8Array {
  const buf = new Uint8Array(length)
  if (length > 0 && hostOffset < file.size) file.pread(buf.subarray(0, Math.min(length, file.size - hostOffset)), hostOffset)
  return buf
}

function failed(imagePath: string, message: string): CheckFailedError {
  return new CheckFailedError(`'${imagePath}': ${message}`)
}

/** Header and extensions; the errors of the engine's own parser name the problem. */
function readHeader(file: BlockFile, imagePath: string): { header: Qcow2Header; extensions: HeaderExtensions } {
  try {
    const header = parseHeader(readPadded(file, 0, Math.min(HEADER_PROBE_SIZE, file.size)))
    const headerCluster = readPadded(file, 0, Math.min(2 ** header.clusterBits, file.size))
    const extensions = parseHeaderExtensions(header, headerCluster)
    checkIncompatibleFeatures(header, extensions)
    return { header, extensions }
  } catch (err) {
    if (err instanceof Qcow2Error) throw failed(imagePath, err.message)
    throw err
  }
}

/**
 * The snapshot table, read the way qemu-img check reads it: entries start 8-byte aligned, a
 * snapshot with more than 1 KiB of extra data or a table past 64 MiB stops the check.
 */
function readSnapshots(file: BlockFile, imagePath: string, header: Qcow2Header): { list: CheckedSnapshot[]; tableBytes: number } {
  const count = header.snapshotCount
  if (count === 0) return { list: [], tableBytes: 0 }
  const clusterSize = 2 ** header.clusterBits
  if (count > MAX_SNAPSHOTS) throw failed(imagePath, `snapshot table too large (${count} snapshots)`)
  if (header.snapshotsOffset % clusterSize !== 0) {
    throw failed(imagePath, `snapshot table offset ${hex(header.snapshotsOffset)} invalid`)
  }
  // The table is read in growing pieces: its length is known only entry by entry.
  let table = readPadded(file, header.snapshotsOffset, Math.min(MAX_SNAPSHOT_TABLE_BYTES, Math.max(4096, count * 64)))
  const ensure = (end: number): DataView => {
    if (end > MAX_SNAPSHOT_TABLE_BYTES) throw failed(imagePath, 'snapshot table is too big')
    if (end > table.length) table = readPadded(file, header.snapshotsOffset, Math.min(MAX_SNAPSHOT_TABLE_BYTES, Math.max(end, table.length * 2)))
    return new DataView(table.buffer)
  }
  const decoder = new TextDecoder()
  const list: CheckedSnapshot[] = []
  let at = 0
  for (let i = 0; i < count; i++) {
    at = alignUp(at, SNAPSHOT_ENTRY_ALIGNMENT)
    let view = ensure(at + SNAPSHOT_ENTRY_FIXED_SIZE)
    const l1Hi = view.getUint32(at)
    const l1TableOffset = l1Hi >= 0x200000 ? Number.MAX_SAFE_INTEGER : l1Hi * 2 ** 32 + view.getUint32(at + 4)
    const l1Size = view.getUint32(at + 8)
    const idSize = view.getUint16(at + 12)
    const nameSize = view.getUint16(at + 14)
    const extraDataSize = view.getUint32(at + 36)
    if (extraDataSize > MAX_SNAPSHOT_EXTRA_DATA) {
      throw failed(imagePath, `too much extra metadata in snapshot table entry ${i} (repair with 'qemu-img check -r all')`)
    }
    at += SNAPSHOT_ENTRY_FIXED_SIZE + extraDataSize
    view = ensure(at + idSize + nameSize)
    const id = decoder.decode(table.subarray(at, at + idSize))
    const name = decoder.decode(table.subarray(at + idSize, at + idSize + nameSize))
    at += idSize + nameSize
    void view
    list.push({ id, name, l1TableOffset, l1Size, extraDataSize })
  }
  return { list, tableBytes: at }
}

/** Bitmap directory entry: fixed part before extra data and name. */
const BITMAP_DIRECTORY_ENTRY_FIXED_SIZE = 24
/** QEMU's limits on the bitmaps extension (QCOW2_MAX_BITMAPS, QCOW2_MAX_BITMAP_DIRECTORY_SIZE). */
const MAX_BITMAPS = 65535
const MAX_BITMAP_DIRECTORY_BYTES = 1024 * MAX_BITMAPS
/** A bitmap table is at most 64 MiB (BME_MAX_TABLE_SIZE entries). */
const MAX_BITMAP_TABLE_ENTRIES = 0x8000000

/**
 * The persistent bitmap directory. QEMU ignores the bitmaps of an image whose autoclear bit is
 * clear (a program without bitmap support wrote it), so does the check.
 */
function readBitmaps(file: BlockFile, imagePath: string, header: Qcow2Header, extensions: HeaderExtensions): ImageLayout['bitmaps'] {
  const ext = extensions.bitmaps
  if (ext === undefined || !hasFeatureBit(header.autoclearFeatures, AUTOCLEAR_BITMAPS_BIT)) return undefined
  const clusterSize = 2 ** header.clusterBits
  if (ext.bitmapCount === 0) throw failed(imagePath, 'found bitmaps extension with zero bitmaps')
  if (ext.bitmapCount > MAX_BITMAPS) throw failed(imagePath, `too many persistent bitmaps (${ext.bitmapCount})`)
  if (ext.directorySize === 0 || ext.directorySize > MAX_BITMAP_DIRECTORY_BYTES) {
    throw failed(imagePath, `bitmaps directory size ${ext.directorySize} is invalid`)
  }
  if (ext.directoryOffset % clusterSize !== 0) throw failed(imagePath, `bitmaps directory offset ${hex(ext.directoryOffset)} invalid`)
  const dir = readPadded(file, ext.directoryOffset, ext.directorySize)
  const view = new DataView(dir.buffer)
  const decoder = new TextDecoder()
  const list: CheckedBitmap[] = []
  let at = 0
  while (at < dir.length) {
    if (at + BITMAP_DIRECTORY_ENTRY_FIXED_SIZE > dir.length) throw failed(imagePath, 'bitmaps directory is truncated')
    const tableHi = view.getUint32(at)
    const tableOffset = tableHi >= 0x200000 ? Number.MAX_SAFE_INTEGER : tableHi * 2 ** 32 + view.getUint32(at + 4)
    const tableEntries = view.getUint32(at + 8)
    const nameSize = view.getUint16(at + 18)
    const extraDataSize = view.getUint32(at + 20)
    const end = at + BITMAP_DIRECTORY_ENTRY_FIXED_SIZE + extraDataSize + nameSize
    if (end > dir.length) throw failed(imagePath, 'bitmaps directory is truncated')
    if (tableEntries > MAX_BITMAP_TABLE_ENTRIES || tableOffset % clusterSize !== 0) {
      throw failed(imagePath, `bitmap directory entry ${list.length} is invalid`)
    }
    const nameStart = at + BITMAP_DIRECTORY_ENTRY_FIXED_SIZE + extraDataSize
    list.push({ name: decoder.decode(dir.subarray(nameStart, nameStart + nameSize)), tableOffset, tableEntries })
    at = alignUp(end, 8)
  }
  if (list.length !== ext.bitmapCount) {
    throw failed(imagePath, `bitmaps directory holds ${list.length} bitmaps, the header says ${ext.bitmapCount}`)
  }
  return { directoryOffset: ext.directoryOffset, directorySize: ext.directorySize, list }
}

/** Reads and validates everything the checker needs before counting. */
export function readImageLayout(file: BlockFile, imagePath: string): ImageLayout {
  const { header, extensions } = readHeader(file, imagePath)
  const geometry = makeGeometry(header.clusterBits, headerFlags.extendedL2(header))
  const clusterSize = geometry.clusterSize
  if (extensions.cryptoHeader !== undefined) throw failed(imagePath, 'encryption header extension in an image that is not encrypted')
  const refcountTableBytes = header.refcountTableClusters * clusterSize
  if (refcountTableBytes > MAX_REFCOUNT_TABLE_BYTES) throw failed(imagePath, `refcount table too large (${header.refcountTableClusters} clusters)`)
  if (header.refcountTableOffset % clusterSize !== 0) throw failed(imagePath, `refcount table offset ${hex(header.refcountTableOffset)} invalid`)
  if (header.l1Size * TABLE_ENTRY_SIZE > MAX_L1_TABLE_BYTES) throw failed(imagePath, `active L1 table too large (${header.l1Size} entries)`)
  if (header.l1Size < l1EntriesFor(geometry, header.virtualSize)) throw failed(imagePath, `L1 table is too small (${header.l1Size} entries)`)
  if (header.l1Size > 0 && header.l1TableOffset % clusterSize !== 0) throw failed(imagePath, `L1 table offset ${hex(header.l1TableOffset)} invalid`)
  const snapshots = readSnapshots(file, imagePath, header)
  return {
    header,
    extensions,
    geometry,
    fileSize: file.size,
    externalDataFile: headerFlags.externalDataFile(header),
    refcountTable: readPadded(file, header.refcountTableOffset, refcountTableBytes),
    snapshots: snapshots.list,
    snapshotTableBytes: snapshots.tableBytes,
    bitmaps: readBitmaps(file, imagePath, header, extensions),
  }
}

/** v3 snapshot entries need at least 16 bytes of extra data (vm_state_size_large, disk_size). */
export function snapshotEntryIncomplete(header: Qcow2Header, snapshot: CheckedSnapshot): boolean {
  return header.version >= 3 && snapshot.extraDataSize < SNAPSHOT_EXTRA_DATA_MIN_V3
}

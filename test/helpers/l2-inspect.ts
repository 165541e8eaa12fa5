/*
 * Reading and poking L2 entries straight from a qcow2 file, independently of the engine (its
 * own header and entry decoding, from the spec), for tests that check what reached the disk:
 *
 *   readEntry(image, guestCluster)    the 8-byte descriptor and, with extended L2, the 64-bit
 *                                     subcluster bitmap (alloc bits 0-31, zero bits 32-63)
 *   entryFileOffset(image, cluster)   where that entry lives in the file (to poke it)
 *   subclusterKind(entry, sc)         how a subcluster reads, as the spec's type table says
 *   parseBits('0-9,16') / formatBits  the subcluster-list notation of qemu-iotests 271
 *
 * The header is re-read on every call: tests poke and reopen images between calls.
 */
import * as fs from 'node:fs'

const QCOW_MAGIC = 0x514649fb
/** Bits 9-55 of a standard descriptor (host cluster offset). */
const OFFSET_MASK = 0x00ff_ffff_ffff_fe00n
const COMPRESSED_FLAG = 1n << 62n
const COPIED_FLAG = 1n << 63n
const EXTENDED_L2_FEATURE = 1n << 4n
const CORRUPT_FEATURE = 1n << 1n

export interface ImageLayout {
  version: number
  clusterBits: number
  clusterSize: number
  virtualSize: number
  l1TableOffset: number
  l1Size: number
  incompatibleFeatures: bigint
  extendedL2: boolean
  /** Bytes per L2 entry: 16 with extended L2, else 8. */
  l2EntryBytes: number
  /** Bytes of guest data per subcluster (the cluster size without extended L2). */
  subclusterSize: number
}

function readAt(fd: number, offset: number, length: number): Buffer {
  const buf = Buffer.alloc(length)
  const n = fs.readSync(fd, buf, 0, length, offset)
  if (n !== length) throw new Error(`short read: ${n} of ${length} bytes at 0x${offset.toString(16)}`)
  return buf
}

function withFile<T>(imagePath: string, fn: (fd: number) => T): T {
  const fd = fs.openSync(imagePath, 'r')
  try {
    return fn(fd)
  } finally {
    fs.closeSync(fd)
  }
}

function layoutOf(fd: number): ImageLayout {
  const h = readAt(fd, 0, 104)
  if (h.readUInt32BE(0) !== QCOW_MAGIC) throw new Error('not a qcow2 file (bad magic)')
  const version = h.readUInt32BE(4)
  const clusterBits = h.readUInt32BE(20)
  const incompatibleFeatures = version >= 3 ? h.readBigUInt64BE(72) : 0n
  const extendedL2 = (incompatibleFeatures & EXTENDED_L2_FEATURE) !== 0n
  const clusterSize = 2 ** clusterBits
  return {
    version,
    clusterBits,
    clusterSize,
    virtualSize: Number(h.readBigUInt64BE(24)),
    l1Size: h.readUInt32BE(36),
    l1TableOffset: Number(h.readBigUInt64BE(40)),
    incompatibleFeatures,
    extendedL2,
    l2EntryBytes: extendedL2 ? 16 : 8,
    subclusterSize: extendedL2 ? clusterSize / 32 : clusterSize,
  }
}

export function readLayout(imagePath: string): ImageLayout {
  return withFile(imagePath, layoutOf)
}

/** True if the header's incompatible feature "corrupt" bit is set. */
export function isMarkedCorrupt(imagePath: string): boolean {
  return (readLayout(imagePath).incompatibleFeatures & CORRUPT_FEATURE) !== 0n
}

/** File offset of the L2 table that maps guestCluster, or 0 if the active L1 has none. */
function l2TableOffset(fd: number, layout: ImageLayout, guestCluster: number): number {
  const entriesPerTable = layout.clusterSize / layout.l2EntryBytes
  const l1Index = Math.floor(guestCluster / entriesPerTable)
  if (l1Index >= layout.l1Size) throw new Error(`guest cluster ${guestCluster} lies past the L1 table`)
  const l1Entry = readAt(fd, layout.l1TableOffset + 8 * l1Index, 8).readBigUInt64BE(0)
  return Number(l1Entry & OFFSET_MASK)
}

/** File offset of guestCluster's L2 entry, or undefined if no L2 table maps it yet. */
export function entryFileOffset(imagePath: string, guestCluster: number): number | undefined {
  return withFile(imagePath, (fd) => {
    const layout = layoutOf(fd)
    const table = l2TableOffset(fd, layout, guestCluster)
    if (table === 0) return undefined
    const entriesPerTable = layout.clusterSize / layout.l2EntryBytes
    return table + (guestCluster % entriesPerTable) * layout.l2EntryBytes
  })
}

export interface L2EntryOnDisk {
  /** Where the entry is in the file (undefined: no L2 table, the entry reads as all zero). */
  fileOffset: number | undefined
  /** The first 64 bits (standard or compressed descriptor with the flag bits). */
  descriptor: bigint
  /** The subcluster bitmap (0 without extended L2). */
  bitmap: bigint
  compressed: boolean
  copied: boolean
  /** Host cluster offset of a standard descriptor (0 for compressed entries). */
  hostOffset: number
  /** Subclusters with the allocation bit (bitmap bits 0-31). */
  alloc: number[]
  /** Subclusters with the "reads as zeros" bit (bitmap bits 32-63). */
  zero: number[]
}

function bitList(word: bigint): number[] {
  const out: number[] = []
  for (let i = 0; i < 32; i++) if (((word >> BigInt(i)) & 1n) !== 0n) out.push(i)
  return out
}

function decodeEntry(fileOffset: number | undefined, descriptor: bigint, bitmap: bigint): L2EntryOnDisk {
  const compressed = (descriptor & COMPRESSED_FLAG) !== 0n
  return {
    fileOffset,
    descriptor,
    bitmap,
    compressed,
    copied: (descriptor & COPIED_FLAG) !== 0n,
    hostOffset: compressed ? 0 : Number(descriptor & OFFSET_MASK),
    alloc: bitList(bitmap & 0xffff_ffffn),
    zero: bitList(bitmap >> 32n),
  }
}

/** The L2 entry of guestCluster as it is in the file now. */
export function readEntry(imagePath: string, guestCluster: number): L2EntryOnDisk {
  return withFile(imagePath, (fd) => {
    const layout = layoutOf(fd)
    const table = l2TableOffset(fd, layout, guestCluster)
    if (table === 0) return decodeEntry(undefined, 0n, 0n)
    const entriesPerTable = layout.clusterSize / layout.l2EntryBytes
    const at = table + (guestCluster % entriesPerTable) * layout.l2EntryBytes
    const raw = readAt(fd, at, layout.l2EntryBytes)
    return decodeEntry(at, raw.readBigUInt64BE(0), layout.extendedL2 ? raw.readBigUInt64BE(8) : 0n)
  })
}

/** Every L2 entry for guest clusters [0, clusters), read in one pass. */
export function readEntries(imagePath: string, clusters: number): L2EntryOnDisk[] {
  const out: L2EntryOnDisk[] = []
  withFile(imagePath, (fd) => {
    const layout = layoutOf(fd)
    const entriesPerTable = layout.clusterSize / layout.l2EntryBytes
    for (let first = 0; first < clusters; first += entriesPerTable) {
      const table = l2TableOffset(fd, layout, first)
      const count = Math.min(entriesPerTable, clusters - first)
      if (table === 0) {
        for (let i = 0; i < count; i++) out.push(decodeEntry(undefined, 0n, 0n))
        continue
      }
      const raw = readAt(fd, table, count * layout.l2EntryBytes)
      for (let i = 0; i < count; i++) {
        const at = i * layout.l2EntryBytes
        out.push(decodeEntry(table + at, raw.readBigUInt64BE(at), layout.extendedL2 ? raw.readBigUInt64BE(at + 8) : 0n))
      }
    }
  })
  return out
}

/** How a subcluster of an extended L2 entry reads (spec type table; bit 0 of the descriptor is unused). */
export type SubclusterKind = 'data' | 'zero' | 'unallocated' | 'compressed' | 'invalid'

export function subclusterKind(entry: L2EntryOnDisk, sc: number): SubclusterKind {
  if (entry.compressed) return 'compressed'
  const allocWord = entry.bitmap & 0xffff_ffffn
  const zeroWord = entry.bitmap >> 32n
  const bit = 1n << BigInt(sc)
  if (entry.hostOffset === 0) {
    if (allocWord !== 0n) return 'invalid'
    return (zeroWord & bit) !== 0n ? 'zero' : 'unallocated'
  }
  if ((allocWord & zeroWord) !== 0n) return 'invalid'
  if ((zeroWord & bit) !== 0n) return 'zero'
  return (allocWord & bit) !== 0n ? 'data' : 'unallocated'
}

/** Writes bytes at offset in a file (to damage an entry on purpose). */
export function pokeFile(filePath: string, offset: number, bytes: readonly number[]): void {
  const fd = fs.openSync(filePath, 'r+')
  try {
    fs.writeSync(fd, Buffer.from(bytes), 0, bytes.length, offset)
  } finally {
    fs.closeSync(fd)
  }
}

/** Writes a big-endian unsigned value of `bytes` bytes at offset (qemu-iotests' poke_file_be). */
export function pokeFileBigEndian(filePath: string, offset: number, bytes: number, value: bigint): void {
  const out: number[] = []
  for (let i = bytes - 1; i >= 0; i--) out.push(Number((value >> BigInt(8 * i)) & 0xffn))
  pokeFile(filePath, offset, out)
}

/** '0-9,16,31' -> [0..9, 16, 31]; '' -> []. */
export function parseBits(list: string): number[] {
  const out: number[] = []
  for (const part of list.split(',').map((p) => p.trim()).filter((p) => p.length > 0)) {
    const m = /^(\d+)(?:-(\d+))?$/.exec(part)
    if (!m) throw new Error(`bad subcluster list '${list}'`)
    const first = Number(m[1])
    const last = m[2] === undefined ? first : Number(m[2])
    if (first > last || last > 31) throw new Error(`bad subcluster range '${part}'`)
    for (let i = first; i <= last; i++) out.push(i)
  }
  return [...new Set(out)].sort((a, b) => a - b)
}

/** [0,1,2,5] -> '0-2,5': the canonical form of a subcluster list, for readable comparisons. */
export function formatBits(bits: readonly number[]): string {
  const sorted = [...new Set(bits)].sort((a, b) => a - b)
  const parts: string[] = []
  for (let i = 0; i < sorted.length; ) {
    let j = i
    while (j + 1 < sorted.length && sorted[j + 1] === (sorted[j] as number) + 1) j++
    parts.push(i === j ? String(sorted[i]) : `${sorted[i]}-${sorted[j]}`)
    i = j + 1
  }
  return parts.join(',')
}

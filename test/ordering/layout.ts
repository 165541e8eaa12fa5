/*
 * Reading qcow2 metadata from image bytes for the ordering checks, independently of the engine
 * (decoded from the spec, not with lib/format; the header by the shared test helper
 * header-fields.ts): header fields, L1 tables (active and snapshots'), the host clusters they
 * reach, and refcounts.
 *
 * Every reader takes a `read(buf, hostOffset)` function so the same code works on a file or on
 * a replay in memory; bytes past the end of the file read as zeros.
 */

import { HEADER_FIELDS_BYTES, type HeaderFields, parseHeaderFields } from '../helpers/header-fields.js'

export type { HeaderFields } from '../helpers/header-fields.js'

export type ReadAt = (buf: Uint8Array, hostOffset: number) => number

export interface L1Location {
  l1TableOffset: number
  l1Size: number
}

const QCOW_MAGIC = 0x514649fb
/** Bits 9-55 of an L1/L2/refcount table entry: the offset, as the high and low words' masks. */
const OFFSET_MASK_HI = 0x00ffffff
const OFFSET_MASK_LO = 0xfffffe00
const COMPRESSED_BIT_HI = 0x40000000

function bytesAt(read: ReadAt, hostOffset: number, length: number): DataView {
  const buf = new Uint8Array(length)
  read(buf, hostOffset)
  return new DataView(buf.buffer)
}

function u64(view: DataView, at: number): number {
  return view.getUint32(at) * 0x1_0000_0000 + view.getUint32(at + 4)
}

/** The offset field (bits 9-55) of the table entry at `at`. */
function entryOffset(view: DataView, at: number): number {
  return (view.getUint32(at) & OFFSET_MASK_HI) * 0x1_0000_0000 + ((view.getUint32(at + 4) & OFFSET_MASK_LO) >>> 0)
}

export function readHeaderFields(read: ReadAt): HeaderFields {
  const bytes = new Uint8Array(HEADER_FIELDS_BYTES)
  read(bytes, 0)
  if (new DataView(bytes.buffer).getUint32(0) !== QCOW_MAGIC) throw new Error('not a qcow2 image (bad magic)')
  return parseHeaderFields(bytes)
}

/** The L1 tables of the internal snapshots (snapshot table entries, spec "Snapshots"). */
export function snapshotL1Tables(read: ReadAt, h: HeaderFields): L1Location[] {
  const out: L1Location[] = []
  let at = h.snapshotsOffset
  for (let i = 0; i < h.snapshotCount; i++) {
    const fixed = bytesAt(read, at, 40)
    const l1TableOffset = u64(fixed, 0)
    const l1Size = fixed.getUint32(8)
    const idSize = fixed.getUint16(12)
    const nameSize = fixed.getUint16(14)
    const extraDataSize = fixed.getUint32(36)
    out.push({ l1TableOffset, l1Size })
    at += Math.ceil((40 + extraDataSize + idSize + nameSize) / 8) * 8
  }
  return out
}

/** L2 table offsets of an L1 table (0 for unallocated entries). */
export function l2TableOffsets(read: ReadAt, l1: L1Location): number[] {
  const v = bytesAt(read, l1.l1TableOffset, l1.l1Size * 8)
  const out: number[] = []
  for (let i = 0; i < l1.l1Size; i++) out.push(entryOffset(v, i * 8))
  return out
}

/**
 * Host clusters reached from an L1 table: the table's own clusters, its L2 tables, and every
 * data cluster (normal entries, and the clusters a compressed cluster's bytes touch).
 */
export function clustersReachedFrom(read: ReadAt, h: HeaderFields, l1: L1Location): Set<number> {
  const cs = h.clusterSize
  const reached = new Set<number>()
  const l1Clusters = Math.ceil((l1.l1Size * 8) / cs)
  for (let i = 0; i < l1Clusters; i++) reached.add(l1.l1TableOffset / cs + i)
  const entryBytes = h.l2EntryBytes
  const entries = cs / entryBytes
  // Compressed descriptor (spec): offset in bits 0..x-1, additional sectors in bits x..61,
  // x = 62 - (cluster_bits - 8).
  const x = 62 - (h.clusterBits - 8)
  for (const l2Offset of l2TableOffsets(read, l1)) {
    if (l2Offset === 0) continue
    reached.add(l2Offset / cs)
    const v = bytesAt(read, l2Offset, cs)
    for (let i = 0; i < entries; i++) {
      const at = i * entryBytes
      const hi = v.getUint32(at)
      const lo = v.getUint32(at + 4)
      if ((hi & COMPRESSED_BIT_HI) !== 0) {
        const word = BigInt(hi) * 0x1_0000_0000n + BigInt(lo)
        const hostOffset = Number(word & ((1n << BigInt(x)) - 1n))
        const extraSectors = Number((word >> BigInt(x)) & ((1n << BigInt(62 - x)) - 1n))
        const end = Math.floor(hostOffset / 512) * 512 + (extraSectors + 1) * 512
        for (let c = Math.floor(hostOffset / cs); c <= Math.floor((end - 1) / cs); c++) reached.add(c)
        continue
      }
      const host = entryOffset(v, at)
      if (host !== 0) reached.add(host / cs)
    }
  }
  return reached
}

/** The refcount of host cluster `cluster` as the file says (0 where no block covers it). */
export function refcountOf(read: ReadAt, h: HeaderFields, cluster: number): number {
  const refcountBits = 2 ** h.refcountOrder
  const entriesPerBlock = (h.clusterSize * 8) / refcountBits
  const tableIndex = Math.floor(cluster / entriesPerBlock)
  if (tableIndex >= (h.refcountTableClusters * h.clusterSize) / 8) return 0
  const blockOffset = entryOffset(bytesAt(read, h.refcountTableOffset + tableIndex * 8, 8), 0)
  if (blockOffset === 0) return 0
  return refcountInBlock(bytesAt(read, blockOffset, h.clusterSize), cluster % entriesPerBlock, h.refcountOrder)
}

/** Entry `index` of a refcount block (refcount_order 0..6, big-endian, bits from the MSB). */
export function refcountInBlock(block: DataView, index: number, refcountOrder: number): number {
  const bits = 2 ** refcountOrder
  if (bits >= 8) {
    const bytes = bits / 8
    const at = index * bytes
    let value = 0
    for (let i = 0; i < bytes; i++) value = value * 256 + block.getUint8(at + i)
    return value
  }
  const perByte = 8 / bits
  const byte = block.getUint8(Math.floor(index / perByte))
  // Sub-byte refcounts: entry 0 is in the least significant bits (spec: refcount_block_entry).
  const shift = (index % perByte) * bits
  return (byte >> shift) & ((1 << bits) - 1)
}

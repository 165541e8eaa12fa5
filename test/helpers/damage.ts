/*
 * Damaging qcow2 images in known ways, independently of the engine (its own reading of the
 * tables from the spec; the header through header-fields.ts), for the check and repair tests:
 *
 *   readHeader(image)                        the fields the helpers need
 *   refcountOf(image, hostCluster)           the stated refcount of a host cluster
 *   setRefcount(image, hostCluster, value)   pokes it (any refcount width)
 *   l1EntryOffset / readL1Entry / writeL1Entry
 *   l2EntryOffset / readL2Entry / writeL2Entry (descriptor and, with extended L2, bitmap)
 *   writeBytes / writeBigEndian              raw pokes
 *   setIncompatibleBits(image, mask)         ORs bits into incompatible_features
 *   appendCluster(image)                     grows the file by one cluster; returns its index
 *   shrinkFirstSnapshotExtraData(image, n)   keeps n bytes of snapshot 0's extra data (the
 *                                            entries after it move up)
 *
 * Everything is read from the file on every call: tests poke and re-check between calls.
 */
import * as fs from 'node:fs'
import { HEADER_FIELDS_BYTES, type HeaderFields, parseHeaderFields } from './header-fields.js'

export type { HeaderFields } from './header-fields.js'

function readAt(fd: number, offset: number, length: number): Buffer {
  const buf = Buffer.alloc(length)
  fs.readSync(fd, buf, 0, length, offset)
  return buf
}

function withFd<T>(imagePath: string, flags: string, fn: (fd: number) => T): T {
  const fd = fs.openSync(imagePath, flags)
  try {
    return fn(fd)
  } finally {
    fs.closeSync(fd)
  }
}

function headerOf(fd: number): HeaderFields {
  return parseHeaderFields(readAt(fd, 0, HEADER_FIELDS_BYTES))
}

export function readHeader(imagePath: string): HeaderFields {
  return withFd(imagePath, 'r', headerOf)
}

/** Where the refcount of hostCluster lives: byte offset in the file and bit shift (sub-byte). */
function refcountLocation(fd: number, hostCluster: number): { byteOffset: number; bits: number; shift: number } {
  const h = headerOf(fd)
  const bits = 2 ** h.refcountOrder
  const entriesPerBlock = (h.clusterSize * 8) / bits
  const tableIndex = Math.floor(hostCluster / entriesPerBlock)
  const blockOffset = Number(readAt(fd, h.refcountTableOffset + tableIndex * 8, 8).readBigUInt64BE(0) & 0xffff_ffff_ffff_fe00n)
  if (blockOffset === 0) throw new Error(`host cluster ${hostCluster} has no refcount block`)
  const bitOffset = (hostCluster % entriesPerBlock) * bits
  return { byteOffset: blockOffset + Math.floor(bitOffset / 8), bits, shift: bitOffset % 8 }
}

export function refcountOf(imagePath: string, hostCluster: number): number {
  return withFd(imagePath, 'r', (fd) => {
    const { byteOffset, bits, shift } = refcountLocation(fd, hostCluster)
    if (bits < 8) return (readAt(fd, byteOffset, 1)[0]! >> shift) & ((1 << bits) - 1)
    const buf = readAt(fd, byteOffset, bits / 8)
    let value = 0n
    for (const byte of buf) value = (value << 8n) | BigInt(byte)
    return Number(value)
  })
}

export function setRefcount(imagePath: string, hostCluster: number, refcount: number): void {
  withFd(imagePath, 'r+', (fd) => {
    const { byteOffset, bits, shift } = refcountLocation(fd, hostCluster)
    if (bits < 8) {
      const byte = readAt(fd, byteOffset, 1)[0]!
      const mask = ((1 << bits) - 1) << shift
      fs.writeSync(fd, Buffer.from([(byte & ~mask) | ((refcount << shift) & mask)]), 0, 1, byteOffset)
      return
    }
    const buf = Buffer.alloc(bits / 8)
    let value = BigInt(refcount)
    for (let i = buf.length - 1; i >= 0; i--) {
      buf[i] = Number(value & 0xffn)
      value >>= 8n
    }
    fs.writeSync(fd, buf, 0, buf.length, byteOffset)
  })
}

export function l1EntryOffset(imagePath: string, l1Index: number): number {
  return readHeader(imagePath).l1TableOffset + l1Index * 8
}

export function readL1Entry(imagePath: string, l1Index: number): bigint {
  return withFd(imagePath, 'r', (fd) => readAt(fd, headerOf(fd).l1TableOffset + l1Index * 8, 8).readBigUInt64BE(0))
}

export function writeL1Entry(imagePath: string, l1Index: number, entry: bigint): void {
  writeBigEndian(imagePath, l1EntryOffset(imagePath, l1Index), 8, entry)
}

/** File offset of the L2 entry of guestCluster (its L2 table must exist). */
export function l2EntryOffset(imagePath: string, guestCluster: number): number {
  return withFd(imagePath, 'r', (fd) => {
    const h = headerOf(fd)
    const entriesPerTable = h.clusterSize / h.l2EntryBytes
    const l1Entry = readAt(fd, h.l1TableOffset + Math.floor(guestCluster / entriesPerTable) * 8, 8).readBigUInt64BE(0)
    const table = Number(l1Entry & 0x00ff_ffff_ffff_fe00n)
    if (table === 0) throw new Error(`guest cluster ${guestCluster} has no L2 table`)
    return table + (guestCluster % entriesPerTable) * h.l2EntryBytes
  })
}

export interface L2Entry {
  descriptor: bigint
  /** Extended L2: the subcluster bitmap (alloc bits 0-31, zero bits 32-63); 0 otherwise. */
  bitmap: bigint
}

export function readL2Entry(imagePath: string, guestCluster: number): L2Entry {
  const at = l2EntryOffset(imagePath, guestCluster)
  return withFd(imagePath, 'r', (fd) => {
    const h = headerOf(fd)
    const raw = readAt(fd, at, h.l2EntryBytes)
    return { descriptor: raw.readBigUInt64BE(0), bitmap: h.extendedL2 ? raw.readBigUInt64BE(8) : 0n }
  })
}

export function writeL2Entry(imagePath: string, guestCluster: number, entry: L2Entry): void {
  const at = l2EntryOffset(imagePath, guestCluster)
  writeBigEndian(imagePath, at, 8, entry.descriptor)
  if (readHeader(imagePath).extendedL2) writeBigEndian(imagePath, at + 8, 8, entry.bitmap)
}

/** Host cluster index of a standard L2 descriptor (bits 9-55). */
export function hostClusterOf(imagePath: string, descriptor: bigint): number {
  return Number(descriptor & 0x00ff_ffff_ffff_fe00n) / readHeader(imagePath).clusterSize
}

export function writeBytes(filePath: string, offset: number, bytes: Uint8Array): void {
  withFd(filePath, 'r+', (fd) => fs.writeSync(fd, bytes, 0, bytes.length, offset))
}

export function writeBigEndian(filePath: string, offset: number, bytes: number, value: bigint): void {
  const buf = Buffer.alloc(bytes)
  for (let i = bytes - 1; i >= 0; i--) {
    buf[i] = Number(value & 0xffn)
    value >>= 8n
  }
  withFd(filePath, 'r+', (fd) => fs.writeSync(fd, buf, 0, bytes, offset))
}

export function setIncompatibleBits(imagePath: string, mask: bigint): void {
  const h = readHeader(imagePath)
  writeBigEndian(imagePath, 72, 8, h.incompatibleFeatures | mask)
}

export const DIRTY_BIT = 1n << 0n
export const CORRUPT_BIT = 1n << 1n

/** Grows the file to a whole number of clusters plus one; returns the new cluster's index. */
export function appendCluster(imagePath: string): number {
  const { clusterSize } = readHeader(imagePath)
  const clusters = Math.ceil(fs.statSync(imagePath).size / clusterSize)
  fs.truncateSync(imagePath, (clusters + 1) * clusterSize)
  return clusters
}

/**
 * Cuts the extra data of the first snapshot table entry to `keepBytes` (below the 16 bytes a
 * version 3 entry needs), moving the rest of the table up as a writer of such entries would
 * have laid it out.
 */
export function shrinkFirstSnapshotExtraData(imagePath: string, keepBytes: number): void {
  const h = readHeader(imagePath)
  if (h.snapshotCount === 0) throw new Error('no snapshots')
  withFd(imagePath, 'r+', (fd) => {
    const table = readAt(fd, h.snapshotsOffset, h.clusterSize)
    const extra = table.readUInt32BE(36)
    if (keepBytes > extra) throw new Error(`entry 0 has only ${extra} bytes of extra data`)
    table.writeUInt32BE(keepBytes, 36)
    const shifted = Buffer.concat([table.subarray(0, 40 + keepBytes), table.subarray(40 + extra), Buffer.alloc(extra - keepBytes)])
    fs.writeSync(fd, shifted, 0, shifted.length, h.snapshotsOffset)
  })
}

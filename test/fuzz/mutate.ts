/*
 * Mutations of qcow2 images for the fuzz test: find where an image keeps its structures
 * (header, header extensions, L1 table, L2 tables, refcount table and blocks, snapshot table,
 * compressed data), then damage one or a few of them the ways a corrupt or hostile image
 * would: flipped bits, random bytes, and "interesting" 64-bit values (0, all ones, offsets past
 * the end of the file, offsets of other metadata, misaligned offsets, bit 55/62/63 set).
 *
 * Deterministic: a seed gives the same mutation every time (xorshift32), so a failure names a
 * seed that reproduces it.
 */
import { parseHeader } from '../../lib/format/header.js'

export class Rng {
  #state: number
  constructor(seed: number) {
    this.#state = (seed * 2654435761 + 0x9e3779b9) >>> 0 || 1
  }
  next(): number {
    let x = this.#state
    x ^= x << 13
    x >>>= 0
    x ^= x >>> 17
    x ^= x << 5
    x >>>= 0
    this.#state = x
    return x
  }
  below(n: number): number {
    return n <= 0 ? 0 : this.next() % n
  }
  pick<T>(items: readonly T[]): T {
    return items[this.below(items.length)]!
  }
}

export interface Region {
  kind: 'header' | 'extensions' | 'l1' | 'l2' | 'reftable' | 'refblock' | 'snapshots' | 'compressed' | 'data'
  start: number
  end: number
}

function u64(view: DataView, at: number): number {
  if (at + 8 > view.byteLength) return 0
  return view.getUint32(at) * 2 ** 32 + view.getUint32(at + 4)
}

/** The structures of an image, found by reading it as the spec says (bounded by its size). */
export function findRegions(bytes: Uint8Array): Region[] {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength)
  const regions: Region[] = [{ kind: 'header', start: 0, end: Math.min(bytes.length, 104) }]
  let header
  try {
    header = parseHeader(bytes.subarray(0, Math.min(bytes.length, 4096)))
  } catch {
    return regions
  }
  const clusterSize = 2 ** header.clusterBits
  const inFile = (start: number, length: number) => start > 0 && start + length <= bytes.length
  // Tables live at cluster-aligned offsets; a misaligned pointer is damage the engine refuses.
  const tableInFile = (start: number, length: number) => inFile(start, length) && start % clusterSize === 0
  const headerLength = header.version >= 3 ? view.getUint32(100) : 72
  regions.push({ kind: 'extensions', start: headerLength, end: Math.min(clusterSize, bytes.length) })
  const l2EntryBytes = header.incompatibleFeatures.lo & 0x10 ? 16 : 8
  const l1Bytes = header.l1Size * 8
  if (tableInFile(header.l1TableOffset, l1Bytes)) {
    regions.push({ kind: 'l1', start: header.l1TableOffset, end: header.l1TableOffset + l1Bytes })
    for (let i = 0; i < header.l1Size && i < 4096; i++) {
      const l2Offset = u64(view, header.l1TableOffset + i * 8) % 2 ** 56 - (u64(view, header.l1TableOffset + i * 8) % 2 ** 56) % 512
      if (!tableInFile(l2Offset, clusterSize)) continue
      regions.push({ kind: 'l2', start: l2Offset, end: l2Offset + clusterSize })
      for (let e = 0; e < clusterSize / l2EntryBytes; e++) {
        const at = l2Offset + e * l2EntryBytes
        const hi = view.getUint32(at)
        if ((hi & 0x40000000) === 0) continue
        // A compressed descriptor: the offset is in the low 62 - (clusterBits - 8) bits.
        const offsetBits = 62 - (header.clusterBits - 8)
        const entry = u64(view, at) % 2 ** 62
        const hostOffset = entry % 2 ** offsetBits
        if (inFile(hostOffset, 1)) regions.push({ kind: 'compressed', start: hostOffset, end: Math.min(bytes.length, hostOffset + 512) })
      }
    }
  }
  const reftableBytes = header.refcountTableClusters * clusterSize
  if (tableInFile(header.refcountTableOffset, Math.min(reftableBytes, bytes.length))) {
    const end = Math.min(bytes.length, header.refcountTableOffset + reftableBytes)
    regions.push({ kind: 'reftable', start: header.refcountTableOffset, end })
    for (let at = header.refcountTableOffset; at + 8 <= end && at < header.refcountTableOffset + 8 * 4096; at += 8) {
      const blockOffset = u64(view, at)
      if (tableInFile(blockOffset, clusterSize)) regions.push({ kind: 'refblock', start: blockOffset, end: blockOffset + clusterSize })
    }
  }
  if (header.snapshotCount > 0 && tableInFile(header.snapshotsOffset, 64)) {
    regions.push({ kind: 'snapshots', start: header.snapshotsOffset, end: Math.min(bytes.length, header.snapshotsOffset + 4096) })
  }
  regions.push({ kind: 'data', start: clusterSize, end: bytes.length })
  return regions.filter((r) => r.end > r.start)
}

/** 64-bit values that tend to break parsers: edges, other structures' offsets, flag bits. */
function interestingValue(rng: Rng, bytes: Uint8Array, regions: readonly Region[]): number {
  const size = bytes.length
  const other = rng.pick(regions)
  const choices = [
    0,
    1,
    2 ** 53 - 1,
    size,
    size + 512,
    size * 2 ** 10,
    other.start,
    other.start + 1,
    other.start + 2 ** 62,
    other.start + 2 ** 63,
    2 ** 55 + other.start,
    2 ** 56 - 512,
    2 ** 63,
    0x8000_0000,
    0xffff_ffff,
    rng.next(),
  ]
  return rng.pick(choices)
}

function writeU64(bytes: Uint8Array, at: number, value: number): void {
  if (at + 8 > bytes.length) return
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength)
  if (value === 2 ** 64 - 1 || value >= 2 ** 64) {
    view.setUint32(at, 0xffffffff)
    view.setUint32(at + 4, 0xffffffff)
    return
  }
  view.setUint32(at, Math.floor(value / 2 ** 32) >>> 0)
  view.setUint32(at + 4, value % 2 ** 32 >>> 0)
}

export interface Mutation {
  region: Region['kind']
  description: string
}

/** Damages a copy of `original`; returns it with what was done. */
export function mutate(original: Uint8Array, seed: number): { bytes: Uint8Array; mutations: Mutation[] } {
  const rng = new Rng(seed)
  const bytes = new Uint8Array(original)
  const regions = findRegions(bytes)
  const mutations: Mutation[] = []
  const count = 1 + rng.below(3)
  for (let m = 0; m < count; m++) {
    // The header and the tables are where the interesting damage is: weight them up.
    const region = rng.below(4) === 0 ? rng.pick(regions) : rng.pick(regions.filter((r) => r.kind !== 'data')) ?? regions[0]!
    const length = region.end - region.start
    const op = rng.below(4)
    if (op === 0) {
      const at = region.start + rng.below(length)
      const bit = rng.below(8)
      bytes[at]! ^= 1 << bit
      mutations.push({ region: region.kind, description: `flip bit ${bit} at 0x${at.toString(16)}` })
    } else if (op === 1) {
      const at = region.start + rng.below(length)
      const n = 1 + rng.below(16)
      for (let i = 0; i < n && at + i < bytes.length; i++) bytes[at + i] = rng.below(256)
      mutations.push({ region: region.kind, description: `${n} random bytes at 0x${at.toString(16)}` })
    } else {
      // An aligned 64-bit field (entries and header fields are 8-byte aligned, mostly).
      const at = region.start + rng.below(Math.max(1, Math.floor(length / 8))) * 8
      const value = interestingValue(rng, bytes, regions)
      writeU64(bytes, at, value)
      mutations.push({ region: region.kind, description: `u64 0x${value.toString(16)} at 0x${at.toString(16)}` })
    }
  }
  return { bytes, mutations }
}

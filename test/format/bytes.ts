/*
 * Byte-level builders and readers for the format tests: qcow2 headers, header extensions and
 * snapshot entries written field by field at the offsets the qcow2 specification gives, 64-bit
 * values as BigInt (the oracle side) split into the uint32 halves the code under test takes,
 * a seeded generator, and a reader of a real image's L2 entries.
 *
 * Nothing here uses lib/format: the tests compare the library against these independent
 * encodings.
 */
import { closeSync, openSync, readSync } from 'node:fs'

// ---------------------------------------------------------------------------------------------
// 64-bit values
// ---------------------------------------------------------------------------------------------

export const U32_MASK = 0xffffffffn

/** The uint32 halves of a 64-bit value: hi = bits 32-63, lo = bits 0-31. */
export function halves(value: bigint): { hi: number; lo: number } {
  const v = BigInt.asUintN(64, value)
  return { hi: Number(v >> 32n), lo: Number(v & U32_MASK) }
}

/** The 64-bit value of two uint32 halves (either may be given as a signed int32). */
export function joinHalves(hi: number, lo: number): bigint {
  return (BigInt(hi >>> 0) << 32n) | BigInt(lo >>> 0)
}

export function hex64(value: bigint): string {
  return '0x' + BigInt.asUintN(64, value).toString(16).padStart(16, '0')
}

// ---------------------------------------------------------------------------------------------
// Deterministic pseudo-random numbers (xorshift128+ on BigInt, so 64-bit values come out whole)
// ---------------------------------------------------------------------------------------------

export class Rng {
  private s0: bigint
  private s1: bigint

  constructor(seed: number) {
    // splitmix64 to spread a small seed over both state words
    let z = BigInt(seed >>> 0) + 0x9e3779b97f4a7c15n
    const mix = (): bigint => {
      z = BigInt.asUintN(64, z + 0x9e3779b97f4a7c15n)
      let x = z
      x = BigInt.asUintN(64, (x ^ (x >> 30n)) * 0xbf58476d1ce4e5b9n)
      x = BigInt.asUintN(64, (x ^ (x >> 27n)) * 0x94d049bb133111ebn)
      return x ^ (x >> 31n)
    }
    this.s0 = mix()
    this.s1 = mix() | 1n
  }

  /** 64 random bits. */
  next64(): bigint {
    let s1 = this.s0
    const s0 = this.s1
    this.s0 = s0
    s1 = BigInt.asUintN(64, s1 ^ (s1 << 23n))
    this.s1 = s1 ^ s0 ^ (s1 >> 17n) ^ (s0 >> 26n)
    return BigInt.asUintN(64, this.s1 + s0)
  }

  /** `bits` random bits (bits <= 64). */
  bits(bits: number): bigint {
    return bits === 0 ? 0n : this.next64() >> BigInt(64 - bits)
  }

  /** A random integer in [0, n), n <= 2^53. */
  below(n: number): number {
    return Number(this.next64() % BigInt(n))
  }

  /** A random uint32. */
  u32(): number {
    return Number(this.bits(32))
  }

  /** Random bytes. */
  bytes(length: number): Uint8Array {
    const out = new Uint8Array(length)
    for (let i = 0; i < length; i += 8) {
      let v = this.next64()
      for (let j = i; j < Math.min(i + 8, length); j++) {
        out[j] = Number(v & 0xffn)
        v >>= 8n
      }
    }
    return out
  }
}

// ---------------------------------------------------------------------------------------------
// Header (spec: "Header")
// ---------------------------------------------------------------------------------------------

export const MAGIC = 0x514649fb

/** Header fields by spec name; anything left out gets a plausible default. */
export interface HeaderSpec {
  magic?: number
  version?: number
  backing_file_offset?: bigint
  backing_file_size?: number
  cluster_bits?: number
  size?: bigint
  crypt_method?: number
  l1_size?: number
  l1_table_offset?: bigint
  refcount_table_offset?: bigint
  refcount_table_clusters?: number
  nb_snapshots?: number
  snapshots_offset?: bigint
  /** Version 3 fields (written when version >= 3). */
  incompatible_features?: bigint
  compatible_features?: bigint
  autoclear_features?: bigint
  refcount_order?: number
  header_length?: number
  /** Additional field at byte 104 (written when header_length > 104). */
  compression_type?: number
}

/**
 * Writes a header into a zero-filled buffer of `bufferBytes` (default: one cluster) and returns
 * it. Every field goes to its spec offset, big-endian.
 */
export function buildHeader(spec: HeaderSpec, bufferBytes?: number): Uint8Array {
  const clusterBits = spec.cluster_bits ?? 16
  const version = spec.version ?? 3
  const length = bufferBytes ?? (clusterBits >= 9 && clusterBits <= 21 ? 2 ** clusterBits : 4096)
  const bytes = new Uint8Array(length)
  const view = new DataView(bytes.buffer)
  view.setUint32(0, spec.magic ?? MAGIC)
  view.setUint32(4, version)
  view.setBigUint64(8, spec.backing_file_offset ?? 0n)
  view.setUint32(16, spec.backing_file_size ?? 0)
  view.setUint32(20, clusterBits)
  view.setBigUint64(24, spec.size ?? 1n << 30n)
  view.setUint32(32, spec.crypt_method ?? 0)
  view.setUint32(36, spec.l1_size ?? 2)
  view.setBigUint64(40, spec.l1_table_offset ?? 3n << BigInt(clusterBits))
  view.setBigUint64(48, spec.refcount_table_offset ?? 1n << BigInt(clusterBits))
  view.setUint32(56, spec.refcount_table_clusters ?? 1)
  view.setUint32(60, spec.nb_snapshots ?? 0)
  view.setBigUint64(64, spec.snapshots_offset ?? 0n)
  if (version >= 3 && length >= 104) {
    view.setBigUint64(72, spec.incompatible_features ?? 0n)
    view.setBigUint64(80, spec.compatible_features ?? 0n)
    view.setBigUint64(88, spec.autoclear_features ?? 0n)
    view.setUint32(96, spec.refcount_order ?? 4)
    const headerLength = spec.header_length ?? 112
    view.setUint32(100, headerLength)
    if (headerLength > 104 && length > 104) view.setUint8(104, spec.compression_type ?? 0)
  }
  return bytes
}

/** Where header extensions start for a header built from `spec`. */
export function extensionStart(spec: HeaderSpec): number {
  return (spec.version ?? 3) >= 3 ? (spec.header_length ?? 112) : 72
}

// ---------------------------------------------------------------------------------------------
// Header extensions (spec: "Header extensions")
// ---------------------------------------------------------------------------------------------

export const EXT = {
  END: 0x00000000,
  BACKING_FORMAT: 0xe2792aca,
  FEATURE_NAME_TABLE: 0x6803f857,
  BITMAPS: 0x23852875,
  CRYPTO_HEADER: 0x0537be77,
  DATA_FILE: 0x44415441,
} as const

export interface ExtensionSpec {
  type: number
  data: Uint8Array
  /** Length written in the extension header; defaults to data.length. */
  length?: number
}

/**
 * Writes extensions at `at` (type u32, length u32, data padded to 8 bytes), then an end marker
 * unless `end` is false. Returns the offset after the last byte written.
 */
export function writeExtensions(bytes: Uint8Array, at: number, extensions: ExtensionSpec[], end = true): number {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength)
  for (const ext of extensions) {
    view.setUint32(at, ext.type)
    view.setUint32(at + 4, ext.length ?? ext.data.length)
    bytes.set(ext.data, at + 8)
    at += 8 + Math.ceil(ext.data.length / 8) * 8
  }
  if (end) {
    view.setUint32(at, 0)
    view.setUint32(at + 4, 0)
    at += 8
  }
  return at
}

export const ascii = (text: string): Uint8Array => new TextEncoder().encode(text)

/** One 48-byte feature name table entry: type, bit number, name padded with NULs to 46 bytes. */
export function featureNameEntry(type: number, bit: number, name: string): Uint8Array {
  const entry = new Uint8Array(48)
  entry[0] = type
  entry[1] = bit
  const encoded = ascii(name)
  if (encoded.length > 46) throw new Error('feature name longer than 46 bytes')
  entry.set(encoded, 2)
  return entry
}

export function concatBytes(parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0))
  let at = 0
  for (const p of parts) {
    out.set(p, at)
    at += p.length
  }
  return out
}

export function u64Bytes(...values: bigint[]): Uint8Array {
  const out = new Uint8Array(values.length * 8)
  const view = new DataView(out.buffer)
  values.forEach((v, i) => view.setBigUint64(i * 8, v))
  return out
}

// ---------------------------------------------------------------------------------------------
// Snapshot table entries (spec: "Snapshots")
// ---------------------------------------------------------------------------------------------

export interface SnapshotSpec {
  l1_table_offset: bigint
  l1_size: number
  id: string
  name: string
  date_sec: number
  date_nsec: number
  vm_clock_nsec: bigint
  vm_state_size: number
  /** Raw extra data (vm_state_size_large, disk_size, icount, ...), any length. */
  extra?: Uint8Array
}

/** One snapshot table entry, padded to a multiple of 8 bytes. */
export function snapshotEntry(spec: SnapshotSpec): Uint8Array {
  const id = ascii(spec.id)
  const name = ascii(spec.name)
  const extra = spec.extra ?? new Uint8Array(0)
  const unpadded = 40 + extra.length + id.length + name.length
  const out = new Uint8Array(Math.ceil(unpadded / 8) * 8)
  const view = new DataView(out.buffer)
  view.setBigUint64(0, spec.l1_table_offset)
  view.setUint32(8, spec.l1_size)
  view.setUint16(12, id.length)
  view.setUint16(14, name.length)
  view.setUint32(16, spec.date_sec)
  view.setUint32(20, spec.date_nsec)
  view.setBigUint64(24, spec.vm_clock_nsec)
  view.setUint32(32, spec.vm_state_size)
  view.setUint32(36, extra.length)
  out.set(extra, 40)
  out.set(id, 40 + extra.length)
  out.set(name, 40 + extra.length + id.length)
  return out
}

// ---------------------------------------------------------------------------------------------
// Reading real images
// ---------------------------------------------------------------------------------------------

/** `length` bytes of a file from `offset`; bytes past the end of the file read as zero. */
export function readFileRange(file: string, offset: number, length: number): Uint8Array {
  const out = new Uint8Array(length)
  const fd = openSync(file, 'r')
  try {
    let done = 0
    while (done < length) {
      const n = readSync(fd, out, done, length - done, offset + done)
      if (n === 0) break
      done += n
    }
  } finally {
    closeSync(fd)
  }
  return out
}

export interface RawL2Entry {
  /** Guest cluster index. */
  guestCluster: number
  /** First 64 bits of the entry. */
  entry: bigint
  /** Subcluster bitmap (extended L2 only, else 0n). */
  bitmap: bigint
}

/**
 * Every non-zero L2 entry of a real image, read straight from the file with the spec's
 * offsets (header fields, L1 bits 9-55). For the codec tests, which need QEMU's own
 * compressed-cluster descriptors.
 */
export function readL2Entries(file: string): { clusterBits: number; extendedL2: boolean; entries: RawL2Entry[] } {
  const header = new DataView(readFileRange(file, 0, 112).buffer)
  const clusterBits = header.getUint32(20)
  const version = header.getUint32(4)
  const incompat = version >= 3 ? header.getBigUint64(72) : 0n
  const extendedL2 = (incompat & (1n << 4n)) !== 0n
  const l1Size = header.getUint32(36)
  const l1Offset = Number(header.getBigUint64(40))
  const clusterBytes = 2 ** clusterBits
  const entryBytes = extendedL2 ? 16 : 8
  const entriesPerTable = clusterBytes / entryBytes
  const l1 = new DataView(readFileRange(file, l1Offset, l1Size * 8).buffer)
  const entries: RawL2Entry[] = []
  for (let i = 0; i < l1Size; i++) {
    const l2Offset = Number(l1.getBigUint64(i * 8) & 0x00fffffffffffe00n)
    if (l2Offset === 0) continue
    const l2 = new DataView(readFileRange(file, l2Offset, clusterBytes).buffer)
    for (let j = 0; j < entriesPerTable; j++) {
      const entry = l2.getBigUint64(j * entryBytes)
      const bitmap = extendedL2 ? l2.getBigUint64(j * entryBytes + 8) : 0n
      if (entry === 0n && bitmap === 0n) continue
      entries.push({ guestCluster: i * entriesPerTable + j, entry, bitmap })
    }
  }
  return { clusterBits, extendedL2, entries }
}

/*
 * The committed fixture images (fixtures/, made by fixtures/make-fixtures.sh) and helpers to
 * read a VirtualDisk whole: in chunks of varying sizes, hashed, or compared with a raw file.
 */
import { createHash } from 'node:crypto'
import { readFileSync } from 'node:fs'
import { open } from 'node:fs/promises'
import * as path from 'node:path'
import { fileURLToPath } from 'node:url'
import type { VirtualDisk } from '../../lib/disk.js'

/** What these helpers need of a disk: its size and reads. */
export type ReadableDisk = Pick<VirtualDisk, 'virtualSize' | 'read'>

export const FIXTURES_DIR = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../fixtures')
export const MANIFEST_PATH = path.join(FIXTURES_DIR, 'manifest.json')

/** The raw view of one internal snapshot (qemu-img convert -l snapshot.name=NAME). */
export interface SnapshotView {
  name: string
  id: string
  virtualSize: number
  rawSha256: string
}

/** What ordinary tools see on a demo image's raw view. */
export interface DemoFacts {
  /** `sfdisk --dump STEM.raw` output, run in the directory holding STEM.raw. */
  partitionTable: string
  partitionOffset: number
  partitionBytes: number
  filesystem: string
  label: string
  uuid: string
  files: { path: string; content: string }[]
}

export interface FixtureEntry {
  /** Path relative to fixtures/. */
  file: string
  virtualSize: number
  /** sha256 of `qemu-img convert -O raw FILE`, hex. */
  rawSha256: string
  description: string
  tags: string[]
  /** The keys of `qemu-img info --output=json` that do not depend on the machine. */
  qemuInfo: Record<string, unknown>
  snapshots?: SnapshotView[]
  demo?: DemoFacts
}

function checkEntry(value: unknown, index: number): FixtureEntry {
  const e = value as Partial<FixtureEntry> | null
  const where = `${MANIFEST_PATH} entry ${index}`
  if (typeof e !== 'object' || e === null) throw new Error(`${where}: not an object`)
  if (typeof e.file !== 'string' || e.file === '') throw new Error(`${where}: no file`)
  if (!Number.isSafeInteger(e.virtualSize) || (e.virtualSize ?? 0) <= 0) {
    throw new Error(`${where} (${e.file}): bad virtualSize`)
  }
  if (typeof e.rawSha256 !== 'string' || !/^[0-9a-f]{64}$/.test(e.rawSha256)) {
    throw new Error(`${where} (${e.file}): bad rawSha256`)
  }
  if (!Array.isArray(e.tags)) throw new Error(`${where} (${e.file}): no tags`)
  for (const s of e.snapshots ?? []) {
    if (typeof s.name !== 'string' || !/^[0-9a-f]{64}$/.test(s.rawSha256) || !Number.isSafeInteger(s.virtualSize)) {
      throw new Error(`${where} (${e.file}): bad snapshot view`)
    }
  }
  return e as FixtureEntry
}

let manifest: FixtureEntry[] | undefined

/** fixtures/manifest.json, checked for shape. Throws if it is missing or malformed. */
export function loadManifest(): FixtureEntry[] {
  if (manifest) return manifest
  const parsed: unknown = JSON.parse(readFileSync(MANIFEST_PATH, 'utf8'))
  if (!Array.isArray(parsed) || parsed.length === 0) throw new Error(`${MANIFEST_PATH}: not a non-empty array`)
  manifest = parsed.map(checkEntry)
  return manifest
}

/** Absolute path of a fixture file named relative to fixtures/. */
export function fixturePath(file: string): string {
  return path.join(FIXTURES_DIR, file)
}

export function sha256(data: Uint8Array): string {
  return createHash('sha256').update(data).digest('hex')
}

export async function sha256File(filePath: string): Promise<string> {
  const hash = createHash('sha256')
  const handle = await open(filePath, 'r')
  try {
    for await (const chunk of handle.createReadStream()) hash.update(chunk as Buffer)
  } finally {
    await handle.close()
  }
  return hash.digest('hex')
}

/**
 * Read sizes cycled through by readInChunks: odd sizes make most reads start and end off any
 * cluster or sector boundary, and the large ones span many clusters (and, for 512-byte
 * clusters, several L2 tables) in one request.
 */
export const VARYING_CHUNK_SIZES: readonly number[] = [
  65536, 4096, 511, 1, 65537, 12345, 131075, 1048576, 7, 300000, 32763, 2097152 + 513, 512, 99999,
]

/** The [guestOffset, length] pieces that cover [0, size) using sizes in turn, starting at START. */
export function chunkPlan(size: number, sizes: readonly number[] = VARYING_CHUNK_SIZES, start = 0): [number, number][] {
  if (sizes.length === 0) throw new Error('chunkPlan: no sizes')
  const plan: [number, number][] = []
  let guestOffset = 0
  let i = start
  while (guestOffset < size) {
    const want = sizes[i % sizes.length]!
    const length = Math.min(want, size - guestOffset)
    plan.push([guestOffset, length])
    guestOffset += length
    i++
  }
  return plan
}

/** sha256 of the whole disk, read sequentially in chunks of varying sizes. */
export async function hashDiskSequential(disk: ReadableDisk, sizes: readonly number[] = VARYING_CHUNK_SIZES): Promise<string> {
  const hash = createHash('sha256')
  for (const [guestOffset, length] of chunkPlan(disk.virtualSize, sizes)) {
    const buf = new Uint8Array(length)
    await disk.read(buf, guestOffset)
    hash.update(buf)
  }
  return hash.digest('hex')
}

/**
 * The whole disk read with up to CONCURRENCY reads in flight at once, each into its own slice
 * of one buffer (as FUSE would issue them), in a shuffled order.
 */
export async function readDiskConcurrently(disk: ReadableDisk, concurrency = 8, start = 3): Promise<Uint8Array> {
  const whole = new Uint8Array(disk.virtualSize)
  const plan = chunkPlan(disk.virtualSize, VARYING_CHUNK_SIZES, start)
  // Deterministic shuffle: interleave from both ends so neighbours are not read in order.
  const order: [number, number][] = []
  for (let lo = 0, hi = plan.length - 1; lo <= hi; lo++, hi--) {
    order.push(plan[lo]!)
    if (hi !== lo) order.push(plan[hi]!)
  }
  let next = 0
  const worker = async (): Promise<void> => {
    while (next < order.length) {
      const [guestOffset, length] = order[next++]!
      await disk.read(whole.subarray(guestOffset, guestOffset + length), guestOffset)
    }
  }
  await Promise.all(Array.from({ length: Math.min(concurrency, order.length) }, worker))
  return whole
}

/** Index of the first byte where A and B differ (or the shorter length), -1 when equal. */
export function firstDifference(a: Uint8Array, b: Uint8Array): number {
  const n = Math.min(a.length, b.length)
  if (Buffer.from(a.buffer, a.byteOffset, n).equals(Buffer.from(b.buffer, b.byteOffset, n))) {
    return a.length === b.length ? -1 : n
  }
  // Narrow down by blocks first so a late difference in a large buffer is found quickly.
  const block = 4096
  let base = 0
  while (base < n) {
    const end = Math.min(base + block, n)
    if (!Buffer.from(a.buffer, a.byteOffset + base, end - base).equals(Buffer.from(b.buffer, b.byteOffset + base, end - base))) {
      for (let i = base; i < end; i++) if (a[i] !== b[i]) return i
    }
    base = end
  }
  return n
}

function hexByte(v: number | undefined): string {
  return v === undefined ? 'end of data' : `0x${v.toString(16).padStart(2, '0')}`
}

/**
 * Compares DISK with the raw file RAWPATH (qemu-img's view) over the whole disk, reading both
 * in chunks of varying sizes. Returns undefined when identical, else a one-line description of
 * the first difference (its guest offset in hex and both bytes).
 */
export async function diffDiskWithRaw(
  disk: ReadableDisk,
  rawPath: string,
  sizes: readonly number[] = VARYING_CHUNK_SIZES,
): Promise<string | undefined> {
  const handle = await open(rawPath, 'r')
  try {
    const rawSize = (await handle.stat()).size
    if (rawSize !== disk.virtualSize) {
      return `virtual size ${disk.virtualSize} differs from qemu-img's raw size ${rawSize}`
    }
    for (const [guestOffset, length] of chunkPlan(disk.virtualSize, sizes)) {
      const mine = new Uint8Array(length)
      await disk.read(mine, guestOffset)
      const theirs = Buffer.alloc(length)
      let got = 0
      while (got < length) {
        const { bytesRead } = await handle.read(theirs, got, length - got, guestOffset + got)
        if (bytesRead === 0) break
        got += bytesRead
      }
      const at = firstDifference(mine, theirs.subarray(0, got))
      if (at >= 0) {
        const guest = guestOffset + at
        return `first difference at guest offset 0x${guest.toString(16)} (${guest}): engine ${hexByte(mine[at])}, qemu-img ${hexByte(theirs[at])} (read of ${length} bytes at 0x${guestOffset.toString(16)})`
      }
    }
    return undefined
  } finally {
    await handle.close()
  }
}

/** Same comparison for two whole buffers; undefined when equal. */
export function describeDifference(mine: Uint8Array, theirs: Uint8Array, what = 'offset'): string | undefined {
  const at = firstDifference(mine, theirs)
  if (at < 0) return undefined
  if (at >= mine.length || at >= theirs.length) {
    return `lengths differ: ${mine.length} vs ${theirs.length} bytes (equal up to ${at})`
  }
  return `first difference at ${what} 0x${at.toString(16)} (${at}): ${hexByte(mine[at])} vs ${hexByte(theirs[at])}`
}

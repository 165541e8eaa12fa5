/*
 * Scripted write workloads for the crash-consistency tests, run through the engine on a
 * RecordingFile over an in-memory copy of an image made by qemu-img. A run yields:
 *
 *   changes      every write and truncate the engine made to the image file, in order
 *   events       the same with syncs and the marks put around each flush()/close()
 *   ops          what the workload asked for (writes, zero writes, resizes), each with the
 *                range of changes it caused and its effect on the guest-visible bytes
 *   flushPoints  after each completed flush: how many changes had been made, and a copy of the
 *                raw model (what every byte of the disk must read as from then on)
 *
 * Starting images and backing files live in a directory of the caller's; the engine resolves
 * backing files relative to the image path as usual, and never writes the starting image.
 */
import * as fs from 'node:fs'
import * as path from 'node:path'
import { type OpenOptions, Qcow2Image } from '../../lib/image.js'
import { MemoryBlockFile } from '../helpers/memory-file.js'
import { type FileChange, type RecordedEvent, RecordingFile } from '../helpers/recording-file.js'
import { type QemuTools, convertToRaw, qemuImg, qemuIo } from '../helpers/qemu.js'
import { type HeaderFields, readHeaderFields } from './layout.js'

/** What one op did to the guest-visible bytes: `bytes` over the range, or zeros. */
export interface Effect {
  guestOffset: number
  length: number
  /** The bytes written; undefined for zeros. */
  bytes?: Uint8Array
}

export interface OpRecord {
  index: number
  /** For messages: "write 123+4096", "zeroes 0+65536", "resize 1048576". */
  what: string
  /** Changes made before the op started, and when it returned. */
  startChange: number
  endChange: number
  effects: Effect[]
  /** The virtual size once the op is done. */
  sizeAfter: number
}

export interface FlushPoint {
  /** Ops completed before the flush (ops[0..opCount) are in the model). */
  opCount: number
  /** Changes made when the flush returned. */
  change: number
  /** The raw disk as it must read from then on (length = virtual size). */
  model: Buffer
  label: string
}

export interface Recording {
  name: string
  imagePath: string
  /** The starting image file. */
  initialBytes: Uint8Array
  events: readonly RecordedEvent[]
  changes: readonly FileChange[]
  ops: OpRecord[]
  /** flushPoints[0] is the starting image (0 changes). */
  flushPoints: FlushPoint[]
  /** The internal snapshot the workload must not change, and its raw content. */
  snapshot?: { name: string; view: Buffer }
  /** Header of the starting image and of the image after the last change. */
  headerBefore: HeaderFields
  headerAfter: HeaderFields
}

export interface MadeImage {
  imagePath: string
  /** An internal snapshot to keep an eye on. */
  snapshotName?: string
}

export interface Workload {
  name: string
  seed: number
  /** Makes the starting image (and its backing file) in dir. */
  make(tools: QemuTools, dir: string): Promise<MadeImage>
  /** The ops; the runner closes the image afterwards if the workload did not. */
  run(d: Driver): Promise<void>
  /** Throws if the recording does not show what the workload is meant to exercise. */
  exercised(rec: Recording): void
  /** Open options besides read-write (compressed writes). */
  open?: Pick<OpenOptions, 'compress'>
}

// ---- seeded randomness ----

export interface Random {
  /** Uniform in [0, 1). */
  float(): number
  /** Integer in [0, n). */
  int(n: number): number
  /** Integer in [lo, hi]. */
  between(lo: number, hi: number): number
  /** Random bytes (never all zero for length >= 8). */
  bytes(length: number): Buffer
}

export function makeRandom(seed: number): Random {
  let x = seed >>> 0 || 0x9e3779b9
  const next = (): number => {
    x ^= x << 13
    x >>>= 0
    x ^= x >>> 17
    x ^= x << 5
    x >>>= 0
    return x
  }
  const float = (): number => next() / 0x1_0000_0000
  return {
    float,
    int: (n) => Math.floor(float() * n),
    between: (lo, hi) => lo + Math.floor(float() * (hi - lo + 1)),
    bytes: (length) => {
      const out = Buffer.alloc(length)
      let at = 0
      for (; at + 4 <= length; at += 4) out.writeUInt32LE(next(), at)
      for (; at < length; at++) out[at] = next() & 0xff
      if (length >= 8 && out.subarray(0, 8).every((b) => b === 0)) out[0] = 1
      return out
    },
  }
}

// ---- the driver ----

/** Runs ops on the engine and keeps the raw model, the op log and the flush points. */
export class Driver {
  readonly img: Qcow2Image
  readonly file: RecordingFile
  readonly random: Random
  readonly clusterSize: number
  readonly ops: OpRecord[] = []
  readonly flushPoints: FlushPoint[]
  model: Buffer
  #closed = false

  constructor(img: Qcow2Image, file: RecordingFile, initialModel: Buffer, random: Random) {
    this.img = img
    this.file = file
    this.random = random
    this.clusterSize = img.geometry.clusterSize
    this.model = Buffer.from(initialModel)
    this.flushPoints = [{ opCount: 0, change: 0, model: Buffer.from(initialModel), label: 'start' }]
  }

  get size(): number {
    return this.img.virtualSize
  }

  get closed(): boolean {
    return this.#closed
  }

  async #op(what: string, effects: Effect[], step: () => Promise<void>): Promise<void> {
    const startChange = this.file.changeCount
    await step()
    for (const e of effects) {
      if (e.bytes) this.model.set(e.bytes, e.guestOffset)
      else this.model.fill(0, e.guestOffset, e.guestOffset + e.length)
    }
    this.ops.push({ index: this.ops.length, what, startChange, endChange: this.file.changeCount, effects, sizeAfter: this.img.virtualSize })
  }

  /** Writes `data` (random bytes of `length` when a number) at guestOffset. */
  async write(guestOffset: number, data: number | Uint8Array): Promise<void> {
    const bytes = typeof data === 'number' ? this.random.bytes(data) : data
    await this.#op(`write ${guestOffset}+${bytes.length}`, [{ guestOffset, length: bytes.length, bytes }], () => this.img.write(bytes, guestOffset))
  }

  /** A write of zero bytes through write() (the engine's zero detection). */
  async writeZeroData(guestOffset: number, length: number): Promise<void> {
    await this.#op(`zero-data ${guestOffset}+${length}`, [{ guestOffset, length }], () => this.img.write(Buffer.alloc(length), guestOffset))
  }

  async writeZeroes(guestOffset: number, length: number): Promise<void> {
    await this.#op(`zeroes ${guestOffset}+${length}`, [{ guestOffset, length }], () => this.img.writeZeroes(guestOffset, length))
  }

  async resize(requested: number): Promise<void> {
    const oldSize = this.img.virtualSize
    const newSize = Math.ceil(requested / 512) * 512
    // Shrinking drops the tail; growing adds zeros. Both read as zeros if the disk regrows.
    const effects: Effect[] =
      newSize < oldSize ? [{ guestOffset: newSize, length: oldSize - newSize }] : [{ guestOffset: oldSize, length: newSize - oldSize }]
    // A shrink flushes (the smaller size is made durable before mappings go): the checker
    // applies the in-flush ordering rules inside these marks, without the END rule. A grow
    // changes metadata in memory only, like a write.
    const shrink = newSize < oldSize
    if (shrink) this.file.mark('resize-begin')
    await this.#op(`resize ${requested}`, [], () => this.img.resize(requested))
    if (shrink) this.file.mark('resize-end')
    if (this.img.virtualSize !== newSize) throw new Error(`resize ${requested}: virtual size is ${this.img.virtualSize}, expected ${newSize}`)
    const next = Buffer.alloc(newSize)
    this.model.copy(next, 0, 0, Math.min(oldSize, newSize))
    this.model = next
    this.ops[this.ops.length - 1]!.effects = effects
  }

  async flush(label = 'flush'): Promise<void> {
    this.file.mark('flush-begin')
    await this.img.flush()
    this.file.mark('flush-end')
    this.#flushPoint(label)
  }

  async close(): Promise<void> {
    if (this.#closed) return
    this.file.mark('flush-begin')
    await this.img.close()
    this.file.mark('flush-end')
    this.#closed = true
    this.#flushPoint('close')
  }

  #flushPoint(label: string): void {
    this.flushPoints.push({ opCount: this.ops.length, change: this.file.changeCount, model: Buffer.from(this.model), label })
  }

  /**
   * A random write, zero-data write or zero write inside [fromGuestOffset, toGuestOffset)
   * (default: the whole disk), of at most maxBytes, sometimes cluster aligned.
   */
  async randomOp(options: { fromGuestOffset?: number; toGuestOffset?: number; maxBytes: number; zeroShare?: number }): Promise<void> {
    const r = this.random
    const cs = this.clusterSize
    const from = options.fromGuestOffset ?? 0
    const to = Math.min(options.toGuestOffset ?? this.size, this.size)
    const length = Math.min(to - from, r.between(1, options.maxBytes))
    let guestOffset = from + r.int(to - from - length + 1)
    const kind = r.float()
    const zeroShare = options.zeroShare ?? 0.3
    if (kind < zeroShare / 2) {
      await this.writeZeroData(guestOffset, length)
    } else if (kind < zeroShare) {
      // Cluster-aligned zero writes become zero flags / zero subclusters.
      guestOffset = Math.floor(guestOffset / cs) * cs
      const aligned = Math.min(Math.max(cs, Math.floor(length / cs) * cs), to - guestOffset)
      if (guestOffset < from || aligned <= 0) {
        await this.writeZeroes(from, Math.min(to - from, length))
      } else {
        await this.writeZeroes(guestOffset, aligned)
      }
    } else {
      await this.write(guestOffset, length)
    }
  }
}

// ---- running ----

/** Runs a workload on an in-memory copy of its starting image; the image file is not touched. */
export async function recordWorkload(tools: QemuTools, workload: Workload, dir: string): Promise<Recording> {
  const made = await workload.make(tools, dir)
  const imagePath = made.imagePath
  const initialBytes = fs.readFileSync(imagePath)
  const rawPath = path.join(dir, `${path.basename(imagePath)}.start.raw`)
  await convertToRaw(tools, imagePath, rawPath)
  const initialModel = fs.readFileSync(rawPath)
  let snapshot: Recording['snapshot']
  if (made.snapshotName !== undefined) {
    const snapRaw = path.join(dir, `${path.basename(imagePath)}.snapshot.raw`)
    await convertToRaw(tools, imagePath, snapRaw, { snapshot: made.snapshotName })
    snapshot = { name: made.snapshotName, view: fs.readFileSync(snapRaw) }
  }

  const memory = MemoryBlockFile.fromBytes(imagePath, initialBytes)
  const file = new RecordingFile(memory)
  const img = Qcow2Image.openFile(file, imagePath, { readOnly: false, ...workload.open })
  const driver = new Driver(img, file, initialModel, makeRandom(workload.seed))
  try {
    await workload.run(driver)
    await driver.close()
  } finally {
    if (!driver.closed) img.closeSync()
  }
  const finalBytes = memory.bytes()
  const read = (buf: Uint8Array, hostOffset: number): number => {
    if (hostOffset >= finalBytes.length) return 0
    const n = Math.min(buf.length, finalBytes.length - hostOffset)
    buf.set(finalBytes.subarray(hostOffset, hostOffset + n))
    return n
  }
  const recording: Recording = {
    name: workload.name,
    imagePath,
    initialBytes,
    events: file.events,
    changes: file.changes,
    ops: driver.ops,
    flushPoints: driver.flushPoints,
    headerBefore: readHeaderFields((buf, at) => {
      buf.set(initialBytes.subarray(at, at + buf.length))
      return buf.length
    }),
    headerAfter: readHeaderFields(read),
  }
  if (snapshot) recording.snapshot = snapshot
  workload.exercised(recording)
  return recording
}

// ---- the workloads ----

const KiB = 1024
const MiB = 1024 * 1024

function countTag(rec: Recording, tag: string): number {
  return rec.changes.filter((c) => c.kind === 'write' && c.tag === tag).length
}

function need(condition: boolean, rec: Recording, what: string): void {
  if (!condition) throw new Error(`workload '${rec.name}' did not exercise ${what}; its ops need adjusting`)
}

async function create(tools: QemuTools, image: string, options: string[], size: number, backing?: { file: string; format: string }): Promise<void> {
  const args = ['create', '-q', '-f', 'qcow2', '-o', options.join(',')]
  if (backing) args.push('-b', backing.file, '-F', backing.format)
  args.push(image, String(size))
  await qemuImg(tools, args)
}

/** Bytes that differ per 512-byte sector (a backing file whose every sector is recognisable). */
function sectorPattern(length: number): Buffer {
  const bytes = Buffer.alloc(length)
  for (let i = 0; i < length; i += 512) bytes.fill(0x80 + ((i >> 9) % 100), i, Math.min(i + 512, length))
  return bytes
}

export const workloads: Workload[] = [
  {
    name: '64 KiB clusters: writes, zero writes, overwrites',
    seed: 0x6401,
    async make(tools, dir) {
      const image = path.join(dir, 'basic64k.qcow2')
      await create(tools, image, ['cluster_size=65536'], 6 * MiB)
      await qemuIo(tools, image, ['write -P 0x11 0 1M', 'write -P 0x22 3M 640k'])
      return { imagePath: image }
    },
    async run(d) {
      for (let i = 0; i < 110; i++) {
        await d.randomOp({ maxBytes: 150 * KiB, zeroShare: 0.35 })
        if (d.random.float() < 0.3) await d.flush()
      }
    },
    exercised(rec) {
      need(countTag(rec, 'l2') > 0 && countTag(rec, 'refblock') > 0, rec, 'L2 and refcount block updates')
      need(rec.events.some((e, i) => e.kind === 'write' && e.tag === 'refblock' && rec.events.slice(0, i).some((p) => p.kind === 'write' && p.tag === 'l2')), rec, 'refcount writes after L2 writes (deferred decrements)')
    },
  },
  {
    name: '512-byte clusters: new refcount blocks and a refcount table that grows',
    seed: 0x0512,
    async make(tools, dir) {
      const image = path.join(dir, 'small512.qcow2')
      await create(tools, image, ['cluster_size=512'], 10 * MiB)
      // Fill until the file ends just below 8 MiB: the one-cluster refcount table covers
      // 64 blocks x 256 clusters x 512 bytes = 8 MiB, so the workload's allocations must
      // create a refcount block past it and move the table.
      const target = 8 * MiB - 24 * KiB
      let guest = 0
      for (let round = 0; round < 6; round++) {
        const fileSize = fs.statSync(image).size
        if (fileSize >= target - 4 * KiB) break
        const bytes = Math.max(512, Math.floor(((target - fileSize) * 0.97) / 512) * 512)
        await qemuIo(tools, image, [`write -P 0x${(0x30 + round).toString(16)} ${guest} ${bytes}`])
        guest += bytes
      }
      return { imagePath: image }
    },
    async run(d) {
      const filled = 8 * MiB - 200 * KiB
      for (let i = 0; i < 34; i++) {
        const r = d.random.float()
        if (r < 0.6) {
          // Fresh clusters past the filled range: allocation.
          await d.write(filled + 150 * KiB + d.random.int(1700 * KiB), d.random.between(1, 6 * KiB))
        } else if (r < 0.8) {
          // In place, inside the filled range.
          await d.write(d.random.int(filled), d.random.between(1, 3 * KiB))
        } else {
          await d.randomOp({ fromGuestOffset: 0, toGuestOffset: filled, maxBytes: 4 * KiB, zeroShare: 1 })
        }
        if (d.random.float() < 0.25) await d.flush()
      }
    },
    exercised(rec) {
      need(rec.headerAfter.refcountTableOffset !== rec.headerBefore.refcountTableOffset, rec, 'a refcount table move')
      need(rec.headerAfter.refcountTableClusters > rec.headerBefore.refcountTableClusters, rec, 'refcount table growth')
      need(countTag(rec, 'reftable') >= 1, rec, 'refcount table writes')
    },
  },
  {
    name: 'extended L2 over a backing file: subcluster writes and zero subclusters',
    seed: 0xe12,
    async make(tools, dir) {
      const base = path.join(dir, 'extl2-base.qcow2')
      await create(tools, base, ['cluster_size=65536'], 4 * MiB)
      await qemuIo(tools, base, ['write -P 0x5a 0 1536k', 'write -P 0xa5 2M 1M', 'write -z 2304k 64k'])
      const image = path.join(dir, 'extl2-overlay.qcow2')
      await create(tools, image, ['cluster_size=65536', 'extended_l2=on'], 4 * MiB, { file: path.basename(base), format: 'qcow2' })
      await qemuIo(tools, image, ['write -P 0x77 512k 96k', 'write -P 0x78 2500k 3k'])
      return { imagePath: image }
    },
    async run(d) {
      for (let i = 0; i < 160; i++) {
        if (d.random.float() < 0.6) {
          await d.randomOp({ maxBytes: 9 * KiB, zeroShare: 0.35 })
        } else {
          // Whole subclusters (2 KiB), zero or data.
          const sc = 2 * KiB
          const offset = d.random.int(d.size / sc - 8) * sc
          const length = d.random.between(1, 6) * sc
          if (d.random.float() < 0.5) await d.writeZeroes(offset, length)
          else await d.write(offset, length)
        }
        if (d.random.float() < 0.25) await d.flush()
      }
    },
    exercised(rec) {
      need(rec.headerBefore.extendedL2, rec, 'extended L2')
      need(countTag(rec, 'l2') > 0 && countTag(rec, 'data') > 0, rec, 'subcluster data and L2 writes')
    },
  },
  {
    name: 'internal snapshot: COW of shared L2 tables and clusters',
    seed: 0x5ab,
    async make(tools, dir) {
      const image = path.join(dir, 'snapshot.qcow2')
      await create(tools, image, ['cluster_size=4096'], 8 * MiB)
      await qemuIo(tools, image, ['write -P 0x44 0 2M', 'write -P 0x45 3M 2M', 'write -P 0x46 6M 1M'])
      await qemuImg(tools, ['snapshot', '-c', 'before', image])
      return { imagePath: image, snapshotName: 'before' }
    },
    async run(d) {
      for (let i = 0; i < 80; i++) {
        const r = d.random.float()
        if (r < 0.15) {
          // A whole shared cluster to zeros: zero flag, the shared cluster released.
          await d.writeZeroes(d.random.int(d.size / d.clusterSize) * d.clusterSize, d.clusterSize)
        } else {
          await d.randomOp({ maxBytes: 10 * KiB, zeroShare: 0.15 })
        }
        if (d.random.float() < 0.3) await d.flush()
      }
    },
    exercised(rec) {
      need(rec.snapshot !== undefined, rec, 'a snapshot')
      // L2 tables copied away from the snapshot's: the active L1 now points elsewhere.
      const l1Writes = rec.changes.filter((c) => c.kind === 'write' && c.tag === 'l1')
      need(l1Writes.length > 0, rec, 'L1 updates (L2 COW)')
    },
  },
  {
    name: 'compressed clusters (qemu-img convert -c): overwrites and zero writes',
    seed: 0xc0c0,
    async make(tools, dir) {
      const raw = path.join(dir, 'compress-src.raw')
      const bytes = Buffer.alloc(4 * MiB)
      // Compressible but varied: text-like runs with a per-cluster byte mix.
      for (let i = 0; i < bytes.length; i++) bytes[i] = 0x20 + (((i >> 7) * 7 + (i & 0x3f)) % 90)
      bytes.fill(0, 1 * MiB, 1 * MiB + 192 * KiB)
      fs.writeFileSync(raw, bytes)
      const image = path.join(dir, 'compressed.qcow2')
      await qemuImg(tools, ['convert', '-q', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=65536', raw, image])
      return { imagePath: image }
    },
    async run(d) {
      const cs = d.clusterSize
      for (let i = 0; i < 100; i++) {
        const r = d.random.float()
        const cluster = d.random.int(d.size / cs)
        if (r < 0.45) {
          // Part of a compressed cluster: decompress, merge, write a new cluster.
          await d.write(cluster * cs + d.random.int(cs - 4 * KiB), d.random.between(1, 4 * KiB))
        } else if (r < 0.6) {
          await d.writeZeroes(cluster * cs, cs)
        } else if (r < 0.7) {
          await d.writeZeroData(cluster * cs + d.random.int(cs / 2), d.random.between(1, cs / 2))
        } else {
          await d.randomOp({ maxBytes: 100 * KiB, zeroShare: 0.2 })
        }
        if (d.random.float() < 0.3) await d.flush()
      }
    },
    exercised(rec) {
      need(countTag(rec, 'data') > 10, rec, 'rewrites of compressed clusters')
      need(countTag(rec, 'refblock') > 0, rec, 'refcount updates')
    },
  },
  {
    name: 'resize: growing moves the L1 table',
    seed: 0x9e0,
    async make(tools, dir) {
      // 512-byte clusters: an L2 table maps 32 KiB, so small disks have multi-entry L1 tables.
      const image = path.join(dir, 'grow.qcow2')
      await create(tools, image, ['cluster_size=512'], 1 * MiB)
      await qemuIo(tools, image, ['write -P 0x61 0 200k', 'write -P 0x62 900k 124k'])
      return { imagePath: image }
    },
    async run(d) {
      for (let i = 0; i < 12; i++) await d.randomOp({ maxBytes: 3 * KiB })
      await d.flush()
      // 1 MiB -> 3 MiB + 1 KiB: L1 from 32 entries (one cluster) to 97 (two clusters).
      await d.resize(3 * MiB + 1000)
      await d.write(3 * MiB - 1200, 2 * KiB)
      await d.write(1 * MiB - 1 * KiB, 3 * KiB)
      await d.flush()
      for (let i = 0; i < 10; i++) await d.randomOp({ fromGuestOffset: 2 * MiB, maxBytes: 2 * KiB })
      // Twice without a flush in between: the first new table never reaches the disk.
      await d.resize(5 * MiB)
      await d.write(4 * MiB + 3, 2 * KiB)
      await d.resize(8 * MiB)
      await d.write(8 * MiB - 1500, 1500)
      await d.flush()
      for (let i = 0; i < 24; i++) {
        await d.randomOp({ maxBytes: 3 * KiB })
        if (d.random.float() < 0.2) await d.flush()
      }
      // And once more, right before close.
      await d.resize(9 * MiB)
      await d.write(9 * MiB - 4 * KiB, 4 * KiB)
    },
    exercised(rec) {
      need(rec.headerAfter.l1TableOffset !== rec.headerBefore.l1TableOffset, rec, 'an L1 table move')
      need(rec.headerAfter.l1Size >= 256, rec, 'L1 growth to 256 entries')
      need(rec.headerAfter.virtualSize === 9 * MiB, rec, 'the final size')
    },
  },
  {
    name: 'resize: shrinking drops clusters and L2 tables, then grows again',
    seed: 0x5417,
    async make(tools, dir) {
      const image = path.join(dir, 'shrink.qcow2')
      await create(tools, image, ['cluster_size=4096'], 8 * MiB)
      await qemuIo(tools, image, ['write -P 0x71 0 3M', 'write -P 0x72 3M 1M', 'write -P 0x73 4M 4M'])
      return { imagePath: image }
    },
    async run(d) {
      for (let i = 0; i < 30; i++) {
        await d.randomOp({ maxBytes: 8 * KiB })
        if (d.random.float() < 0.2) await d.flush()
      }
      await d.flush()
      // Not on a cluster boundary: the kept part of the last cluster has its tail zeroed.
      await d.resize(3 * MiB + 1000)
      await d.flush()
      await d.write(3 * MiB - 2 * KiB, 3 * KiB)
      await d.resize(6 * MiB)
      await d.write(5 * MiB + 100, 4 * KiB)
      await d.flush()
      for (let i = 0; i < 30; i++) {
        await d.randomOp({ maxBytes: 12 * KiB })
        if (d.random.float() < 0.2) await d.flush()
      }
      // Shrink again with unflushed writes past the new end.
      await d.write(4 * MiB + 5, 2 * KiB)
      await d.resize(2 * MiB + 512)
      await d.flush()
      await d.resize(2 * MiB + 100 * KiB)
      await d.write(2 * MiB + 50 * KiB, 10 * KiB)
    },
    exercised(rec) {
      need(rec.headerAfter.virtualSize === 2 * MiB + 100 * KiB, rec, 'the final size')
      need(countTag(rec, 'l1') > 0, rec, 'L1 entries dropped')
    },
  },
  {
    name: '64-bit refcounts, 512-byte clusters: the refcount table grows from one cluster',
    seed: 0x64,
    async make(tools, dir) {
      // 64-bit refcounts: a 512-byte block holds 64 entries, so the one-cluster table covers
      // 64 x 64 x 512 bytes = 2 MiB of file. Fill until the file ends just below that.
      const image = path.join(dir, 'refcount64.qcow2')
      await create(tools, image, ['cluster_size=512', 'refcount_bits=64'], 4 * MiB)
      const target = 2 * MiB - 16 * KiB
      let guest = 0
      for (let round = 0; round < 6; round++) {
        const fileSize = fs.statSync(image).size
        if (fileSize >= target - 4 * KiB) break
        const bytes = Math.max(512, Math.floor(((target - fileSize) * 0.9) / 512) * 512)
        await qemuIo(tools, image, [`write -P 0x${(0x40 + round).toString(16)} ${guest} ${bytes}`])
        guest += bytes
      }
      return { imagePath: image }
    },
    async run(d) {
      for (let i = 0; i < 40; i++) {
        if (d.random.float() < 0.6) await d.write(2 * MiB + d.random.int(1900 * KiB), d.random.between(1, 4 * KiB))
        else await d.randomOp({ fromGuestOffset: 0, toGuestOffset: 1800 * KiB, maxBytes: 3 * KiB, zeroShare: 0.6 })
        if (d.random.float() < 0.25) await d.flush()
      }
    },
    exercised(rec) {
      need(rec.headerBefore.refcountOrder === 6, rec, '64-bit refcounts')
      need(rec.headerAfter.refcountTableOffset !== rec.headerBefore.refcountTableOffset, rec, 'a refcount table move')
    },
  },
  {
    name: '1-bit refcounts, lazy refcounts and a bitmap: the header is prepared at the first write',
    seed: 0x1a2,
    async make(tools, dir) {
      // The first write clears the bitmap's autoclear bit and sets the dirty bit (lazy
      // refcounts) before anything else reaches the file.
      const image = path.join(dir, 'lazy-bitmap.qcow2')
      await create(tools, image, ['cluster_size=4096', 'refcount_bits=1', 'lazy_refcounts=on'], 4 * MiB)
      await qemuIo(tools, image, ['write -P 0x31 0 1M', 'write -P 0x32 2M 512k'])
      await qemuImg(tools, ['bitmap', '--add', image, 'b0'])
      return { imagePath: image }
    },
    async run(d) {
      for (let i = 0; i < 60; i++) {
        await d.randomOp({ maxBytes: 12 * KiB, zeroShare: 0.5 })
        if (d.random.float() < 0.25) await d.flush()
      }
    },
    exercised(rec) {
      need(rec.headerBefore.refcountOrder === 0, rec, '1-bit refcounts')
      need(rec.changes[0]?.kind === 'write' && rec.changes[0].tag === 'header', rec, 'a header update before the first data write')
    },
  },
  {
    name: 'compat=0.10 over a raw backing file: zeros are written as data',
    seed: 0x2b,
    async make(tools, dir) {
      const base = path.join(dir, 'v2-base.raw')
      fs.writeFileSync(base, Buffer.alloc(3 * MiB, 0x6b))
      const image = path.join(dir, 'v2.qcow2')
      await create(tools, image, ['cluster_size=4096', 'compat=0.10'], 4 * MiB, { file: path.basename(base), format: 'raw' })
      return { imagePath: image }
    },
    async run(d) {
      for (let i = 0; i < 60; i++) {
        await d.randomOp({ maxBytes: 12 * KiB, zeroShare: 0.4 })
        if (d.random.float() < 0.25) await d.flush()
      }
    },
    exercised(rec) {
      need(rec.headerBefore.version === 2, rec, 'a version 2 image')
      need(countTag(rec, 'data') > 20, rec, 'data writes')
    },
  },
  {
    name: 'compressed clusters with extended L2: subcluster zero writes and overwrites',
    seed: 0xc0c1,
    async make(tools, dir) {
      const raw = path.join(dir, 'compress-ext-src.raw')
      const bytes = Buffer.alloc(3 * MiB)
      for (let i = 0; i < bytes.length; i++) bytes[i] = 0x20 + (((i >> 6) * 5 + (i & 0x1f)) % 80)
      fs.writeFileSync(raw, bytes)
      const image = path.join(dir, 'compressed-extl2.qcow2')
      await qemuImg(tools, ['convert', '-q', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=65536,extended_l2=on', raw, image])
      return { imagePath: image }
    },
    async run(d) {
      const cs = d.clusterSize
      const sc = cs / 32
      for (let i = 0; i < 50; i++) {
        const r = d.random.float()
        const cluster = d.random.int(d.size / cs)
        if (r < 0.4) await d.write(cluster * cs + d.random.int(cs - 4 * KiB), d.random.between(1, 4 * KiB))
        else if (r < 0.55) await d.writeZeroes(cluster * cs, cs)
        // Part of a compressed cluster: no subcluster bits to use, so the cluster is rewritten.
        else if (r < 0.7) await d.writeZeroes(cluster * cs + sc * d.random.int(16), sc * d.random.between(1, 8))
        else await d.randomOp({ maxBytes: 40 * KiB, zeroShare: 0.3 })
        if (d.random.float() < 0.3) await d.flush()
      }
    },
    exercised(rec) {
      need(rec.headerBefore.extendedL2, rec, 'extended L2')
      need(countTag(rec, 'data') > 10 && countTag(rec, 'refblock') > 0, rec, 'rewrites of compressed clusters')
    },
  },
  {
    name: 'growing over a larger backing file: the new range reads as zeros',
    seed: 0x6b6,
    async make(tools, dir) {
      const base = path.join(dir, 'grow-base.raw')
      fs.writeFileSync(base, sectorPattern(6 * MiB))
      const image = path.join(dir, 'grow-backing.qcow2')
      await create(tools, image, ['cluster_size=4096'], 2 * MiB, { file: path.basename(base), format: 'raw' })
      await qemuIo(tools, image, ['write -P 0x12 1M 512k'])
      return { imagePath: image }
    },
    async run(d) {
      for (let i = 0; i < 10; i++) await d.randomOp({ maxBytes: 8 * KiB })
      await d.flush()
      // Inside the backing file's range: zero clusters must hide it.
      await d.resize(3 * MiB + 1536)
      for (let i = 0; i < 10; i++) await d.randomOp({ maxBytes: 8 * KiB })
      await d.flush()
      // Past the backing file's end.
      await d.resize(8 * MiB)
      await d.write(7 * MiB + 17, 3 * KiB)
      await d.flush()
      for (let i = 0; i < 12; i++) {
        await d.randomOp({ maxBytes: 8 * KiB })
        if (d.random.float() < 0.3) await d.flush()
      }
    },
    exercised(rec) {
      need(rec.headerAfter.virtualSize === 8 * MiB, rec, 'the final size')
    },
  },
  {
    name: 'shrinking over a larger backing file: dropped clusters must not show the backing file',
    seed: 0x5b6,
    async make(tools, dir) {
      const base = path.join(dir, 'shrink-base.raw')
      fs.writeFileSync(base, sectorPattern(6 * MiB))
      const image = path.join(dir, 'shrink-backing.qcow2')
      await create(tools, image, ['cluster_size=4096'], 4 * MiB, { file: path.basename(base), format: 'raw' })
      await qemuIo(tools, image, ['write -P 0x12 0 4M'])
      return { imagePath: image }
    },
    async run(d) {
      for (let i = 0; i < 8; i++) await d.randomOp({ maxBytes: 8 * KiB })
      await d.flush()
      // Drops part of the first L2 table's clusters and the whole second table.
      await d.resize(1 * MiB + 512)
      await d.flush()
      await d.resize(5 * MiB)
      await d.write(4 * MiB + 17, 3 * KiB)
      await d.flush()
      for (let i = 0; i < 16; i++) {
        await d.randomOp({ maxBytes: 8 * KiB })
        if (d.random.float() < 0.3) await d.flush()
      }
      await d.resize(3 * MiB)
    },
    exercised(rec) {
      need(rec.headerAfter.virtualSize === 3 * MiB, rec, 'the final size')
    },
  },
  {
    name: 'compressed writes (mount -o compress): whole and staged clusters, rewrites, zero writes, a shrink',
    seed: 0xc0c2,
    open: { compress: { stagingBytes: 4 * 65536 } },
    async make(tools, dir) {
      const image = path.join(dir, 'compress-writes.qcow2')
      await create(tools, image, ['cluster_size=65536'], 3 * MiB)
      return { imagePath: image }
    },
    async run(d) {
      const cs = d.clusterSize
      // Compressible and different every time (so every write changes what a cluster holds).
      const text = (length: number): Buffer => {
        const out = Buffer.alloc(length)
        const salt = d.random.between(1, 200)
        for (let i = 0; i < length; i++) out[i] = 0x20 + (((i >> 5) * salt + (i & 0x3f)) % 90)
        return out
      }
      for (let i = 0; i < 40; i++) {
        const r = d.random.float()
        const cluster = d.random.int(d.size / cs)
        if (r < 0.35) {
          await d.write(cluster * cs, text(cs)) // a whole fresh cluster: compressed
        } else if (r < 0.6) {
          // A cluster written 16 KiB at a time: staged, then compressed.
          for (let piece = 0; piece < 4; piece++) await d.write(cluster * cs + piece * 16 * KiB, text(16 * KiB))
        } else if (r < 0.75) {
          await d.write(cluster * cs + d.random.int(cs - 4 * KiB), text(d.random.between(1, 4 * KiB))) // partial: staged or rewrite
        } else if (r < 0.85) {
          await d.writeZeroes(cluster * cs, cs)
        } else {
          await d.randomOp({ maxBytes: 24 * KiB, zeroShare: 0.3 })
        }
        if (d.random.float() < 0.25) await d.flush()
      }
      await d.flush()
      await d.resize(2 * MiB + 512)
      for (let i = 0; i < 6; i++) await d.write(d.random.int(d.size / cs) * cs, text(cs))
    },
    exercised(rec) {
      need(countTag(rec, 'compressed') >= 10, rec, 'compressed-data writes from the compressed-write cache')
    },
  },
]

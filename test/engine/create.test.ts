/*
 * Creating images (lib/engine/create.ts, lib/format/header-write.ts).
 *
 *  - Pure parts: the header encoders parse back with the read side's parsers, the layout
 *    arithmetic (worked by hand for the multi-cluster cases), every option refusal, the write
 *    order, and a round trip through the engine on an in-memory file.
 *  - Against qemu-img, for a matrix of options: the new file is byte for byte what
 *    `qemu-img create` writes with the same options, `qemu-img check` finds nothing,
 *    `qemu-img info --output=json` reports exactly the options; then the image is opened
 *    read-write by our engine, written, closed, checked again, and `qemu-img compare` finds it
 *    equal to a raw model of the same writes.
 *  - Large sizes whose refcount table or blocks need several clusters (our layout, not QEMU's:
 *    QEMU moves its table elsewhere) are checked by qemu-img and written near their end.
 */
import * as fs from 'node:fs'
import * as path from 'node:path'
import { afterAll, beforeAll, describe, expect, test } from 'vitest'
import {
  type CreateOptions,
  type ImagePlan,
  MAX_VIRTUAL_SIZE,
  checkCreateOptions,
  createImage,
  encodeRefcountBlocks,
  planImage,
  planLayout,
  writeImage,
} from '../../lib/engine/create.js'
import { InvalidRequestError, NotFoundError, Qcow2Error } from '../../lib/errors.js'
import {
  EXT_BACKING_FORMAT,
  FEATURE_TYPE_AUTOCLEAR,
  FEATURE_TYPE_COMPATIBLE,
  FEATURE_TYPE_INCOMPATIBLE,
} from '../../lib/format/constants.js'
import { type Qcow2Header, parseBackingFileName, parseHeader, parseHeaderExtensions } from '../../lib/format/header.js'
import {
  KNOWN_FEATURE_NAMES,
  encodeHeader,
  encodeHeaderCluster,
  encodeHeaderExtension,
  encodeStringExtension,
} from '../../lib/format/header-write.js'
import { getRefcount } from '../../lib/format/refcount.js'
import { Qcow2Image } from '../../lib/image.js'
import { type BlockFile, NodeBlockFile, type WriteTag } from '../../lib/io/block-file.js'
import { type QemuTools, makeTempDir, qemuImg as runQemuImg, qemuIo as runQemuIo, removeTempDir, requireQemu } from '../helpers/qemu.js'

const KiB = 1024
const MiB = 1024 * KiB
const GiB = 1024 * MiB
const TiB = 1024 * GiB

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/** A BlockFile in memory that records what is done to it, in order. */
class MemoryFile implements BlockFile {
  readonly path: string
  readonly writable = true
  bytes = new Uint8Array(0)
  readonly ops: string[] = []
  closed = false

  constructor(path: string, initial?: Uint8Array) {
    this.path = path
    if (initial) this.bytes = initial.slice()
  }
  get size(): number {
    return this.bytes.length
  }
  pread(buf: Uint8Array, hostOffset: number): number {
    const n = Math.max(0, Math.min(buf.length, this.bytes.length - hostOffset))
    buf.set(this.bytes.subarray(hostOffset, hostOffset + n))
    return n
  }
  pwrite(buf: Uint8Array, hostOffset: number, tag: WriteTag): void {
    this.ops.push(`write ${tag} ${hostOffset} ${buf.length}`)
    if (hostOffset + buf.length > this.bytes.length) this.#resize(hostOffset + buf.length)
    this.bytes.set(buf, hostOffset)
  }
  sync(): void {
    this.ops.push('sync')
  }
  truncate(size: number): void {
    this.ops.push(`truncate ${size}`)
    this.#resize(size)
  }
  allocatedBytes(): number {
    return this.bytes.length
  }
  close(): void {
    this.closed = true
  }
  #resize(size: number): void {
    const next = new Uint8Array(size)
    next.set(this.bytes.subarray(0, Math.min(size, this.bytes.length)))
    this.bytes = next
  }
}

/** Deterministic bytes for a write (seeded, so a failure can be replayed). */
function pattern(length: number, seed: number): Uint8Array {
  const out = new Uint8Array(length)
  let x = (seed * 2654435761) >>> 0 || 1
  for (let i = 0; i < length; i++) {
    x ^= x << 13
    x >>>= 0
    x ^= x >>> 17
    x ^= x << 5
    x >>>= 0
    out[i] = x & 0xff
  }
  return out
}

/** Creates the file exclusively and writes the image, like the CLI does. */
async function createOnDisk(imagePath: string, options: CreateOptions): Promise<ImagePlan> {
  return createImage(imagePath, options, (p) => {
    fs.writeFileSync(p, new Uint8Array(0), { flag: 'wx' })
    return NodeBlockFile.open(p, { readOnly: false })
  })
}

function headerOf(bytes: Uint8Array): Qcow2Header {
  return parseHeader(bytes.subarray(0, 112))
}

/** Plans an image (no backing file) and writes it into a MemoryFile. */
async function buildInMemory(options: CreateOptions): Promise<{ plan: ImagePlan; file: MemoryFile }> {
  const plan = await planImage('mem.qcow2', options)
  const file = new MemoryFile('mem.qcow2')
  writeImage(file, plan)
  return { plan, file }
}

function expectInvalid(options: CreateOptions, message: RegExp): void {
  let thrown: unknown
  try {
    checkCreateOptions(options)
  } catch (err) {
    thrown = err
  }
  expect(thrown, `options ${JSON.stringify(options)} were accepted`).toBeInstanceOf(InvalidRequestError)
  const text = (thrown as Error).message
  expect(text).toMatch(message)
  expect(text).not.toContain('\n')
}

// ---------------------------------------------------------------------------------------------
// Header encoders
// ---------------------------------------------------------------------------------------------

describe('header encoders', () => {
  const base: Qcow2Header = {
    version: 3,
    backingFileOffset: 0,
    backingFileSize: 0,
    clusterBits: 16,
    virtualSize: 0x1234_5678_9a00,
    cryptMethod: 0,
    l1Size: 0x12345,
    l1TableOffset: 0x0012_3456_0000,
    refcountTableOffset: 0x0007_0000_0000,
    refcountTableClusters: 0x123,
    snapshotCount: 0,
    snapshotsOffset: 0,
    incompatibleFeatures: { hi: 0, lo: 0x18 },
    compatibleFeatures: { hi: 0, lo: 1 },
    autoclearFeatures: { hi: 0, lo: 0 },
    refcountOrder: 5,
    headerLength: 112,
    compressionType: 1,
  }

  test('the fixed header parses back field for field', () => {
    const bytes = encodeHeader(base)
    expect(bytes.length).toBe(112)
    expect(Array.from(bytes.subarray(0, 8))).toEqual([0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 3])
    // compression_type is one byte at 104, followed by 7 bytes of padding
    expect(bytes[104]).toBe(1)
    expect(Array.from(bytes.subarray(105, 112))).toEqual([0, 0, 0, 0, 0, 0, 0])
    expect(parseHeader(bytes)).toEqual(base)
  })

  test('64-bit fields are big-endian with both halves', () => {
    const view = new DataView(encodeHeader(base).buffer)
    expect(view.getUint32(24)).toBe(0x1234) // size, high half
    expect(view.getUint32(28)).toBe(0x5678_9a00)
    expect(view.getUint32(48)).toBe(0x7) // refcount_table_offset, high half
    expect(view.getUint32(52)).toBe(0)
  })

  test('only version 3 with header_length 104 or 112 is written', () => {
    expect(() => encodeHeader({ ...base, version: 2 })).toThrow(InvalidRequestError)
    expect(() => encodeHeader({ ...base, headerLength: 120 })).toThrow(/header_length 120/)
    expect(() => encodeHeader({ ...base, headerLength: 104 })).toThrow(/compression_type needs/)
    expect(encodeHeader({ ...base, headerLength: 104, compressionType: 0, incompatibleFeatures: { hi: 0, lo: 0 } }).length).toBe(104)
  })

  test('extensions are padded to 8 bytes and carry their unpadded length', () => {
    const ext = encodeStringExtension(EXT_BACKING_FORMAT, 'qcow2')
    expect(ext.length).toBe(16)
    const view = new DataView(ext.buffer)
    expect(view.getUint32(0)).toBe(EXT_BACKING_FORMAT)
    expect(view.getUint32(4)).toBe(5)
    expect(new TextDecoder().decode(ext.subarray(8, 13))).toBe('qcow2')
    expect(Array.from(ext.subarray(13))).toEqual([0, 0, 0])
    expect(encodeHeaderExtension(0x1234, new Uint8Array(8)).length).toBe(16)
  })

  test('a header cluster with every extension and a backing name parses back', () => {
    const { bytes, header } = encodeHeaderCluster({
      header: { ...base, clusterBits: 16 },
      extensions: [encodeStringExtension(EXT_BACKING_FORMAT, 'raw'), encodeStringExtension(0x0abcdef0, 'opaque')],
      backingFileName: '../images/base image.raw',
    })
    // 112 header + 16 backing format + 16 unknown + 8 end marker
    expect(header.backingFileOffset).toBe(152)
    expect(header.backingFileSize).toBe('../images/base image.raw'.length)
    expect(bytes.length).toBe(152 + header.backingFileSize)
    expect(Array.from(bytes.subarray(144, 152))).toEqual([0, 0, 0, 0, 0, 0, 0, 0])
    const parsed = parseHeader(bytes)
    expect(parsed).toEqual(header)
    const ext = parseHeaderExtensions(parsed, bytes)
    expect(ext.backingFormat).toBe('raw')
    expect(ext.unknown).toEqual([{ type: 0x0abcdef0, data: new TextEncoder().encode('opaque') }])
    expect(parseBackingFileName(parsed, bytes)).toBe('../images/base image.raw')
  })

  test('the feature name table names every feature bit the engine knows', async () => {
    const { bytes } = encodeHeaderCluster({ header: base, extensions: [] })
    expect(parseHeaderExtensions(parseHeader(bytes), bytes).featureNames).toEqual([])
    const { file } = await buildInMemory({ clusterSize: 65536, virtualSize: GiB })
    const withTable = file.bytes.subarray(0, 65536)
    const ext = parseHeaderExtensions(parseHeader(withTable), withTable)
    expect(ext.featureNames).toEqual(KNOWN_FEATURE_NAMES)
    const byType = (type: number) => ext.featureNames.filter((f) => f.type === type).map((f) => f.bit)
    expect(byType(FEATURE_TYPE_INCOMPATIBLE)).toEqual([0, 1, 2, 3, 4])
    expect(byType(FEATURE_TYPE_COMPATIBLE)).toEqual([0])
    expect(byType(FEATURE_TYPE_AUTOCLEAR)).toEqual([0, 1])
  })

  test('a backing name that does not fit in the header cluster is refused', () => {
    const long = 'b'.repeat(400)
    expect(() => encodeHeaderCluster({ header: { ...base, clusterBits: 9 }, extensions: [], backingFileName: long })).toThrow(
      /need 520 bytes, more than one 512-byte cluster/,
    )
    expect(() => encodeHeaderCluster({ header: base, extensions: [], backingFileName: 'c'.repeat(1024) })).toThrow(/at most 1023/)
    expect(() => encodeHeaderCluster({ header: base, extensions: [], backingFileName: '' })).toThrow(/empty/)
  })
})


// ---------------------------------------------------------------------------------------------
// Layout
// ---------------------------------------------------------------------------------------------

const spec = (clusterSize: number, refcountBits = 16, extendedL2 = false) => ({
  clusterBits: Math.log2(clusterSize),
  refcountOrder: Math.log2(refcountBits),
  extendedL2,
})

describe('layout', () => {
  test('an ordinary disk: refcount table at cluster 1, block at 2, L1 at 3, file ends with the L1 table', () => {
    const layout = planLayout(spec(65536), GiB)
    expect(layout).toEqual({
      clusterSize: 65536,
      virtualSize: GiB,
      refcountTableOffset: 0x10000,
      refcountTableClusters: 1,
      refcountBlocksOffset: 0x20000,
      refcountBlockCount: 1,
      l1TableOffset: 0x30000,
      l1Size: 2, // one L2 table maps 512 MiB
      usedClusters: 4,
      fileLength: 0x30000 + 16,
    })
  })

  test('extended L2 entries halve what an L2 table maps', () => {
    expect(planLayout(spec(65536, 16, true), GiB).l1Size).toBe(4)
    expect(planLayout(spec(16384, 16, true), 3 * GiB).l1Size).toBe(3 * GiB / ((16384 / 16) * 16384))
  })

  test('a disk of size 0 has no L1 table', () => {
    const layout = planLayout(spec(65536), 0)
    expect(layout.l1Size).toBe(0)
    expect(layout.l1TableOffset).toBe(0)
    expect(layout.usedClusters).toBe(3)
    expect(layout.fileLength).toBe(3 * 65536)
  })

  // Worked by hand. 128 GiB with 512-byte clusters: an L2 table maps 64 * 512 = 32 KiB, so the
  // L1 table has 4 Mi entries = 32 MiB = 65536 clusters (QEMU's largest L1 table).
  test('128G with 512-byte clusters and 16-bit refcounts: 258 blocks, a 5-cluster table', () => {
    // 256 refcounts per block, 64 block offsets per table cluster. Start 1 table + 1 block:
    // 65539 clusters -> 257 blocks -> 5 table clusters -> 65800 clusters -> 258 blocks -> 65800.
    const layout = planLayout(spec(512), 128 * GiB)
    expect(layout.l1Size).toBe(4 * 1024 * 1024)
    expect(layout.refcountTableClusters).toBe(5)
    expect(layout.refcountBlockCount).toBe(258)
    expect(layout.refcountBlocksOffset).toBe(6 * 512)
    expect(layout.l1TableOffset).toBe(264 * 512)
    expect(layout.usedClusters).toBe(65800)
    expect(layout.fileLength).toBe(264 * 512 + 32 * MiB)
  })

  test('128G with 512-byte clusters and 64-bit refcounts: 1041 blocks, a 17-cluster table', () => {
    // 64 refcounts per block: 65539 -> 1025 blocks, 17 table clusters -> 66579 -> 1041 -> 66595.
    const layout = planLayout(spec(512, 64), 128 * GiB)
    expect(layout.refcountTableClusters).toBe(17)
    expect(layout.refcountBlockCount).toBe(1041)
    expect(layout.usedClusters).toBe(66595)
    expect(layout.fileLength).toBe((1 + 17 + 1041) * 512 + 32 * MiB)
  })

  test('128G with 512-byte clusters and 1-bit refcounts: 17 blocks in a 1-cluster table', () => {
    // 4096 refcounts per block: 65539 -> 17 blocks -> 65555 -> 17.
    const layout = planLayout(spec(512, 1), 128 * GiB)
    expect(layout.refcountTableClusters).toBe(1)
    expect(layout.refcountBlockCount).toBe(17)
    expect(layout.l1TableOffset).toBe(19 * 512)
  })

  test('every cluster size and refcount width: enough refcount blocks and table, none to spare', () => {
    for (let clusterBits = 9; clusterBits <= 21; clusterBits++) {
      const clusterSize = 2 ** clusterBits
      const coverage = (clusterSize / 8) * clusterSize
      const largest = Math.min(4 * 1024 * 1024 * coverage, MAX_VIRTUAL_SIZE)
      for (let order = 0; order <= 6; order++) {
        for (const size of [0, 512, GiB, Math.floor(largest / 3 / 512) * 512, largest]) {
          const l = planLayout({ clusterBits, refcountOrder: order, extendedL2: false }, size)
          const where = `cluster ${clusterSize}, ${2 ** order}-bit refcounts, size ${size}`
          const perBlock = (clusterSize * 8) / 2 ** order
          const perTableCluster = clusterSize / 8
          const l1Clusters = Math.ceil((l.l1Size * 8) / clusterSize)
          expect(l.l1Size, where).toBe(Math.ceil(size / coverage))
          expect(l.usedClusters, where).toBe(1 + l.refcountTableClusters + l.refcountBlockCount + l1Clusters)
          expect(l.refcountBlockCount * perBlock, where).toBeGreaterThanOrEqual(l.usedClusters)
          expect((l.refcountBlockCount - 1) * perBlock, where).toBeLessThan(l.usedClusters)
          expect(l.refcountTableClusters * perTableCluster, where).toBeGreaterThanOrEqual(l.refcountBlockCount)
          expect((l.refcountTableClusters - 1) * perTableCluster, where).toBeLessThan(l.refcountBlockCount)
          expect(l.refcountTableOffset, where).toBe(clusterSize)
          expect(l.refcountBlocksOffset, where).toBe((1 + l.refcountTableClusters) * clusterSize)
          const afterBlocks = l.refcountBlocksOffset + l.refcountBlockCount * clusterSize
          expect(l.l1TableOffset, where).toBe(l.l1Size > 0 ? afterBlocks : 0)
          expect(l.fileLength, where).toBe(afterBlocks + l.l1Size * 8)
        }
      }
    }
  })

  test('sizes one L1 cluster apart cross every refcount block and table boundary', () => {
    // 512-byte clusters: one L1 cluster holds 64 entries = 2 MiB of disk. Stepping the size by
    // 2 MiB adds one used cluster at a time, so the used count passes every multiple of the
    // refcount block capacity (256 16-bit entries, 4096 1-bit, 64 64-bit ...).
    for (let order = 0; order <= 6; order++) {
      const perBlock = (512 * 8) / 2 ** order
      for (let l1Clusters = 0; l1Clusters <= 3 * 4096; l1Clusters += order === 0 ? 1 : 3) {
        const l = planLayout(spec(512, 2 ** order), l1Clusters * 2 * MiB)
        const where = `${2 ** order}-bit refcounts, ${l1Clusters} L1 clusters`
        expect(l.usedClusters, where).toBe(1 + l.refcountTableClusters + l.refcountBlockCount + l1Clusters)
        expect(l.refcountBlockCount * perBlock, where).toBeGreaterThanOrEqual(l.usedClusters)
        expect((l.refcountBlockCount - 1) * perBlock, where).toBeLessThan(l.usedClusters)
        expect(l.refcountTableClusters * 64, where).toBeGreaterThanOrEqual(l.refcountBlockCount)
      }
    }
  })

  test('a size whose L1 table would pass 32 MiB is refused: 16T with 512-byte clusters', () => {
    expect(() => planLayout(spec(512), 16 * TiB)).toThrow(InvalidRequestError)
    expect(() => planLayout(spec(512), 16 * TiB)).toThrow(/L1 table of 4294967296 bytes.*use a larger cluster size/)
    // One L2 table's worth less than the limit is fine, one more is not.
    expect(planLayout(spec(512), 128 * GiB).l1Size * 8).toBe(32 * MiB)
    expect(() => planLayout(spec(512), 128 * GiB + 512)).toThrow(/L1 table/)
  })
})

// ---------------------------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------------------------

describe('option checks', () => {
  test('defaults: 64K clusters, 16-bit refcounts, zlib, no extended L2, no lazy refcounts', () => {
    expect(checkCreateOptions({ virtualSize: 1000 })).toEqual({
      clusterBits: 16,
      extendedL2: false,
      refcountOrder: 4,
      compressionType: 0,
      lazyRefcounts: false,
      virtualSize: 1024,
      backingFile: undefined,
      backingFormat: undefined,
    })
  })

  test('sizes are rounded up to 512 bytes', () => {
    expect(checkCreateOptions({ virtualSize: 0 }).virtualSize).toBe(0)
    expect(checkCreateOptions({ virtualSize: 1 }).virtualSize).toBe(512)
    expect(checkCreateOptions({ virtualSize: 512 }).virtualSize).toBe(512)
    expect(checkCreateOptions({ virtualSize: 513 }).virtualSize).toBe(1024)
    expect(checkCreateOptions({ virtualSize: MAX_VIRTUAL_SIZE, clusterSize: 2 * MiB }).virtualSize).toBe(MAX_VIRTUAL_SIZE)
  })

  test('every bad option is refused with a one-line message naming it', () => {
    for (const clusterSize of [0, 256, 1000, 4 * MiB, 1.5]) {
      expectInvalid({ virtualSize: GiB, clusterSize }, /cluster size must be a (power of two between 512 and 2M|whole number)/)
    }
    for (const refcountBits of [0, 3, 128, 2.5]) {
      expectInvalid({ virtualSize: GiB, refcountBits }, /refcount (width must be a power of two and at most 64 bits|bits must be a whole number)/)
    }
    expectInvalid({ virtualSize: GiB, compressionType: 'lz4' }, /compression type must be zlib or zstd \(got 'lz4'\)/)
    expectInvalid({ virtualSize: GiB, extendedL2: true, clusterSize: 8192 }, /extended L2 entries are only supported with cluster sizes of at least 16384 bytes/)
    expectInvalid({ virtualSize: GiB, backingFormat: 'raw' }, /backing format needs a backing file/)
    expectInvalid({ virtualSize: GiB, backingFile: 'b.img', backingFormat: 'vmdk' }, /backing format 'vmdk' is not supported/)
    expectInvalid({ backingFile: '' }, /backing file name is empty/)
    expectInvalid({}, /size is needed/)
    expectInvalid({ virtualSize: -512 }, /size must be a whole number of bytes/)
    expectInvalid({ virtualSize: 1.5 }, /size must be a whole number of bytes/)
    expectInvalid({ virtualSize: MAX_VIRTUAL_SIZE + 1, clusterSize: 2 * MiB }, /too large/)
    expectInvalid({ virtualSize: 16 * TiB, clusterSize: 512 }, /L1 table.*larger cluster size/)
    expectInvalid({ virtualSize: GiB, clusterSize: 512, backingFile: 'n'.repeat(400) }, /backing file name \(400 bytes\).*512-byte cluster/)
    expectInvalid({ virtualSize: GiB, backingFile: 'n'.repeat(1024) }, /at most 1023/)
  })

  test('a bad option creates nothing: the file opener is never called', async () => {
    const opened: string[] = []
    const openNew = (p: string): BlockFile => {
      opened.push(p)
      return new MemoryFile(p)
    }
    await expect(createImage('x.qcow2', { virtualSize: GiB, clusterSize: 1000 }, openNew)).rejects.toThrow(InvalidRequestError)
    await expect(createImage('x.qcow2', { virtualSize: GiB, backingFile: 'no-such-backing-file.raw' }, openNew)).rejects.toThrow(NotFoundError)
    expect(opened).toEqual([])
  })
})

// ---------------------------------------------------------------------------------------------
// Writing (in memory)
// ---------------------------------------------------------------------------------------------

describe('writing an image', () => {
  test('order: file length, refcount blocks, refcount table, sync, header last, sync', async () => {
    const { plan, file } = await buildInMemory({ virtualSize: GiB })
    expect(file.ops).toEqual([
      `truncate ${0x30010}`,
      `write refblock ${0x20000} 8`, // four 16-bit refcounts
      `write reftable ${0x10000} 8`,
      'sync',
      `write header 0 ${plan.headerBytes.length}`,
      'sync',
    ])
    expect(file.size).toBe(0x30010)
  })

  test('refcount 1 for every used cluster, 0 past them, for every refcount width', async () => {
    for (let order = 0; order <= 6; order++) {
      // 512-byte clusters and 40 GiB: a 10 MiB L1 table, several refcount blocks for most widths
      const { plan, file } = await buildInMemory({ virtualSize: 40 * GiB, clusterSize: 512, refcountBits: 2 ** order })
      const { layout } = plan
      const blocks = file.bytes.subarray(layout.refcountBlocksOffset, layout.refcountBlocksOffset + layout.refcountBlockCount * 512)
      const perBlock = (512 * 8) / 2 ** order
      for (let cluster = 0; cluster < layout.refcountBlockCount * perBlock; cluster++) {
        const want = cluster < layout.usedClusters ? 1 : 0
        if (getRefcount(blocks, cluster, order) !== want) {
          throw new Error(`${2 ** order}-bit refcounts: cluster ${cluster} has refcount ${getRefcount(blocks, cluster, order)}, want ${want}`)
        }
      }
      const table = new DataView(file.bytes.buffer, layout.refcountTableOffset, layout.refcountTableClusters * 512)
      for (let i = 0; i < layout.refcountTableClusters * 64; i++) {
        const want = i < layout.refcountBlockCount ? layout.refcountBlocksOffset + i * 512 : 0
        expect(table.getUint32(i * 8) * 2 ** 32 + table.getUint32(i * 8 + 4)).toBe(want)
      }
      expect(encodeRefcountBlocks(layout, order).length).toBe(Math.ceil((layout.usedClusters * 2 ** order) / 8))
    }
  })

  test('the header has exactly the options asked for', async () => {
    const { file } = await buildInMemory({ virtualSize: 5 * GiB, clusterSize: 16384, extendedL2: true, compressionType: 'zstd', refcountBits: 2, lazyRefcounts: true })
    const h = headerOf(file.bytes)
    expect(h.clusterBits).toBe(14)
    expect(h.virtualSize).toBe(5 * GiB)
    expect(h.refcountOrder).toBe(1)
    expect(h.compressionType).toBe(1)
    expect(h.incompatibleFeatures).toEqual({ hi: 0, lo: (1 << 3) | (1 << 4) })
    expect(h.compatibleFeatures).toEqual({ hi: 0, lo: 1 })
    expect(h.autoclearFeatures).toEqual({ hi: 0, lo: 0 })
    expect(h.headerLength).toBe(112)
    expect(h.backingFileOffset).toBe(0)
    expect(h.snapshotCount).toBe(0)
    // with 16K clusters the feature name table is there; with 4K it is not (as QEMU)
    expect(parseHeaderExtensions(h, file.bytes.subarray(0, 16384)).featureNames.length).toBe(8)
    const small = (await buildInMemory({ virtualSize: GiB, clusterSize: 4096 })).file.bytes
    expect(parseHeaderExtensions(headerOf(small), small.subarray(0, 4096)).featureNames).toEqual([])
  })

  test('only an empty file is written into', async () => {
    const { plan } = await buildInMemory({ virtualSize: GiB })
    const file = new MemoryFile('full.qcow2', new Uint8Array(10))
    expect(() => writeImage(file, plan)).toThrow(/not empty/)
    expect(file.ops).toEqual([])
  })

  test('the new image opens read-write in the engine: write, read back, reopen', async () => {
    const { file } = await buildInMemory({ virtualSize: 3 * MiB + 512, clusterSize: 4096, refcountBits: 4 })
    const img = Qcow2Image.openFile(file, 'mem.qcow2', { readOnly: false })
    expect(img.virtualSize).toBe(3 * MiB + 512)
    const data = pattern(10000, 1)
    await img.write(data, 12345)
    const tail = pattern(512, 2)
    await img.write(tail, 3 * MiB)
    const back = new Uint8Array(10000)
    await img.read(back, 12345)
    expect(Buffer.from(back).equals(Buffer.from(data))).toBe(true)
    await img.close()
    const again = Qcow2Image.openFile(new MemoryFile('mem.qcow2', file.bytes), 'mem.qcow2', { readOnly: true })
    const before = new Uint8Array(12345 + 10000 + 100)
    await again.read(before, 0)
    expect(before.subarray(0, 12345).every((b) => b === 0)).toBe(true)
    expect(Buffer.from(before.subarray(12345, 22345)).equals(Buffer.from(data))).toBe(true)
    expect(before.subarray(22345).every((b) => b === 0)).toBe(true)
    const lastSector = new Uint8Array(512)
    await again.read(lastSector, 3 * MiB)
    expect(Buffer.from(lastSector).equals(Buffer.from(tail))).toBe(true)
    await again.close()
  })
})

// ---------------------------------------------------------------------------------------------
// Against qemu-img
// ---------------------------------------------------------------------------------------------

const qemu = requireQemu('qcow2fs create against qemu-img')
const describeQemu = describe.skipIf(!qemu)
const qemuImg = (args: string[], cwd?: string): Promise<string> => runQemuImg(qemu as QemuTools, args, cwd === undefined ? {} : { cwd })
const qemuIo = (image: string, commands: string[]): Promise<string> => runQemuIo(qemu as QemuTools, image, commands)

/** `qemu-img check` must exit 0 and report no errors, corruptions or leaks. */
async function expectCleanCheck(image: string): Promise<void> {
  const report = JSON.parse(await qemuImg(['check', '--output=json', image])) as Record<string, unknown>
  expect(report['check-errors'], `qemu-img check ${image}`).toBe(0)
  expect(report.corruptions ?? 0, `qemu-img check ${image}`).toBe(0)
  expect(report.leaks ?? 0, `qemu-img check ${image}`).toBe(0)
}

function firstDifference(a: Uint8Array, b: Uint8Array): string {
  const n = Math.min(a.length, b.length)
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return `first difference at byte ${i} (0x${i.toString(16)}): ours ${a[i]}, qemu-img ${b[i]}`
  return a.length === b.length ? 'identical' : `lengths differ: ours ${a.length}, qemu-img ${b.length}`
}

interface MatrixCase {
  name: string
  options: CreateOptions
  /** Options for `qemu-img create -f qcow2` that make the same image. */
  qemuArgs: string[]
  /** The size argument for qemu-img, if any. */
  qemuSize?: string
  /** Virtual size the image must get. */
  expectedSize: number
  /** The backing file (relative to the case directory) and its format, if any. */
  backing?: { name: string; format: 'qcow2' | 'raw' }
}

const BASE_RAW_BYTES = 3 * MiB + 1000 // not a multiple of 512: the overlay rounds up
const BASE_QCOW2_SIZE = 5 * MiB

const matrix: MatrixCase[] = [
  { name: 'defaults', options: { virtualSize: GiB }, qemuArgs: [], qemuSize: String(GiB), expectedSize: GiB },
  { name: '512-byte clusters', options: { virtualSize: 64 * MiB, clusterSize: 512 }, qemuArgs: ['-o', 'cluster_size=512'], qemuSize: '64M', expectedSize: 64 * MiB },
  { name: '4K clusters, 8-bit refcounts', options: { virtualSize: 100 * MiB, clusterSize: 4096, refcountBits: 8 }, qemuArgs: ['-o', 'cluster_size=4096,refcount_bits=8'], qemuSize: '100M', expectedSize: 100 * MiB },
  { name: '2M clusters, 100G', options: { virtualSize: 100 * GiB, clusterSize: 2 * MiB }, qemuArgs: ['-o', 'cluster_size=2M'], qemuSize: '100G', expectedSize: 100 * GiB },
  { name: 'extended L2', options: { virtualSize: GiB, extendedL2: true }, qemuArgs: ['-o', 'extended_l2=on'], qemuSize: '1G', expectedSize: GiB },
  { name: 'extended L2 with 16K clusters', options: { virtualSize: 3 * GiB, extendedL2: true, clusterSize: 16384 }, qemuArgs: ['-o', 'extended_l2=on,cluster_size=16K'], qemuSize: '3G', expectedSize: 3 * GiB },
  { name: 'zstd', options: { virtualSize: GiB, compressionType: 'zstd' }, qemuArgs: ['-o', 'compression_type=zstd'], qemuSize: '1G', expectedSize: GiB },
  { name: '1-bit refcounts', options: { virtualSize: GiB, refcountBits: 1 }, qemuArgs: ['-o', 'refcount_bits=1'], qemuSize: '1G', expectedSize: GiB },
  { name: '2-bit refcounts, 1K clusters', options: { virtualSize: 50 * MiB, refcountBits: 2, clusterSize: 1024 }, qemuArgs: ['-o', 'refcount_bits=2,cluster_size=1024'], qemuSize: '50M', expectedSize: 50 * MiB },
  { name: '4-bit refcounts', options: { virtualSize: GiB, refcountBits: 4 }, qemuArgs: ['-o', 'refcount_bits=4'], qemuSize: '1G', expectedSize: GiB },
  { name: '32-bit refcounts', options: { virtualSize: GiB, refcountBits: 32 }, qemuArgs: ['-o', 'refcount_bits=32'], qemuSize: '1G', expectedSize: GiB },
  { name: '64-bit refcounts, 4K clusters', options: { virtualSize: GiB, refcountBits: 64, clusterSize: 4096 }, qemuArgs: ['-o', 'refcount_bits=64,cluster_size=4096'], qemuSize: '1G', expectedSize: GiB },
  { name: 'lazy refcounts', options: { virtualSize: GiB, lazyRefcounts: true }, qemuArgs: ['-o', 'lazy_refcounts=on'], qemuSize: '1G', expectedSize: GiB },
  {
    name: 'everything at once',
    options: { virtualSize: 7 * GiB + 1, clusterSize: 32768, extendedL2: true, compressionType: 'zstd', refcountBits: 8, lazyRefcounts: true },
    qemuArgs: ['-o', 'cluster_size=32K,extended_l2=on,compression_type=zstd,refcount_bits=8,lazy_refcounts=on'],
    qemuSize: String(7 * GiB + 1),
    expectedSize: 7 * GiB + 512,
  },
  { name: 'size 0', options: { virtualSize: 0 }, qemuArgs: [], qemuSize: '0', expectedSize: 0 },
  { name: 'size 1000 rounds up to 1024', options: { virtualSize: 1000 }, qemuArgs: [], qemuSize: '1000', expectedSize: 1024 },
  {
    name: 'raw backing file, format probed, size from it (rounded up)',
    options: { backingFile: '../base.raw' },
    qemuArgs: ['-b', '../base.raw', '-F', 'raw'],
    expectedSize: Math.ceil(BASE_RAW_BYTES / 512) * 512,
    backing: { name: '../base.raw', format: 'raw' },
  },
  {
    name: 'qcow2 backing file, format probed, size from it',
    options: { backingFile: '../base.qcow2' },
    qemuArgs: ['-b', '../base.qcow2', '-F', 'qcow2'],
    expectedSize: BASE_QCOW2_SIZE,
    backing: { name: '../base.qcow2', format: 'qcow2' },
  },
  {
    name: 'qcow2 backing file, format given, larger size, 512-byte clusters',
    options: { backingFile: '../base.qcow2', backingFormat: 'qcow2', virtualSize: 9 * MiB, clusterSize: 512 },
    qemuArgs: ['-b', '../base.qcow2', '-F', 'qcow2', '-o', 'cluster_size=512'],
    qemuSize: '9M',
    expectedSize: 9 * MiB,
    backing: { name: '../base.qcow2', format: 'qcow2' },
  },
  {
    name: 'raw backing file given as raw, smaller size, extended L2',
    options: { backingFile: '../base.raw', backingFormat: 'raw', virtualSize: MiB, extendedL2: true },
    qemuArgs: ['-b', '../base.raw', '-F', 'raw', '-o', 'extended_l2=on'],
    qemuSize: '1M',
    expectedSize: MiB,
    backing: { name: '../base.raw', format: 'raw' },
  },
  {
    name: 'backing file in the same directory',
    options: { backingFile: 'sibling.raw', virtualSize: 2 * MiB },
    qemuArgs: ['-b', 'sibling.raw', '-F', 'raw'],
    qemuSize: '2M',
    expectedSize: 2 * MiB,
    backing: { name: 'sibling.raw', format: 'raw' },
  },
]

/** The `qemu-img info --output=json` an image made with these options must have. */
function expectedInfo(c: MatrixCase): Record<string, unknown> {
  const o = c.options
  const info: Record<string, unknown> = {
    'virtual-size': c.expectedSize,
    'cluster-size': o.clusterSize ?? 65536,
    format: 'qcow2',
    'format-specific': {
      type: 'qcow2',
      data: {
        compat: '1.1',
        'compression-type': o.compressionType ?? 'zlib',
        'lazy-refcounts': o.lazyRefcounts === true,
        'refcount-bits': o.refcountBits ?? 16,
        corrupt: false,
        'extended-l2': o.extendedL2 === true,
      },
    },
    'dirty-flag': false,
  }
  if (c.backing) {
    info['backing-filename'] = c.backing.name
    info['backing-filename-format'] = c.backing.format
  }
  return info
}

/** Ranges to write: start, a run across a cluster boundary, the last bytes (when they exist). */
function writeRanges(size: number, clusterSize: number): { offset: number; length: number }[] {
  if (size === 0) return []
  const ranges = [{ offset: 0, length: Math.min(size, 5000) }]
  const crossing = 3 * clusterSize - 100
  if (crossing + clusterSize + 300 <= size) ranges.push({ offset: crossing, length: clusterSize + 300 })
  if (size > 5000 + 700) ranges.push({ offset: size - 700, length: 700 })
  return ranges
}

let dir = ''

describeQemu('create against qemu-img', () => {
  beforeAll(async () => {
    dir = await makeTempDir('create-engine')
    const raw = new Uint8Array(BASE_RAW_BYTES)
    for (let i = 0; i < raw.length; i += 4096) raw.fill(((i / 4096) * 7 + 1) & 0xff, i, Math.min(i + 4096, raw.length))
    fs.writeFileSync(path.join(dir, 'base.raw'), raw)
    const baseQcow2 = path.join(dir, 'base.qcow2')
    await qemuImg(['create', '-q', '-f', 'qcow2', baseQcow2, String(BASE_QCOW2_SIZE)])
    await qemuIo(baseQcow2, ['write -P 0x5a 0 1M', 'write -P 0xa5 3M 512k', `write -P 0x11 ${BASE_QCOW2_SIZE - 4096} 4096`])
  })
  afterAll(async () => {
    if (dir) await removeTempDir(dir)
  })

  test.each(matrix)('$name', async (c) => {
    const caseDir = path.join(dir, c.name.replace(/[^a-z0-9]+/gi, '-'))
    fs.mkdirSync(caseDir)
    if (c.backing?.name === 'sibling.raw') fs.writeFileSync(path.join(caseDir, 'sibling.raw'), pattern(MiB + 300, 9))
    const ours = path.join(caseDir, 'ours.qcow2')
    const theirs = path.join(caseDir, 'qemu.qcow2')
    const plan = await createOnDisk(ours, c.options)
    await qemuImg(['create', '-q', '-f', 'qcow2', ...c.qemuArgs, theirs, ...(c.qemuSize === undefined ? [] : [c.qemuSize])], caseDir)
    expect(plan.layout.virtualSize).toBe(c.expectedSize)

    // Byte for byte what qemu-img writes.
    const ourBytes = fs.readFileSync(ours)
    const theirBytes = fs.readFileSync(theirs)
    expect(firstDifference(ourBytes, theirBytes)).toBe('identical')

    await expectCleanCheck(ours)
    const info = JSON.parse(await qemuImg(['info', '--output=json', ours])) as Record<string, unknown>
    const { filename, 'actual-size': actualSize, 'full-backing-filename': fullBacking, ...rest } = info
    expect(filename).toBe(ours)
    expect(typeof actualSize).toBe('number')
    expect(rest).toEqual(expectedInfo(c))
    if (c.backing) {
      expect(path.resolve(String(fullBacking))).toBe(path.resolve(caseDir, c.backing.name))
      // The name in the header is the one given, still relative.
      const header = parseHeader(ourBytes)
      expect(parseBackingFileName(header, ourBytes)).toBe(c.backing.name)
      expect(parseHeaderExtensions(header, ourBytes.subarray(0, plan.layout.clusterSize)).backingFormat).toBe(c.backing.format)
    } else {
      expect(fullBacking).toBeUndefined()
    }

    // Round trip through the engine, against a raw model made of the backing file's bytes.
    const model = path.join(caseDir, 'model.raw')
    if (c.backing) {
      await qemuImg(['convert', '-f', c.backing.format, '-O', 'raw', path.resolve(caseDir, c.backing.name), model])
    } else {
      fs.writeFileSync(model, new Uint8Array(0))
    }
    fs.truncateSync(model, c.expectedSize)
    const img = await Qcow2Image.open(ours, { readOnly: false })
    expect(img.virtualSize).toBe(c.expectedSize)
    const modelFd = fs.openSync(model, 'r+')
    try {
      let seed = 100
      for (const r of writeRanges(c.expectedSize, plan.layout.clusterSize)) {
        const data = pattern(r.length, seed++)
        fs.writeSync(modelFd, data, 0, data.length, r.offset)
        await img.write(data, r.offset)
      }
      await img.flush()
    } finally {
      fs.closeSync(modelFd)
      await img.close()
    }
    await expectCleanCheck(ours)
    await qemuImg(['compare', '-f', 'qcow2', '-F', 'raw', ours, model])

    // And the engine reads back what qemu-img agrees on.
    const reopened = await Qcow2Image.open(ours, { readOnly: true })
    try {
      const length = Math.min(c.expectedSize, 4 * MiB)
      const got = new Uint8Array(length)
      await reopened.read(got, 0)
      const want = new Uint8Array(length)
      const fd = fs.openSync(model, 'r')
      fs.readSync(fd, want, 0, length, 0)
      fs.closeSync(fd)
      expect(firstDifference(got, want)).toBe('identical')
    } finally {
      await reopened.close()
    }
  })

  test('a missing backing file is refused and nothing is created', async () => {
    const image = path.join(dir, 'orphan.qcow2')
    await expect(createOnDisk(image, { backingFile: 'missing.raw' })).rejects.toThrow(/backing file 'missing.raw'.*not found/)
    expect(fs.existsSync(image)).toBe(false)
  })

  test('a backing file given as qcow2 that is not one is refused and nothing is created', async () => {
    const image = path.join(dir, 'wrong-format.qcow2')
    await expect(createOnDisk(image, { backingFile: 'base.raw', backingFormat: 'qcow2' })).rejects.toThrow(/not a qcow2 image/)
    expect(fs.existsSync(image)).toBe(false)
  })

  test('a qcow2 backing file whose own backing file is missing is refused', async () => {
    const sub = path.join(dir, 'broken-chain')
    fs.mkdirSync(sub)
    fs.writeFileSync(path.join(sub, 'gone.raw'), new Uint8Array(4096))
    await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'gone.raw', '-F', 'raw', path.join(sub, 'middle.qcow2')])
    fs.rmSync(path.join(sub, 'gone.raw'))
    const image = path.join(sub, 'top.qcow2')
    await expect(createOnDisk(image, { backingFile: 'middle.qcow2' })).rejects.toThrow(/gone\.raw/)
    expect(fs.existsSync(image)).toBe(false)
  })

  test('the backing name is kept as given, and qemu-img finds it from another working directory', async () => {
    const sub = path.join(dir, 'nested', 'deeper')
    fs.mkdirSync(sub, { recursive: true })
    const image = path.join(sub, 'top.qcow2')
    await createOnDisk(image, { backingFile: '../../base.qcow2' })
    const bytes = fs.readFileSync(image)
    expect(parseBackingFileName(parseHeader(bytes), bytes)).toBe('../../base.qcow2')
    // qemu-io run from the test's working directory resolves the name against the image's.
    await qemuIo(image, ['read -P 0x5a 0 1M', 'read -P 0xa5 3M 512k', 'read -P 0 2M 1M'])
  })
})

// ---------------------------------------------------------------------------------------------
// Large sizes
// ---------------------------------------------------------------------------------------------

interface LargeCase {
  name: string
  options: CreateOptions & { virtualSize: number }
  refcountTableClusters: number
  refcountBlockCount: number
}

const large: LargeCase[] = [
  { name: '128G, 512-byte clusters, 16-bit refcounts', options: { virtualSize: 128 * GiB, clusterSize: 512 }, refcountTableClusters: 5, refcountBlockCount: 258 },
  { name: '128G, 512-byte clusters, 64-bit refcounts', options: { virtualSize: 128 * GiB, clusterSize: 512, refcountBits: 64 }, refcountTableClusters: 17, refcountBlockCount: 1041 },
  { name: '128G, 512-byte clusters, 1-bit refcounts', options: { virtualSize: 128 * GiB, clusterSize: 512, refcountBits: 1 }, refcountTableClusters: 1, refcountBlockCount: 17 },
  // 512-byte clusters: each 2 MiB of disk is one L1 cluster. 508 L1 clusters + header + table
  // + 2 blocks = 512 clusters: both blocks exactly full. One L1 cluster more needs a third.
  { name: '1016M, 512-byte clusters: two refcount blocks exactly full', options: { virtualSize: 1016 * MiB, clusterSize: 512 }, refcountTableClusters: 1, refcountBlockCount: 2 },
  { name: '1018M, 512-byte clusters: a third block for two more clusters', options: { virtualSize: 1018 * MiB, clusterSize: 512 }, refcountTableClusters: 1, refcountBlockCount: 3 },
  { name: '2047T, 2M clusters', options: { virtualSize: 2047 * TiB, clusterSize: 2 * MiB }, refcountTableClusters: 1, refcountBlockCount: 1 },
  { name: 'the largest size, 2M clusters', options: { virtualSize: MAX_VIRTUAL_SIZE, clusterSize: 2 * MiB }, refcountTableClusters: 1, refcountBlockCount: 1 },
]

describeQemu('large sizes', () => {
  let largeDir = ''
  beforeAll(async () => {
    largeDir = await makeTempDir('create-large')
  })
  afterAll(async () => {
    if (largeDir) await removeTempDir(largeDir)
  })

  test.each(large)('$name', async (c) => {
    const image = path.join(largeDir, `${c.name.replace(/[^a-z0-9]+/gi, '-')}.qcow2`)
    const plan = await createOnDisk(image, c.options)
    expect(plan.layout.refcountTableClusters).toBe(c.refcountTableClusters)
    expect(plan.layout.refcountBlockCount).toBe(c.refcountBlockCount)
    const header = parseHeader(fs.readFileSync(image).subarray(0, 112))
    expect(header.refcountTableOffset).toBe(plan.layout.clusterSize)
    expect(header.refcountTableClusters).toBe(c.refcountTableClusters)
    expect(header.l1TableOffset).toBe(plan.layout.refcountBlocksOffset + c.refcountBlockCount * plan.layout.clusterSize)
    expect(fs.statSync(image).size).toBe(plan.layout.fileLength)
    await expectCleanCheck(image)
    const info = JSON.parse(await qemuImg(['info', '--output=json', image])) as Record<string, unknown>
    expect(info['virtual-size']).toBe(c.options.virtualSize)
    expect(info['cluster-size']).toBe(c.options.clusterSize)

    // Writes in the middle and at the very end, through the engine.
    const size = c.options.virtualSize
    const middle = Math.floor(size / 2 / 512) * 512 + 100
    const img = await Qcow2Image.open(image, { readOnly: false })
    try {
      await img.write(new Uint8Array(3000).fill(0x6b), middle)
      await img.write(new Uint8Array(1000).fill(0xe1), size - 1000)
    } finally {
      await img.close()
    }
    await expectCleanCheck(image)
    await qemuIo(image, [
      `read -P 0x6b ${middle} 3000`,
      `read -P 0 ${middle - 100} 100`,
      `read -P 0 ${middle + 3000} 512`,
      `read -P 0xe1 ${size - 1000} 1000`,
      `read -P 0 ${size - 1512} 512`,
      'read -P 0 0 64k',
    ])
  })
})

test('error messages of the creator are Qcow2Errors (the CLI maps them to exit codes)', () => {
  try {
    checkCreateOptions({ virtualSize: 1, clusterSize: 3 })
  } catch (err) {
    expect(err).toBeInstanceOf(Qcow2Error)
    expect((err as Qcow2Error).code).toBe('INVALID_REQUEST')
    return
  }
  throw new Error('cluster size 3 was accepted')
})

/*
 * Engine read path on images made by qemu-img and then damaged on purpose: a damaged region
 * fails with CorruptImageError (errno EIO) while the rest of the image reads correctly; plus
 * the decompressed-cluster cache, backing files, snapshots and a tiny L2 cache; and reads
 * that wait for the read-ahead (lib/io/read-ahead.ts).
 */
import * as fs from 'node:fs'
import * as path from 'node:path'
import { afterAll, beforeAll, describe, expect, test } from 'vitest'
import { CorruptImageError } from '../../lib/errors.js'
import { Qcow2Image } from '../../lib/image.js'
import type { BlockFile } from '../../lib/io/block-file.js'
import { MemoryBlockFile } from '../helpers/memory-file.js'
import { dropFromPageCache } from '../helpers/page-cache.js'
import {
  type QemuTools,
  makeTempDir,
  qemuImg as runQemuImg,
  qemuIo as runQemuIo,
  removeTempDir,
  requireQemu,
} from '../helpers/qemu.js'

const CLUSTER = 65536
const qemu = requireQemu('engine read path')
const describeQemu = describe.skipIf(!qemu)
const qemuImg = (args: string[]): Promise<string> => runQemuImg(qemu as QemuTools, args)
const qemuIo = (image: string, commands: string[]): Promise<string> => runQemuIo(qemu as QemuTools, image, commands)

let dir: string
beforeAll(async () => {
  dir = await makeTempDir('read-path')
})
afterAll(async () => {
  await removeTempDir(dir)
})

/** Deterministic, compressible but not trivial bytes. */
function patternBytes(length: number, seed: number): Buffer {
  const out = Buffer.alloc(length)
  let x = seed >>> 0
  for (let i = 0; i < length; i++) {
    if (i % 64 === 0) x = (Math.imul(x, 1103515245) + 12345) >>> 0
    out[i] = (x >>> ((i % 4) * 8)) & 0x3f
  }
  return out
}

async function rawOf(image: string): Promise<Buffer> {
  const raw = path.join(dir, path.basename(image) + '.raw')
  await qemuImg(['convert', '-O', 'raw', image, raw])
  return fs.readFileSync(raw)
}

async function readAll(img: Qcow2Image, chunk: number): Promise<Buffer> {
  const out = Buffer.alloc(img.virtualSize)
  for (let at = 0; at < out.length; at += chunk) await img.read(out.subarray(at, Math.min(at + chunk, out.length)), at)
  return out
}

function readAt(image: string, offset: number, length: number): Buffer {
  const fd = fs.openSync(image, 'r')
  try {
    const buf = Buffer.alloc(length)
    fs.readSync(fd, buf, 0, length, offset)
    return buf
  } finally {
    fs.closeSync(fd)
  }
}

/** Host offset and first 8 bytes of the L2 entry of guest cluster `index` (first L2 table). */
function l2EntryOf(image: string, index: number, entrySize = 8): { entryOffset: number; entry: bigint } {
  const l1Offset = Number(readAt(image, 40, 8).readBigUInt64BE(0))
  const l2Offset = Number(readAt(image, l1Offset, 8).readBigUInt64BE(0) & 0x00fffffffffffe00n)
  const entryOffset = l2Offset + index * entrySize
  return { entryOffset, entry: readAt(image, entryOffset, 8).readBigUInt64BE(0) }
}

function patch(image: string, offset: number, bytes: Buffer): void {
  const fd = fs.openSync(image, 'r+')
  fs.writeSync(fd, bytes, 0, bytes.length, offset)
  fs.closeSync(fd)
}

function u64(value: bigint): Buffer {
  const b = Buffer.alloc(8)
  b.writeBigUInt64BE(value)
  return b
}

async function expectEio(img: Qcow2Image, guestOffset: number, length: number): Promise<void> {
  const err = await img.read(Buffer.alloc(length), guestOffset).then(
    () => undefined,
    (e: unknown) => e,
  )
  expect(err).toBeInstanceOf(CorruptImageError)
  expect((err as CorruptImageError).errno).toBe('EIO')
}

describeQemu('read path on damaged images', () => {
  test('damaged compressed cluster: EIO for that cluster only', async () => {
    const src = path.join(dir, 'src.raw')
    fs.writeFileSync(src, patternBytes(8 * CLUSTER, 1))
    const image = path.join(dir, 'comp.qcow2')
    await qemuImg(['convert', '-c', '-O', 'qcow2', src, image])
    const want = await rawOf(image)
    const { entry } = l2EntryOf(image, 3)
    expect(entry >> 62n).toBe(1n)
    const coff = Number(entry & ((1n << 54n) - 1n))
    patch(image, coff, Buffer.alloc(64, 0xff))
    const img = await Qcow2Image.open(image)
    await expectEio(img, 3 * CLUSTER + 100, 4096)
    // Every other cluster reads as before.
    for (const c of [0, 1, 2, 4, 5, 6, 7]) {
      const got = Buffer.alloc(CLUSTER)
      await img.read(got, c * CLUSTER)
      expect(got.equals(want.subarray(c * CLUSTER, (c + 1) * CLUSTER))).toBe(true)
    }
    await img.close()
  })

  test('L2 table past EOF: EIO in its range, other ranges read', async () => {
    const image = path.join(dir, 'l2eof.qcow2')
    await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', image, '8M'])
    // With 4 KiB clusters one L2 table maps 2 MiB; write into the first and the third.
    await qemuIo(image, ['write -P 0x11 0 64k', 'write -P 0x22 4M 64k'])
    const l1Offset = Number(readAt(image, 40, 8).readBigUInt64BE(0))
    const size = fs.statSync(image).size
    // L1 entry 2 (guest 4 MiB) now points far past the end of the file.
    patch(image, l1Offset + 2 * 8, u64(0x8000000000000000n | BigInt(size + 1024 * 4096)))
    const img = await Qcow2Image.open(image)
    await expectEio(img, 4 * 1024 * 1024, 4096)
    const first = Buffer.alloc(65536)
    await img.read(first, 0)
    expect(first.every((b) => b === 0x11)).toBe(true)
    await img.close()
  })

  test('data cluster past EOF, and a misaligned data offset: EIO', async () => {
    const image = path.join(dir, 'dataeof.qcow2')
    await qemuImg(['create', '-q', '-f', 'qcow2', image, '4M'])
    await qemuIo(image, ['write -P 0x33 0 128k'])
    const size = fs.statSync(image).size
    const { entryOffset } = l2EntryOf(image, 1)
    patch(image, entryOffset, u64(0x8000000000000000n | BigInt(size + 16 * CLUSTER)))
    const img = await Qcow2Image.open(image)
    await expectEio(img, CLUSTER, 512)
    const first = Buffer.alloc(CLUSTER)
    await img.read(first, 0)
    expect(first.every((b) => b === 0x33)).toBe(true)
    await img.close()

    patch(image, entryOffset, u64(0x8000000000000000n | BigInt(3 * CLUSTER + 512)))
    const again = await Qcow2Image.open(image)
    await expectEio(again, CLUSTER, 512)
    await again.close()
  })

  test('invalid subcluster bitmap (alloc and zero bits both set): EIO', async () => {
    const image = path.join(dir, 'extl2.qcow2')
    await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on', image, '1M'])
    await qemuIo(image, ['write -P 0x44 0 64k', 'write -P 0x55 64k 4k'])
    const { entryOffset } = l2EntryOf(image, 1, 16)
    // Cluster 1 has subclusters 0-1 allocated; also set the zero bit of subcluster 0.
    const zeroWord = Buffer.alloc(4)
    zeroWord.writeUInt32BE(1)
    patch(image, entryOffset + 8, zeroWord)
    const img = await Qcow2Image.open(image)
    await expectEio(img, CLUSTER + 16384, 512)
    const first = Buffer.alloc(CLUSTER)
    await img.read(first, 0)
    expect(first.every((b) => b === 0x44)).toBe(true)
    await img.close()
  })
})

describeQemu('read path features', () => {
  test('small sequential reads of a compressed cluster inflate it once', async () => {
    const src = path.join(dir, 'seq.raw')
    fs.writeFileSync(src, patternBytes(4 * CLUSTER, 7))
    const image = path.join(dir, 'seq.qcow2')
    await qemuImg(['convert', '-c', '-O', 'qcow2', src, image])
    const img = await Qcow2Image.open(image)
    const got = await readAll(img, 4096)
    expect(got.equals(fs.readFileSync(src))).toBe(true)
    expect(img.readStats().clustersInflated).toBe(4)
    await img.close()
  })

  test('backing file shorter than the overlay reads as zeros past its end; relative name', async () => {
    const sub = path.join(dir, 'chain')
    fs.mkdirSync(sub)
    fs.writeFileSync(path.join(sub, 'base.raw'), Buffer.alloc(100_000, 0x5a))
    await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', path.join(sub, 'top.qcow2'), '1M'])
    const want = await rawOf(path.join(sub, 'top.qcow2'))
    const cwd = process.cwd()
    process.chdir(path.dirname(dir))
    try {
      const img = await Qcow2Image.open(path.join(sub, 'top.qcow2'))
      const got = await readAll(img, 65536)
      expect(got.subarray(0, 100_000).every((b) => b === 0x5a)).toBe(true)
      expect(got.subarray(100_000).every((b) => b === 0)).toBe(true)
      expect(got.equals(want)).toBe(true)
      await img.close()
    } finally {
      process.chdir(cwd)
    }
  })

  test('backing chain loop and missing backing file are refused at open', async () => {
    const a = path.join(dir, 'loop-a.qcow2')
    const b = path.join(dir, 'loop-b.qcow2')
    await qemuImg(['create', '-q', '-f', 'qcow2', a, '1M'])
    await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'loop-a.qcow2', '-F', 'qcow2', b, '1M'])
    await qemuImg(['rebase', '-u', '-f', 'qcow2', '-b', 'loop-b.qcow2', '-F', 'qcow2', a])
    await expect(Qcow2Image.open(a)).rejects.toThrow(/loop/)
    const orphan = path.join(dir, 'orphan.qcow2')
    await qemuImg(['create', '-q', '-f', 'qcow2', '-u', '-b', 'gone.qcow2', '-F', 'qcow2', orphan, '1M'])
    await expect(Qcow2Image.open(orphan)).rejects.toThrow(/backing file 'gone.qcow2'.*not found/)
  })

  test('snapshot view reads the data as it was', async () => {
    const image = path.join(dir, 'snap.qcow2')
    await qemuImg(['create', '-q', '-f', 'qcow2', image, '1M'])
    await qemuIo(image, ['write -P 0x61 0 256k'])
    await qemuImg(['snapshot', '-c', 'before', image])
    await qemuIo(image, ['write -P 0x62 64k 64k'])
    const snap = await Qcow2Image.open(image, { snapshot: 'before' })
    const got = await readAll(snap, 65536)
    expect(got.subarray(0, 256 * 1024).every((b) => b === 0x61)).toBe(true)
    await snap.close()
    const byId = await Qcow2Image.open(image, { snapshot: '1' })
    expect(byId.snapshot?.name).toBe('before')
    await byId.close()
    const active = await Qcow2Image.open(image)
    const cluster1 = Buffer.alloc(CLUSTER)
    await active.read(cluster1, CLUSTER)
    expect(cluster1.every((b) => b === 0x62)).toBe(true)
    await active.close()
    await expect(Qcow2Image.open(image, { snapshot: 'nope' })).rejects.toThrow(/snapshot 'nope' not found/)
  })

  test('a tiny L2 cache still reads a whole image correctly', async () => {
    const image = path.join(dir, 'tiny-cache.qcow2')
    await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512', image, '4M'])
    await qemuIo(image, ['write -P 0x71 0 1M', 'write -P 0x72 3M 512k'])
    const img = await Qcow2Image.open(image, { l2CacheBytes: 1 })
    expect((await readAll(img, 3000)).equals(await rawOf(image))).toBe(true)
    await img.close()
  })

  test('a closed image refuses reads', async () => {
    const image = path.join(dir, 'closed.qcow2')
    await qemuImg(['create', '-q', '-f', 'qcow2', image, '1M'])
    const img = await Qcow2Image.open(image)
    await img.close()
    await expect(img.read(Buffer.alloc(512), 0)).rejects.toMatchObject({ code: 'CLOSED' })
  })
})

/** Reads the whole image in 128 KiB requests, four at a time, in a disordered order (as FUSE sends them). */
async function readDisordered(img: Qcow2Image): Promise<Buffer> {
  const request = 128 * 1024
  const out = Buffer.alloc(img.virtualSize)
  const offsets: number[] = []
  for (let at = 0; at < out.length; at += request) offsets.push(at)
  for (let i = 1; i + 2 < offsets.length; i += 4) [offsets[i], offsets[i + 2]] = [offsets[i + 2]!, offsets[i]!]
  let next = 0
  const reader = async (): Promise<void> => {
    while (next < offsets.length) {
      const at = offsets[next++]!
      await img.read(out.subarray(at, Math.min(at + request, out.length)), at)
    }
  }
  await Promise.all([reader(), reader(), reader(), reader()])
  return out
}

/**
 * A read-only image file in memory whose whenReadable answers, for the first `holds` calls, a
 * promise the test settles: it stands for bytes still being read ahead.
 */
function waitingFile(image: string, holds: number) {
  const inner = MemoryBlockFile.fromFile(image, { readOnly: true })
  const state = { asked: [] as [number, number][], release: [] as (() => void)[] }
  const file: BlockFile = {
    path: inner.path,
    get size() {
      return inner.size
    },
    writable: false,
    pread: (buf, hostOffset) => inner.pread(buf, hostOffset),
    pwrite: () => {
      throw new Error('read-only')
    },
    sync: () => {},
    truncate: () => {
      throw new Error('read-only')
    },
    allocatedBytes: () => inner.allocatedBytes(),
    whenReadable(hostOffset, length) {
      state.asked.push([hostOffset, length])
      if (state.release.length >= holds) return undefined
      return new Promise<void>((resolve) => state.release.push(resolve))
    },
    close: () => inner.close(),
  }
  return { file, state }
}

/** An image of `clusters` clusters of pattern bytes (qemu-img convert, with `convertArgs`), opened on a waitingFile. */
async function imageOnWaitingFile(name: string, clusters: number, holds: number, convertArgs: string[] = []) {
  const src = path.join(dir, `${name}.raw`)
  fs.writeFileSync(src, patternBytes(clusters * CLUSTER, clusters + holds))
  const image = path.join(dir, `${name}.qcow2`)
  await qemuImg(['convert', ...convertArgs, '-O', 'qcow2', src, image])
  const { file, state } = waitingFile(image, holds)
  return { img: Qcow2Image.openFile(file, image, { readOnly: true }), state, data: fs.readFileSync(src) }
}

describeQemu('reads that wait for the read-ahead', () => {
  test('read() waits for bytes on their way, then reads them; readSync never waits', async () => {
    const { img, state, data } = await imageOnWaitingFile('wait', 4, 1)
    const buf = Buffer.alloc(2 * CLUSTER)
    let done = false
    const reading = img.read(buf, CLUSTER).then(() => (done = true))
    await new Promise((r) => setImmediate(r))
    expect(done).toBe(false)
    expect(state.asked).toHaveLength(1)
    expect(state.asked[0]![1]).toBe(2 * CLUSTER)
    state.release[0]!()
    await reading
    // Mapped again after the wait and read at once: a run is waited for once.
    expect(state.asked).toHaveLength(1)
    expect(buf.equals(data.subarray(CLUSTER, 3 * CLUSTER))).toBe(true)
    const again = Buffer.alloc(CLUSTER)
    img.readSync(again, 0)
    expect(again.equals(data.subarray(0, CLUSTER))).toBe(true)
    expect(state.asked).toHaveLength(1)
    await img.close()
  })

  test('a run whose bytes are still on their way after the wait is read anyway', async () => {
    const { img, state, data } = await imageOnWaitingFile('wait-once', 2, 100)
    const buf = Buffer.alloc(2 * CLUSTER)
    const reading = img.read(buf, 0)
    await new Promise((r) => setImmediate(r))
    state.release[0]!()
    await reading
    expect(state.asked).toHaveLength(1)
    expect(buf.equals(data)).toBe(true)
    await img.close()
  })

  test('compressed clusters: the compressed bytes are waited for, unless the cluster is already inflated', async () => {
    const { img, state, data } = await imageOnWaitingFile('wait-compressed', 2, 1, ['-c'])
    const buf = Buffer.alloc(4096)
    const reading = img.read(buf, 0)
    await new Promise((r) => setImmediate(r))
    expect(state.asked).toHaveLength(1)
    const [hostOffset, length] = state.asked[0]!
    expect(hostOffset % 512 === 0 || length < CLUSTER).toBe(true)
    state.release[0]!()
    await reading
    const asked = state.asked.length
    await img.read(buf, 4096)
    expect(state.asked.length).toBe(asked)
    expect(buf.equals(data.subarray(4096, 8192))).toBe(true)
    await img.close()
  })

  test('images opened with readAhead read like qemu-img: allocated, compressed, and over qcow2 and raw backing files', async () => {
    const sub = path.join(dir, 'read-ahead')
    fs.mkdirSync(sub)
    const data = patternBytes(12 * 1024 * 1024, 24)
    const src = path.join(sub, 'src.raw')
    fs.writeFileSync(src, data)
    const allocated = path.join(sub, 'allocated.qcow2')
    const compressed = path.join(sub, 'compressed.qcow2')
    const base = path.join(sub, 'base.qcow2')
    const overQcow2 = path.join(sub, 'over-qcow2.qcow2')
    const rawBase = path.join(sub, 'base.raw')
    const overRaw = path.join(sub, 'over-raw.qcow2')
    await qemuImg(['convert', '-O', 'qcow2', src, allocated])
    await qemuImg(['convert', '-c', '-O', 'qcow2', src, compressed])
    await qemuImg(['convert', '-O', 'qcow2', src, base])
    await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', overQcow2, '16M'])
    await qemuIo(overQcow2, ['write -P 0x33 1M 3M', 'write -P 0x44 9M 64k'])
    fs.writeFileSync(rawBase, data.subarray(0, 10 * 1024 * 1024))
    await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', overRaw, '12M'])
    await qemuIo(overRaw, ['write -P 0x55 5M 2M'])
    for (const image of [allocated, compressed, overQcow2, overRaw]) {
      const want = await rawOf(image)
      for (const file of fs.readdirSync(sub)) dropFromPageCache(path.join(sub, file))
      const img = await Qcow2Image.open(image, { readAhead: true })
      const got = await readDisordered(img)
      expect(got.equals(want), image).toBe(true)
      await img.close()
    }
  })
})

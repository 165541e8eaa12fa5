/*
 * Compressed writes through Qcow2Image with the compress option (lib/engine/compress/): the
 * routing rules CW-1 to CW-10, the packing rules PK-1 to PK-5, staging of partial writes, and
 * the image-level cache rules (fsync order WC-11, sticky errors WC-12, freed clusters WC-15,
 * unmount WC-20). L2 entries are read back independently (test/helpers/l2-inspect.ts), and
 * every image is checked by qemu-img check (refcounts exact, no leaks) and qemu-img compare.
 */
import * as fs from 'node:fs'
import * as path from 'node:path'
import * as zlib from 'node:zlib'
import { afterAll, beforeAll, describe, expect, test } from 'vitest'
import { deflateClusterSync, deflateImplementation, type ClusterCompressor } from '../../lib/engine/compress/compressor.js'
import { Packer } from '../../lib/engine/compress/packer.js'
import { makeGeometry } from '../../lib/format/geometry.js'
import { Qcow2Image } from '../../lib/image.js'
import type { Refcounts } from '../../lib/meta/refcounts.js'
import { compressedDescriptor, newImage, openCompressed, realisticData } from '../helpers/compressed-image.js'
import { readEntries, readEntry, readLayout } from '../helpers/l2-inspect.js'
import { isCi, makeTempDir, qemuImg, qemuIo, removeTempDir, requireQemu, run } from '../helpers/qemu.js'

const KiB = 1024
const MiB = 1024 * KiB
const CS = 64 * KiB
const qemu = requireQemu('compressed writes')

/** Compressible, distinct per cluster: never all zero. */
function clusterData(index: number, size = CS): Buffer {
  const out = Buffer.alloc(size)
  const text = `cluster ${index} of a compressed disk; `
  for (let i = 0; i < size; i++) out[i] = text.charCodeAt(i % text.length) ^ ((i >> 9) & 3)
  return out
}

/** Half noise, half text: compresses to a bit over half a cluster, so packing crosses host clusters. */
function halfCompressible(index: number): Buffer {
  const out = clusterData(index)
  noise(CS / 2, index + 1000).copy(out)
  return out
}

function noise(size: number, seed: number): Buffer {
  const out = Buffer.alloc(size)
  let x = seed >>> 0 || 1
  for (let i = 0; i < size; i++) {
    x ^= x << 13
    x >>>= 0
    x ^= x >>> 17
    x ^= x << 5
    x >>>= 0
    out[i] = x & 0xff
  }
  return out
}

describe.skipIf(!qemu)('compressed writes', () => {
  const tools = qemu!
  let dir = ''
  let count = 0

  beforeAll(async () => {
    dir = await makeTempDir('compress-writes')
  })
  afterAll(async () => {
    if (dir) await removeTempDir(dir)
  })

  async function image(size: number, options: Parameters<typeof newImage>[1] = {}): Promise<string> {
    const p = path.join(dir, `img${count++}.qcow2`)
    await newImage(p, { virtualSize: size, ...options })
    return p
  }

  /** qemu-img check is clean (refcounts exact, no leaks) and the image holds `model`. */
  async function expectValid(imagePath: string, model: Buffer): Promise<string> {
    const check = await qemuImg(tools, ['check', imagePath])
    const reference = `${imagePath}.model`
    fs.writeFileSync(reference, model)
    await run(tools.qemuImg, ['compare', '-q', '-f', 'raw', '-F', 'qcow2', reference, imagePath])
    return check
  }

  async function readAll(img: Qcow2Image): Promise<Buffer> {
    const out = Buffer.alloc(img.virtualSize)
    await img.read(out, 0)
    return out
  }

  test('CW-1: a whole-cluster write to a fresh cluster is stored compressed (bit 62, COPIED clear)', async () => {
    const p = await image(4 * CS)
    const { image: img } = openCompressed(p)
    await img.write(clusterData(1), CS)
    await img.close()
    const entry = readEntry(p, 1)
    expect(entry.compressed).toBe(true)
    expect(entry.copied).toBe(false)
    const d = compressedDescriptor(entry, 16)
    expect(d.hostOffset % CS).toBe(0) // PK-5: a fresh open packs from a fresh host cluster
    const model = Buffer.alloc(4 * CS)
    clusterData(1).copy(model, CS)
    expect(await expectValid(p, model)).toMatch(/1\/4 = 25\.00% allocated, .*100\.00% compressed clusters/)
  })

  test('CW-1: with extended L2 the compressed entry has an all-zero subcluster bitmap', async () => {
    const p = await image(4 * CS, { extendedL2: true })
    const { image: img } = openCompressed(p)
    await img.write(clusterData(0), 0)
    await img.close()
    const entry = readEntry(p, 0)
    expect(entry.compressed).toBe(true)
    expect(entry.bitmap).toBe(0n)
    const model = Buffer.alloc(4 * CS)
    clusterData(0).copy(model)
    await expectValid(p, model)
  })

  test('CW-2: a second whole-cluster write to the same cluster succeeds and leaves a normal cluster', async () => {
    const p = await image(4 * CS)
    const { image: img } = openCompressed(p)
    await img.write(Buffer.alloc(CS, 0x42), 0)
    await img.flush()
    expect(readEntry(p, 0).compressed).toBe(true)
    await img.write(Buffer.alloc(CS, 0x23), 0)
    // A normal write first, then a whole-cluster write: stays normal.
    await img.write(Buffer.alloc(512, 0x12), 2 * CS)
    await img.flush()
    await img.write(Buffer.alloc(CS, 0x12), 2 * CS)
    expect((await readAll(img)).subarray(0, CS).every((b) => b === 0x23)).toBe(true)
    await img.close()
    for (const cluster of [0, 2]) {
      const entry = readEntry(p, cluster)
      expect(entry.compressed).toBe(false)
      expect(entry.copied).toBe(true)
    }
    const model = Buffer.alloc(4 * CS)
    model.fill(0x23, 0, CS)
    model.fill(0x12, 2 * CS, 3 * CS)
    await expectValid(p, model)
    await run(tools.qemuIo, ['-f', 'qcow2', '-c', 'read -P 0x23 0 64k', p])
  })

  test('CW-3: without staging, partial writes to fresh clusters are never compressed', async () => {
    const p = await image(4 * CS)
    const { image: img } = openCompressed(p, { stagingBytes: 0 })
    for (let off = 0; off < CS; off += 4 * KiB) await img.write(clusterData(7).subarray(off, off + 4 * KiB), CS + off)
    await img.close()
    expect(readEntry(p, 1).compressed).toBe(false)
    const model = Buffer.alloc(4 * CS)
    clusterData(7).copy(model, CS)
    await expectValid(p, model)
  })

  test('CW-4: data that does not shrink is stored as a normal cluster with COPIED', async () => {
    const p = await image(4 * CS)
    const { image: img } = openCompressed(p)
    const random = noise(CS, 99)
    expect(deflateClusterSync(random)).toBeUndefined()
    await img.write(random, 0)
    await img.write(clusterData(1), CS)
    await img.close()
    expect(readEntry(p, 0)).toMatchObject({ compressed: false, copied: true })
    expect(readEntry(p, 1).compressed).toBe(true)
    const model = Buffer.alloc(4 * CS)
    random.copy(model)
    clusterData(1).copy(model, CS)
    expect(await expectValid(p, model)).toMatch(/50\.00% compressed clusters/)
    expect(img.compressionStats).toBeDefined()
  })

  test('CW-5: zero writes stay zero or unallocated clusters, staged zero pieces too', async () => {
    const p = await image(8 * CS)
    const { image: img } = openCompressed(p)
    await img.write(Buffer.alloc(CS), 0)
    await img.writeZeroes(CS, CS)
    for (let off = 0; off < CS; off += 4 * KiB) await img.write(Buffer.alloc(4 * KiB), 2 * CS + off)
    await img.write(clusterData(3), 3 * CS)
    await img.writeZeroes(3 * CS, CS)
    expect(img.compressionStats()!.zeroClusters).toBeGreaterThanOrEqual(0)
    await img.close()
    for (const cluster of [0, 1, 2, 3]) {
      const entry = readEntry(p, cluster)
      expect(entry.compressed).toBe(false)
      expect(entry.hostOffset).toBe(0)
    }
    await expectValid(p, Buffer.alloc(8 * CS))
  })

  test('CW-6: the last cluster of a disk whose size is not a cluster multiple is compressed, zero-padded', async () => {
    const size = 3 * CS + 5 * 512
    const p = await image(size)
    const { image: img } = openCompressed(p)
    const model = realisticData(size, 6)
    model.fill(0x61, 3 * CS) // compressible tail
    await img.write(model, 0)
    await img.close()
    expect(readEntry(p, 3).compressed).toBe(true)
    await expectValid(p, model)
  })

  test('CW-7: every compressed stream inflates with a 4 KiB window (QEMU inflates with windowBits 12)', async () => {
    const p = await image(64 * CS)
    const { image: img } = openCompressed(p)
    const model = realisticData(64 * CS, 7)
    await img.write(model, 0)
    await img.close()
    const bytes = fs.readFileSync(p)
    let compressed = 0
    for (const [i, entry] of readEntries(p, 64).entries()) {
      if (!entry.compressed) continue
      compressed++
      const d = compressedDescriptor(entry, 16)
      const out = zlib.inflateRawSync(bytes.subarray(d.hostOffset, d.hostOffset + d.bytes), { windowBits: 12 })
      expect(out.length, `cluster ${i}`).toBe(CS)
      expect(out.equals(model.subarray(i * CS, (i + 1) * CS)), `cluster ${i}`).toBe(true)
    }
    expect(compressed).toBeGreaterThan(20)
    await expectValid(p, model)
  })

  test('CW-7: through the system zlib (compress-zlib=qemu), every stream is byte for byte the one qemu-img convert -c writes', async () => {
    // make build builds the qemu_deflate addon; CI must have it, elsewhere it may be missing.
    let implementation: string
    try {
      implementation = deflateImplementation('qemu')
    } catch (err) {
      if (isCi()) throw err
      return
    }
    expect(implementation).toMatch(/^system zlib /)
    const model = realisticData(48 * CS, 8)
    const raw = path.join(dir, `parity${count++}.raw`)
    fs.writeFileSync(raw, model)
    const theirs = path.join(dir, `parity${count++}.qcow2`)
    await qemuImg(tools, ['convert', '-c', '-O', 'qcow2', raw, theirs])
    const ours = await image(48 * CS)
    const { image: img } = openCompressed(ours, { deflate: 'qemu' })
    await img.write(model, 0)
    await img.close()
    const theirBytes = fs.readFileSync(theirs)
    let compared = 0
    for (const [i, entry] of readEntries(theirs, 48).entries()) {
      if (!entry.compressed) continue
      const stream = deflateClusterSync(model.subarray(i * CS, (i + 1) * CS), 'qemu')!
      const d = compressedDescriptor(entry, 16)
      expect(Buffer.from(stream).equals(theirBytes.subarray(d.hostOffset, d.hostOffset + stream.length)), `cluster ${i}`).toBe(true)
      expect(readEntry(ours, i).compressed, `cluster ${i}`).toBe(true)
      compared++
    }
    expect(compared).toBeGreaterThan(20)
    // Same streams, same packing: the same size, but for QEMU's last step, which rounds the end
    // of the file up to a whole sector.
    expect(Math.ceil(fs.statSync(ours).size / 512) * 512).toBe(fs.statSync(theirs).size)
  })

  test('CW-8: compressed clusters whose sector-rounded size runs into the next one read back, before and after reopen', async () => {
    const p = await image(32 * CS)
    const { image: img } = openCompressed(p)
    const model = Buffer.concat(Array.from({ length: 32 }, (_, i) => clusterData(i)))
    await img.write(model, 0)
    expect((await readAll(img)).equals(model)).toBe(true)
    await img.flush()
    expect((await readAll(img)).equals(model)).toBe(true)
    await img.close()
    const again = await Qcow2Image.open(p)
    expect((await readAll(again)).equals(model)).toBe(true)
    await again.close()
  })

  test('CW-9: a partial overwrite of a compressed cluster rewrites it as a normal cluster; the old host cluster is released', async () => {
    for (const extendedL2 of [false, true]) {
      const p = await image(4 * CS, { extendedL2 })
      const { image: img } = openCompressed(p)
      await img.write(clusterData(0), 0)
      await img.flush()
      const model = Buffer.alloc(4 * CS)
      clusterData(0).copy(model)
      await img.write(Buffer.alloc(512, 8), 3 * KiB)
      model.fill(8, 3 * KiB, 3 * KiB + 512)
      await img.close()
      const entry = readEntry(p, 0)
      expect(entry).toMatchObject({ compressed: false, copied: true })
      if (extendedL2) expect(entry.alloc).toHaveLength(32)
      await expectValid(p, model) // no leak: the old host cluster's refcount went to 0
    }
  })

  test('CW-10: compressions finish in any order; host space follows the write order', async () => {
    const p = await image(16 * CS)
    // Results come back in reverse order of the requests.
    const pending: { input: Uint8Array; resolve: (out: Uint8Array | undefined) => void }[] = []
    const reversing: ClusterCompressor = {
      compress(cluster) {
        return new Promise((resolve) => {
          pending.push({ input: cluster, resolve })
          if (pending.length === 8) for (const job of pending.splice(0).reverse()) job.resolve(deflateClusterSync(job.input))
        })
      },
      async close() {},
    }
    const { image: img } = openCompressed(p, { compressor: reversing })
    const model = Buffer.concat(Array.from({ length: 8 }, (_, i) => clusterData(i)))
    for (let i = 0; i < 8; i++) await img.write(model.subarray(i * CS, (i + 1) * CS), i * CS)
    await img.close()
    const offsets = readEntries(p, 8).map((e) => compressedDescriptor(e, 16).hostOffset)
    // PK-1: byte after byte, in guest (write) order.
    for (let i = 1; i < 8; i++) expect(offsets[i]).toBe(offsets[i - 1]! + deflateClusterSync(model.subarray((i - 1) * CS, i * CS))!.length)
    const full = Buffer.alloc(16 * CS)
    model.copy(full)
    await expectValid(p, full)
  })

  test('PK-1, PK-2: packing runs on into an adjacent host cluster, or leaves the tail of the old one', async () => {
    const p = await image(64 * CS)
    const { image: img } = openCompressed(p)
    const model = Buffer.alloc(64 * CS)
    for (let i = 0; i < 12; i++) halfCompressible(i).copy(model, i * CS)
    await img.write(model.subarray(0, 12 * CS), 0)
    await img.flush()
    // A normal allocation takes the next host cluster: packing cannot run on into it.
    const random = noise(CS, 5)
    random.copy(model, 40 * CS)
    await img.write(random, 40 * CS)
    for (let i = 12; i < 24; i++) halfCompressible(i).copy(model, i * CS)
    await img.write(model.subarray(12 * CS, 24 * CS), 12 * CS)
    await img.close()
    const entries = readEntries(p, 24)
    const spans = entries.map((e, i) => {
      const d = compressedDescriptor(e, 16)
      return { start: d.hostOffset, end: d.hostOffset + deflateClusterSync(model.subarray(i * CS, (i + 1) * CS))!.length }
    })
    let ranOn = 0
    let abandoned = 0
    for (let i = 1; i < 24; i++) {
      const prev = spans[i - 1]!
      const cur = spans[i]!
      if (cur.start === prev.end) {
        if (Math.floor(cur.start / CS) !== Math.floor((cur.end - 1) / CS)) ranOn++
      } else {
        // A jump only to the start of a new, non-adjacent host cluster.
        expect(cur.start % CS).toBe(0)
        expect(cur.start).not.toBe(Math.ceil(prev.end / CS) * CS)
        abandoned++
      }
    }
    expect(abandoned).toBeGreaterThanOrEqual(1)
    expect(ranOn).toBeGreaterThanOrEqual(5)
    await expectValid(p, model)
  })

  test('PK-3: refcounts count every compressed cluster touching a host cluster (16-bit and 1-bit refcounts)', async () => {
    for (const refcountBits of [16, 1]) {
      const p = await image(48 * CS, { refcountBits })
      const { image: img } = openCompressed(p)
      const model = Buffer.concat(Array.from({ length: 48 }, (_, i) => clusterData(i)))
      await img.write(model, 0)
      await img.close()
      const touching = new Map<number, number>()
      for (const [i, entry] of readEntries(p, 48).entries()) {
        const start = compressedDescriptor(entry, 16).hostOffset
        const end = start + deflateClusterSync(model.subarray(i * CS, (i + 1) * CS))!.length
        for (let c = Math.floor(start / CS); c <= Math.floor((end - 1) / CS); c++) touching.set(c, (touching.get(c) ?? 0) + 1)
      }
      const max = Math.max(...touching.values())
      if (refcountBits === 1) expect(max).toBe(1)
      else expect(max).toBeGreaterThan(1)
      // qemu-img check compares every refcount with the references it counts itself.
      await expectValid(p, model)
    }
  })

  test('PK-4: never host offset 0; offsets past what a descriptor addresses are refused', () => {
    const g = makeGeometry(16, false)
    const counts = new Map<number, number>()
    const fake = (next: number) =>
      ({
        maxRefcount: 65535,
        get: (c: number) => counts.get(c) ?? 0,
        increment: (c: number) => counts.set(c, (counts.get(c) ?? 0) + 1),
        allocate: () => next,
      }) as unknown as Refcounts
    expect(() => new Packer(g, fake(0)).allocate(100)).toThrow(/offset 0/)
    // x = 62 - (16 - 8) = 54 bits of offset.
    expect(() => new Packer(g, fake(2 ** 54)).allocate(100)).toThrow(/past what a compressed descriptor can address/)
    expect(new Packer(g, fake(2 ** 54 - CS)).allocate(100)).toBe(2 ** 54 - CS)
  })

  test('PK-5: after a reopen, packing starts in a fresh host cluster', async () => {
    const p = await image(8 * CS)
    let { image: img } = openCompressed(p)
    await img.write(clusterData(0), 0)
    await img.close()
    ;({ image: img } = openCompressed(p))
    await img.write(clusterData(1), CS)
    await img.close()
    const [a, b] = readEntries(p, 2).map((e) => compressedDescriptor(e, 16).hostOffset)
    expect(b! % CS).toBe(0)
    expect(Math.floor(b! / CS)).not.toBe(Math.floor(a! / CS))
    const model = Buffer.alloc(8 * CS)
    clusterData(0).copy(model)
    clusterData(1).copy(model, CS)
    await expectValid(p, model)
  })

  test('descriptors are valid for every cluster size from 512 bytes to 2 MiB', async () => {
    for (const clusterSize of [512, 4 * KiB, 64 * KiB, 2 * MiB]) {
      const size = Math.max(8 * clusterSize, 2 * MiB)
      const p = await image(size, { clusterSize })
      const { image: img } = openCompressed(p)
      const model = realisticData(size, clusterSize)
      await img.write(model, 0)
      await img.close()
      const check = await expectValid(p, model)
      expect(check, `cluster size ${clusterSize}`).toMatch(/compressed clusters/)
      const layout = readLayout(p)
      const compressed = readEntries(p, size / clusterSize).filter((e) => e.compressed)
      expect(compressed.length, `cluster size ${clusterSize}`).toBeGreaterThan(0)
      for (const e of compressed) expect(compressedDescriptor(e, layout.clusterBits).hostOffset).toBeGreaterThan(0)
    }
  })

  test('staging: 4 KiB appends (the disk growing with each, as cp and dd do) compress every cluster once', async () => {
    const p = await image(0)
    const { image: img } = openCompressed(p)
    const model = realisticData(2 * MiB + 3 * KiB, 17)
    for (let off = 0; off < model.length; off += 4 * KiB) {
      const chunk = model.subarray(off, Math.min(model.length, off + 4 * KiB))
      await img.resize(off + chunk.length)
      await img.write(chunk, off)
    }
    // Everything reads back before any flush: staged, queued and cached bytes.
    expect((await readAll(img)).subarray(0, model.length).equals(model)).toBe(true)
    await img.close()
    const stats = img.compressionStats()!
    const clusters = Math.ceil(model.length / CS)
    expect(stats.compressedClusters + stats.uncompressedClusters + stats.zeroClusters).toBe(clusters)
    const padded = Buffer.alloc(Math.ceil(model.length / 512) * 512)
    model.copy(padded)
    await expectValid(p, padded)
  })

  test('staging: at the bound the oldest staged cluster is completed with what a read returns (backing data or zeros)', async () => {
    const base = path.join(dir, `base${count++}.qcow2`)
    await qemuImg(tools, ['create', '-q', '-f', 'qcow2', base, '1M'])
    await qemuIo(tools, base, ['write -q -P 0xba 0 512k'])
    const overlay = path.join(dir, `overlay${count++}.qcow2`)
    await qemuImg(tools, ['create', '-q', '-f', 'qcow2', '-b', path.basename(base), '-F', 'qcow2', overlay, '1M'])
    const { image: img } = openCompressed(overlay, { stagingBytes: 2 * CS })
    const model = Buffer.alloc(MiB)
    model.fill(0xba, 0, 512 * KiB)
    // One 4 KiB piece in each of 12 clusters, half over the backing data, half past it.
    for (let c = 0; c < 16; c++) {
      if (c % 4 === 3) continue
      const piece = Buffer.alloc(4 * KiB, 0x30 + c)
      await img.write(piece, c * CS + 8 * KiB)
      piece.copy(model, c * CS + 8 * KiB)
      expect(img.compressionStats()!.stagedClusters).toBeLessThanOrEqual(2)
    }
    expect((await readAll(img)).equals(model)).toBe(true)
    await img.close()
    expect(readEntries(overlay, 16).filter((e) => e.compressed).length).toBe(12)
    await expectValid(overlay, model)
  })

  test('a write to a cluster whose compression is under way is not lost', async () => {
    const p = await image(4 * CS)
    const { image: img } = openCompressed(p)
    const model = Buffer.alloc(4 * CS)
    clusterData(2).copy(model, CS)
    const first = img.write(clusterData(2), CS)
    const second = img.write(Buffer.alloc(1000, 0x77), CS + 500)
    model.fill(0x77, CS + 500, CS + 1500)
    await Promise.all([first, second])
    expect((await readAll(img)).equals(model)).toBe(true)
    await img.close()
    expect(readEntry(p, 1).compressed).toBe(true)
    await expectValid(p, model)
  })

  test('a shrink drops staged and queued clusters past the new end; the boundary cluster keeps its head', async () => {
    const p = await image(8 * CS)
    const { image: img } = openCompressed(p)
    await img.write(Buffer.alloc(6 * CS, 0x55), 0)
    await img.write(Buffer.alloc(4 * KiB, 0x66), 7 * CS)
    await img.resize(2 * CS + 512)
    await img.resize(8 * CS)
    await img.close()
    const model = Buffer.alloc(8 * CS)
    model.fill(0x55, 0, 2 * CS + 512)
    await expectValid(p, model)
  })

  test('concurrent writes, zero writes, reads and flushes in flight at once end as the writes in issue order', async () => {
    const p = await image(32 * CS)
    const { image: img } = openCompressed(p, { stagingBytes: 4 * CS, maxJobs: 3 })
    const model = Buffer.alloc(32 * CS)
    let x = 7
    const rand = (n: number) => {
      x = (x * 1103515245 + 12345) >>> 0
      return x % n
    }
    const pending: Promise<unknown>[] = []
    for (let i = 0; i < 300; i++) {
      const cluster = rand(32)
      const kind = rand(10)
      if (kind < 4) {
        const data = clusterData(i)
        data.copy(model, cluster * CS)
        pending.push(img.write(data, cluster * CS))
      } else if (kind < 7) {
        const offset = cluster * CS + rand(CS - 8 * 1024)
        const data = Buffer.alloc(1 + rand(8 * 1024), 0x41 + (i % 26))
        data.copy(model, offset)
        pending.push(img.write(data, offset))
      } else if (kind < 8) {
        model.fill(0, cluster * CS, (cluster + 1) * CS)
        pending.push(img.writeZeroes(cluster * CS, CS))
      } else if (kind < 9) {
        pending.push(img.read(Buffer.alloc(3 * CS), Math.min(cluster, 29) * CS))
      } else {
        pending.push(img.flush())
      }
    }
    await Promise.all(pending)
    expect((await readAll(img)).equals(model)).toBe(true)
    await img.close()
    await expectValid(p, model)
  })

  test('WC-11: fsync writes compressed data, then metadata; a fresh open sees everything fsynced', async () => {
    const p = await image(16 * CS)
    const { image: img, file } = openCompressed(p)
    const model = Buffer.alloc(16 * CS)
    for (let i = 0; i < 10; i++) clusterData(i).copy(model, i * CS)
    await img.write(model.subarray(0, 10 * CS), 0)
    await img.write(model.subarray(10 * CS + 100, 10 * CS + 2100), 10 * CS + 100) // staged
    file.writes.length = 0
    await img.flush()
    const tags = file.writes.map((w) => w.tag)
    const lastCompressed = tags.lastIndexOf('compressed')
    expect(lastCompressed).toBeGreaterThanOrEqual(0)
    expect(tags.indexOf('l2')).toBeGreaterThan(lastCompressed)
    // Another reader of the file (the writer is still open) sees the fsynced state.
    const reader = await Qcow2Image.open(p, { lock: false })
    const seen = Buffer.alloc(16 * CS)
    await reader.read(seen, 0)
    await reader.close()
    expect(seen.equals(model)).toBe(true)
    await img.close()
    await expectValid(p, model)
  })

  test('WC-12: a failed compressed-data write fails that fsync and every later write and fsync', async () => {
    const p = await image(8 * CS)
    const { image: img, file } = openCompressed(p)
    await img.write(clusterData(0), 0)
    await img.flush()
    const eio = Object.assign(new Error('EIO: simulated write error'), { code: 'EIO' })
    file.failOn = { tag: 'compressed', failure: eio }
    await img.write(clusterData(1), CS)
    await expect(img.flush()).rejects.toThrow(/EIO/)
    file.failOn = undefined
    await expect(img.flush()).rejects.toThrow(/EIO/)
    await expect(img.write(clusterData(2), 2 * CS)).rejects.toThrow(/EIO/)
    await expect(img.close()).rejects.toThrow(/EIO/)
    // What was fsynced before stays valid on disk (leaks allowed, no corruption).
    const check = await run(tools.qemuImg, ['check', '--output=json', p]).catch((err: Error) => ({ stdout: err.message }))
    expect(check.stdout).not.toMatch(/"corruptions": [1-9]/)
    await run(tools.qemuIo, ['-f', 'qcow2', '-c', `read -P 0 ${CS} ${CS}`, p]).catch(() => undefined)
  })

  test('WC-15: a compressed cluster overwritten while its bytes are cached never clobbers the new data', async () => {
    const p = await image(8 * CS)
    const { image: img } = openCompressed(p)
    const model = Buffer.alloc(8 * CS)
    clusterData(0).copy(model)
    await img.write(clusterData(0), 0) // cached, not flushed
    await img.write(Buffer.alloc(4 * KiB, 0x99), 0) // CW-9 while cached: the host cluster is released
    model.fill(0x99, 0, 4 * KiB)
    await img.flush() // the release applies: the host cluster is free
    await img.write(noise(CS, 3), 2 * CS) // a normal allocation may reuse it
    noise(CS, 3).copy(model, 2 * CS)
    await img.flush()
    expect((await readAll(img)).equals(model)).toBe(true)
    await img.close()
    await expectValid(p, model)
  })

  test('WC-20: closing flushes staged, queued and cached data; nothing is left behind', async () => {
    const p = await image(8 * CS)
    const { image: img } = openCompressed(p)
    const model = Buffer.alloc(8 * CS)
    clusterData(4).copy(model, 0)
    model.fill(0x31, 3 * CS + 7, 3 * CS + 1007)
    await img.write(model.subarray(0, CS), 0)
    await img.write(model.subarray(3 * CS + 7, 3 * CS + 1007), 3 * CS + 7)
    await img.close()
    expect(img.compressionStats()).toMatchObject({ stagedClusters: 0, queuedClusters: 0 })
    await expectValid(p, model)
  })

  test('zstd images: clusters compressed with zstd, readable by QEMU', async () => {
    const p = await image(32 * CS, { compressionType: 'zstd' })
    const { image: img } = openCompressed(p)
    const model = realisticData(32 * CS, 21)
    await img.write(model, 0)
    expect((await readAll(img)).equals(model)).toBe(true)
    await img.close()
    expect(readEntries(p, 32).some((e) => e.compressed)).toBe(true)
    expect(await expectValid(p, model)).toMatch(/compressed clusters/)
  })
})

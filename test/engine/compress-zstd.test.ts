/*
 * zstd compressed writes through the system libzstd (the qemu_zstd addon, native/qemu_zstd.c)
 * and through the fallback, @bokuweb/zstd-wasm (compressor.ts): the frames decode with the
 * engine's zstd inflate, "does not shrink" gives undefined as QEMU's cluster size - 1 buffer
 * does, the frames are byte for byte those of qemu-img convert -c -o compression_type=zstd (4 KiB,
 * 64 KiB and 2 MiB clusters) and so are the image sizes, qemu-img check and compare accept the
 * images of both encoders. `make build` builds the addon; with CI=true it must be usable.
 */
import * as fs from 'node:fs'
import * as path from 'node:path'
import { afterAll, beforeAll, describe, expect, test } from 'vitest'
import { decompressCluster } from '../../lib/engine/codec.js'
import { type ClusterCompressor, makeZstdCompressor, zstdClusterSync, zstdImplementation } from '../../lib/engine/compress/compressor.js'
import { COMPRESSION_TYPE_ZSTD } from '../../lib/format/constants.js'
import { compressedDescriptor, newImage, openCompressed, realisticData } from '../helpers/compressed-image.js'
import { readEntries } from '../helpers/l2-inspect.js'
import { xorshift32 } from '../helpers/random.js'
import { isCi, makeTempDir, qemuImg, removeTempDir, requireQemu, run } from '../helpers/qemu.js'

const KiB = 1024
const MiB = 1024 * KiB
const CS = 64 * KiB
const native = zstdImplementation().startsWith('system libzstd ')

function noise(size: number, seed: number): Buffer {
  const next = xorshift32(seed)
  const out = Buffer.alloc(size)
  for (let i = 0; i < size; i += 4) out.writeUInt32LE(next(), i)
  return out
}

/** The engine's zstd inflate of `frame` into one cluster of `size` bytes. */
function inflate(frame: Uint8Array, size: number): Buffer {
  const out = Buffer.alloc(size)
  decompressCluster(COMPRESSION_TYPE_ZSTD, frame, out)
  return out
}

/** Compresses every cluster of `data` at once on `compressor`, then closes it. */
async function compressAll(compressor: ClusterCompressor, data: Buffer, size = CS): Promise<(Uint8Array | undefined)[]> {
  try {
    const jobs: Promise<Uint8Array | undefined>[] = []
    for (let at = 0; at < data.length; at += size) jobs.push(compressor.compress(data.subarray(at, at + size)))
    return await Promise.all(jobs)
  } finally {
    await compressor.close()
  }
}

describe('zstd compressors', () => {
  test('the system libzstd is used when the addon is built (required with CI=true)', () => {
    if (isCi()) expect(zstdImplementation()).toMatch(/^system libzstd \d+\.\d+\.\d+$/)
    else expect(zstdImplementation()).toMatch(/^(system libzstd \d+\.\d+\.\d+|@bokuweb\/zstd-wasm)$/)
  })

  test.skipIf(!native)('addon: frames decode with the engine, carry the content size, and what does not shrink is undefined', () => {
    const data = realisticData(32 * CS, 31)
    let frames = 0
    for (let at = 0; at < data.length; at += CS) {
      const cluster = data.subarray(at, at + CS)
      const frame = zstdClusterSync(cluster)
      if (frame === undefined) continue
      frames++
      expect(frame.length).toBeLessThan(CS)
      // Magic, then a frame header descriptor with the single-segment flag, a 2-byte content
      // size field (QEMU's frames state the cluster size), no checksum, no dictionary ID.
      expect(Buffer.from(frame.subarray(0, 4)).readUInt32LE(0)).toBe(0xfd2fb528)
      expect(frame[4]).toBe(0x60)
      expect(Buffer.from(frame.subarray(5, 7)).readUInt16LE(0) + 256).toBe(CS)
      expect(inflate(frame, CS).equals(cluster), `cluster ${at / CS}`).toBe(true)
    }
    expect(frames).toBeGreaterThan(16)
    expect(zstdClusterSync(noise(CS, 5))).toBeUndefined()
    // A whole cluster of noise but its last byte: the frame (raw blocks) would still not fit.
    const almost = noise(CS, 8)
    almost.fill(0, CS - 16)
    expect(zstdClusterSync(almost)).toBeUndefined()
    expect(zstdClusterSync(Buffer.alloc(CS, 'qcow2 '))!.length).toBeLessThan(100)
  })

  test.skipIf(!native)('addon: the worker pool makes the same frames as the synchronous call, one context per worker', async () => {
    const data = Buffer.concat([realisticData(40 * CS, 32), noise(4 * CS, 6)])
    const out = await compressAll(makeZstdCompressor(2), data)
    let frames = 0
    for (const [i, frame] of out.entries()) {
      const expected = zstdClusterSync(data.subarray(i * CS, (i + 1) * CS))
      expect(frame === undefined, `cluster ${i}`).toBe(expected === undefined)
      if (frame === undefined) continue
      frames++
      expect(Buffer.from(frame).equals(Buffer.from(expected!)), `cluster ${i}`).toBe(true)
    }
    expect(frames).toBeGreaterThan(16)
    expect(out.slice(-4).every((frame) => frame === undefined)).toBe(true)
  })

  test('fallback (@bokuweb/zstd-wasm): frames decode, noise is undefined, sizes within 0.5% of the system libzstd', async () => {
    const data = Buffer.concat([realisticData(40 * CS, 13), noise(2 * CS, 7)])
    const out = await compressAll(makeZstdCompressor(2, false), data)
    let bytes = 0
    for (const [i, frame] of out.entries()) {
      if (frame === undefined) continue
      expect(frame.length).toBeLessThan(CS)
      expect(inflate(frame, CS).equals(data.subarray(i * CS, (i + 1) * CS)), `cluster ${i}`).toBe(true)
      bytes += frame.length
    }
    expect(out.slice(-2).every((frame) => frame === undefined)).toBe(true)
    if (!native) return
    let reference = 0
    for (let at = 0; at < data.length; at += CS) reference += zstdClusterSync(data.subarray(at, at + CS))?.length ?? 0
    expect(Math.abs(bytes - reference) / reference).toBeLessThan(0.005)
  })
})

const qemu = requireQemu('zstd compressed writes')

describe.skipIf(!qemu)('zstd compressed images against qemu-img', () => {
  const tools = qemu!
  let dir = ''
  let count = 0

  beforeAll(async () => {
    dir = await makeTempDir('compress-zstd')
  })
  afterAll(async () => {
    if (dir) await removeTempDir(dir)
  })

  /** qemu-img check is clean with compressed clusters, and the image holds `model`. */
  async function expectValid(imagePath: string, model: Buffer): Promise<void> {
    expect(await qemuImg(tools, ['check', imagePath])).toMatch(/No errors were found on the image[\s\S]*compressed clusters/)
    const reference = `${imagePath}.model`
    fs.writeFileSync(reference, model)
    await run(tools.qemuImg, ['compare', '-q', '-f', 'raw', '-F', 'qcow2', reference, imagePath])
  }

  /** Our image of `model` with `clusterSize` and the compressor given (default: the image's). */
  async function ours(model: Buffer, clusterSize: number, compressor?: ClusterCompressor): Promise<string> {
    const p = path.join(dir, `ours${count++}.qcow2`)
    await newImage(p, { virtualSize: model.length, clusterSize, compressionType: 'zstd' })
    const { image } = openCompressed(p, compressor ? { compressor } : {})
    await image.write(model, 0)
    await image.close()
    return p
  }

  /** qemu-img convert -c -o compression_type=zstd of `model`. */
  async function theirs(model: Buffer, clusterSize: number): Promise<string> {
    const raw = path.join(dir, `model${count++}.raw`)
    fs.writeFileSync(raw, model)
    const p = path.join(dir, `theirs${count++}.qcow2`)
    await qemuImg(tools, ['convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', `compression_type=zstd,cluster_size=${clusterSize}`, raw, p])
    return p
  }

  for (const [clusterSize, size] of [
    [64 * KiB, 48 * 64 * KiB],
    [4 * KiB, 2 * MiB],
    [2 * MiB, 12 * MiB],
  ] as const) {
    test.skipIf(!native)(`system libzstd, ${clusterSize / KiB} KiB clusters: every frame is byte for byte qemu-img's, and so is the image size`, async () => {
      const model = realisticData(size, 8)
      const mine = await ours(model, clusterSize)
      const reference = await theirs(model, clusterSize)
      await expectValid(mine, model)
      const clusters = size / clusterSize
      const bits = Math.log2(clusterSize)
      const theirBytes = fs.readFileSync(reference)
      const myBytes = fs.readFileSync(mine)
      const myEntries = readEntries(mine, clusters)
      let compared = 0
      for (const [i, entry] of readEntries(reference, clusters).entries()) {
        expect(myEntries[i]!.compressed, `cluster ${i}`).toBe(entry.compressed)
        if (!entry.compressed) continue
        const frame = Buffer.from(zstdClusterSync(model.subarray(i * clusterSize, (i + 1) * clusterSize))!)
        const them = compressedDescriptor(entry, bits)
        const me = compressedDescriptor(myEntries[i]!, bits)
        expect(frame.equals(theirBytes.subarray(them.hostOffset, them.hostOffset + frame.length)), `cluster ${i}`).toBe(true)
        expect(frame.equals(myBytes.subarray(me.hostOffset, me.hostOffset + frame.length)), `cluster ${i}`).toBe(true)
        compared++
      }
      expect(compared).toBeGreaterThan(clusters / 4)
      // Same frames, same packing: the same size but for QEMU's last step, which rounds the end
      // of the file up to a whole sector.
      expect(Math.ceil(myBytes.length / 512) * 512).toBe(theirBytes.length)
    })
  }

  test('fallback (@bokuweb/zstd-wasm): qemu-img reads the image; its size is within 0.5% of qemu-img convert -c', async () => {
    const model = realisticData(48 * CS, 21)
    const mine = await ours(model, CS, makeZstdCompressor(2, false))
    await expectValid(mine, model)
    expect(readEntries(mine, 48).filter((e) => e.compressed).length).toBeGreaterThan(12)
    const reference = fs.statSync(await theirs(model, CS)).size
    expect(Math.abs(fs.statSync(mine).size - reference) / reference).toBeLessThan(0.005)
  })
})

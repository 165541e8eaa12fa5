/*
 * `mount -o compress` end to end, through dist/cli/main.js and real tools, on 200 MiB of
 * realistic data (programs, text, zero runs, a little noise: test/helpers/compressed-image.ts):
 * cp onto an empty image (the disk grows with every write), dd bs=4k (partial writes: staging),
 * a 2 MiB-cluster image and an extended-L2 image; mkfs.ext4 plus a copied tree on a compressed
 * mount. After each unmount: `qemu-img check` is clean (no leaks) and counts compressed
 * clusters, `qemu-img compare` says identical, and the image is about as small as
 * `qemu-img convert -c` makes it. Then a remount without compress overwrites ranges inside
 * compressed clusters, and check and compare hold again. No step may fail with EIO.
 */
import { mkdir, readFile, rm, stat, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { deflateImplementation } from '../../lib/engine/compress/compressor.js'
import { REPO_ROOT, ensureBuilt } from '../cli/helpers.js'
import { CliMounts, expectExt4Holds, expectIdentical, makeExt4With } from '../helpers/cli-mounts.js'
import { realisticData } from '../helpers/compressed-image.js'
import { isCi, makeTempDir, qemuImg, removeTempDir, requireQemu } from '../helpers/qemu.js'
import { runProcess } from './helpers.js'

const qemu = requireQemu('compressed mounts end to end')
const MiB = 1024 * 1024
/** 200 MiB and 7 sectors: whole sectors (qcow2 sizes are), not whole clusters (CW-6). */
const DATA_BYTES = 200 * MiB + 7 * 512

let dir = ''
let source = ''
let referenceBytes = 0
let mounts: CliMounts

describe.skipIf(!qemu)('compressed mounts end to end', () => {
  const tools = qemu!

  /** qemu-img check: clean (no corruption, no leaks); returns the compressed-cluster share. */
  async function expectClean(image: string): Promise<number> {
    const r = await runProcess(tools.qemuImg, ['check', image])
    const out = r.stdout.toString()
    expect(r.code, `qemu-img check ${image}:\n${out}${r.stderr}`).toBe(0)
    expect(out).toMatch(/No errors were found on the image/)
    const match = /([\d.]+)% compressed clusters/.exec(out)
    expect(match, out).not.toBeNull()
    return Number(match![1])
  }

  /** Whether compress-zlib=qemu can run here (CI builds the qemu_deflate addon: it must). */
  function systemZlib(): boolean {
    try {
      deflateImplementation('qemu')
      return true
    } catch (err) {
      if (isCi()) throw err
      return false
    }
  }

  /**
   * The image is as small as qemu-img convert -c made it: with compress-zlib=qemu no larger
   * (the same streams, the same packing); with the default fast deflate (node:zlib) at most 3%
   * larger (its streams run 0.2% to 3% longer, the most on programs; docs/COMPRESSION.md).
   */
  async function expectSmall(image: string, reference: number, deflate: 'fast' | 'qemu'): Promise<number> {
    const bytes = (await stat(image)).size
    if (deflate === 'qemu') expect(bytes).toBeLessThanOrEqual(reference)
    else expect(bytes).toBeLessThanOrEqual(reference * 1.03)
    return bytes
  }

  /** A remount without compress overwrites ranges inside compressed clusters; check and compare. */
  async function overwriteInside(image: string, expected: Buffer): Promise<void> {
    const { mnt, raw } = await mounts.mountImage(image)
    const patch = Buffer.alloc(5000, 0x5a)
    for (const offset of [1000, 37 * MiB + 12345, 150 * MiB + 65536 - 100]) {
      const dd = await runProcess('sh', ['-c', `printf '%5000s' | tr ' ' 'Z' | dd of='${raw}' bs=5000 iflag=fullblock seek=${offset} oflag=seek_bytes conv=notrunc status=none`])
      expect(dd.code, dd.stderr).toBe(0)
      patch.copy(expected, offset)
    }
    expect(await mounts.unmount(mnt)).toBe('')
    await expectClean(image)
    const reference = `${image}.expected`
    await writeFile(reference, expected)
    await expectIdentical(tools, reference, image)
    await rm(reference)
  }

  beforeAll(async () => {
    ensureBuilt()
    dir = await makeTempDir('compress-e2e')
    mounts = new CliMounts(dir, 180_000)
    source = join(dir, 'source.bin')
    await writeFile(source, realisticData(DATA_BYTES, 2024))
    const reference = join(dir, 'reference.qcow2')
    await qemuImg(tools, ['convert', '-c', '-O', 'qcow2', source, reference])
    referenceBytes = (await stat(reference)).size
  }, 180_000)

  afterAll(async () => {
    if (mounts) await mounts.cleanup()
    if (dir) await removeTempDir(dir)
  })

  it('cp of 200 MiB onto an empty image: compressed as qemu-img convert -c would; then overwrites inside compressed clusters', async () => {
    const image = join(dir, 'cp.qcow2')
    await qemuImg(tools, ['create', '-q', '-f', 'qcow2', image, '0'])
    const deflate = systemZlib() ? 'qemu' : 'fast'
    const { mnt, raw } = await mounts.mountImage(image, ['-o', `compress,compress-zlib=${deflate}`])
    const cp = await runProcess('cp', [source, raw], { timeoutMs: 180_000 })
    expect(cp.code, cp.stderr).toBe(0)
    expect((await stat(raw)).size).toBe(DATA_BYTES)
    const summary = await mounts.unmount(mnt)
    expect(summary).toMatch(/^qcow2fs: cp\.qcow2: \d+ clusters compressed, \d+ stored uncompressed, \d+ zero; [\d.]+ MiB stored in [\d.]+ MiB \([\d.]+%\)\n$/)
    process.stdout.write(`[compress-e2e] ${summary}`)
    expect(await expectClean(image)).toBeGreaterThan(90)
    await expectIdentical(tools, source, image)
    const bytes = await expectSmall(image, referenceBytes, deflate)
    process.stdout.write(`[compress-e2e] cp (compress-zlib=${deflate}): ${bytes} bytes; qemu-img convert -c of the same data: ${referenceBytes} bytes\n`)
    await overwriteInside(image, await readFile(source))
  }, 240_000)

  it('dd bs=4k: every write a partial cluster, staged until its cluster is complete', async () => {
    const image = join(dir, 'dd.qcow2')
    await qemuImg(tools, ['create', '-q', '-f', 'qcow2', image, '0'])
    const { mnt, raw } = await mounts.mountImage(image, ['-o', 'compress'])
    const dd = await runProcess('dd', [`if=${source}`, `of=${raw}`, 'bs=4k', 'status=none'], { timeoutMs: 180_000 })
    expect(dd.code, dd.stderr).toBe(0)
    await mounts.unmount(mnt)
    expect(await expectClean(image)).toBeGreaterThan(90)
    await expectIdentical(tools, source, image)
    const bytes = await expectSmall(image, referenceBytes, 'fast')
    process.stdout.write(`[compress-e2e] dd bs=4k (default fast deflate): ${bytes} bytes\n`)
  }, 240_000)

  it('a 2 MiB-cluster image and an extended-L2 image', async () => {
    for (const [name, options] of [
      ['big-clusters', 'cluster_size=2M'],
      ['extended-l2', 'extended_l2=on'],
    ] as const) {
      const image = join(dir, `${name}.qcow2`)
      await qemuImg(tools, ['create', '-q', '-f', 'qcow2', '-o', options, image, '0'])
      const { mnt, raw } = await mounts.mountImage(image, ['-o', 'compress'])
      const cp = await runProcess('cp', [source, raw], { timeoutMs: 180_000 })
      expect(cp.code, cp.stderr).toBe(0)
      await mounts.unmount(mnt)
      expect(await expectClean(image), name).toBeGreaterThan(80)
      await expectIdentical(tools, source, image)
      const reference = join(dir, `${name}-reference.qcow2`)
      await qemuImg(tools, ['convert', '-c', '-O', 'qcow2', '-o', options, source, reference])
      const referenceSize = (await stat(reference)).size
      const bytes = await expectSmall(image, referenceSize, 'fast')
      process.stdout.write(`[compress-e2e] ${name}: ${bytes} bytes; qemu-img convert -c: ${referenceSize} bytes\n`)
    }
  }, 300_000)

  it('two whole-cluster writes to one cluster both succeed (QEMU fails the second with EIO)', async () => {
    const image = join(dir, 'twice.qcow2')
    await qemuImg(tools, ['create', '-q', '-f', 'qcow2', image, '64M'])
    const { mnt, raw } = await mounts.mountImage(image, ['-o', 'compress'])
    for (const pattern of ['B', '#']) {
      const r = await runProcess('sh', ['-c', `printf '%65536s' | tr ' ' '${pattern}' | dd of='${raw}' bs=64k count=1 iflag=fullblock conv=notrunc,fsync status=none`])
      expect(r.code, r.stderr).toBe(0)
    }
    expect((await readFile(raw)).subarray(0, 65536).every((b) => b === 0x23)).toBe(true)
    await mounts.unmount(mnt)
    await expectClean(image)
    const io = await runProcess(tools.qemuIo, ['-f', 'qcow2', '-c', 'read -P 0x23 0 64k', image])
    expect(io.code, io.stdout.toString()).toBe(0)
  })

  it('mkfs.ext4 and a copied tree on a compressed mount survive unmount, e2fsck and a remount', async () => {
    const image = join(dir, 'ext4.qcow2')
    await qemuImg(tools, ['create', '-q', '-f', 'qcow2', image, '256M'])
    const { mnt, raw } = await mounts.mountImage(image, ['-o', 'compress'])
    const tree = join(dir, 'tree')
    await mkdir(join(tree, 'data'), { recursive: true })
    await writeFile(join(tree, 'data', 'sample.bin'), realisticData(24 * MiB + 123, 7))
    for (let i = 0; i < 40; i++) await writeFile(join(tree, `note-${i}.txt`), `note ${i}\n`.repeat(i * 53 + 1))
    const loop = await mounts.newLoopMountpoint()
    const sources = [tree, join(REPO_ROOT, 'lib')]
    await makeExt4With(raw, loop, sources)
    expect(await mounts.unmount(mnt)).toMatch(/clusters compressed/)
    expect(await expectClean(image)).toBeGreaterThan(10)

    const again = await mounts.mountImage(image)
    await expectExt4Holds(again.raw, loop, sources)
    await mounts.unmount(again.mnt)
    await expectClean(image)
  }, 240_000)
})

/*
 * Dirty images (lazy refcounts, writer killed): a read-write open through the engine repairs
 * the refcounts first, like QEMU, and says so once (OpenOptions.notes; `qcow2fs mount` prints
 * it as a note). A read-only open never modifies anything. Each result is judged by qemu-img:
 * `qemu-img check` clean, `qemu-img compare` with the contents written before the crash.
 */
import { copyFileSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs'
import * as path from 'node:path'
import { spawnSync } from 'node:child_process'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { Qcow2Image } from '../../lib/image.js'
import { CORRUPT_BIT, DIRTY_BIT, appendCluster, hostClusterOf, readHeader, readL2Entry, setIncompatibleBits, setRefcount, writeL2Entry } from '../helpers/damage.js'
import { makeTempDir, removeTempDir, requireQemu } from '../helpers/qemu.js'
import { ensureBuilt, runCli, sha256File } from '../cli/helpers.js'

const qemu = requireQemu('dirty image repair on a read-write open')

const KiB = 1024

let dir = ''

function tool(program: string, args: string[]): { status: number; stdout: string; stderr: string } {
  const r = spawnSync(program, args, { cwd: dir, encoding: 'utf8', timeout: 60_000 })
  return { status: r.status ?? -1, stdout: r.stdout, stderr: r.stderr }
}

function qemuCheckStatus(image: string): number {
  return tool(qemu!.qemuImg, ['check', image]).status
}

function sameAsRaw(image: string, raw: string): boolean {
  return tool(qemu!.qemuImg, ['compare', '-f', 'qcow2', '-F', 'raw', image, raw]).status === 0
}

function isDirty(image: string): boolean {
  return (readHeader(path.join(dir, image)).incompatibleFeatures & DIRTY_BIT) !== 0n
}

/** A lazy-refcounts image whose writer (qemu-io) was killed after writing: dirty, refcounts stale. */
function crashedImage(name: string): string {
  const image = `${name}.qcow2`
  tool(qemu!.qemuImg, ['create', '-q', '-f', 'qcow2', '-o', 'lazy_refcounts=on,cluster_size=4096', image, '1M'])
  const killed = tool(qemu!.qemuIo, ['-f', 'qcow2', '-c', 'write -P 0x61 0 96k', '-c', 'write -P 0x62 512k 20k', '-c', 'sigraise 9', image])
  expect(killed.status).not.toBe(0)
  expect(isDirty(image)).toBe(true)
  expect(qemuCheckStatus(image)).toBe(2)
  return image
}

describe.skipIf(!qemu)('read-write open of a dirty image', () => {
  let expectedRaw = ''

  beforeAll(async () => {
    dir = await makeTempDir('dirty-open')
    // What the crashed writer wrote, read by qemu-img (reads do not need refcounts).
    crashedImage('reference')
    expectedRaw = 'expected.raw'
    expect(tool(qemu!.qemuImg, ['convert', '-O', 'raw', 'reference.qcow2', expectedRaw]).status).toBe(0)
  })
  afterAll(async () => {
    if (dir) await removeTempDir(dir)
  })

  it('a read-only open changes nothing', async () => {
    const image = crashedImage('ro')
    const hash = sha256File(path.join(dir, image))
    const notes: string[] = []
    const img = await Qcow2Image.open(path.join(dir, image), { readOnly: true, notes })
    const buf = new Uint8Array(4096)
    await img.read(buf, 0)
    expect(buf[0]).toBe(0x61)
    await img.close()
    expect(notes).toEqual([])
    expect(sha256File(path.join(dir, image))).toBe(hash)
  })

  it('a read-write open repairs first, says so once, and the image is then clean and intact', async () => {
    const image = crashedImage('rw')
    const notes: string[] = []
    const img = await Qcow2Image.open(path.join(dir, image), { readOnly: false, notes })
    expect(notes).toHaveLength(1)
    expect(notes[0]).toMatch(/had the dirty bit set \(refcounts not updated after a crash\): repaired 0 leaked clusters and \d+ corruptions$/)
    expect(isDirty(image)).toBe(false)
    await img.write(new Uint8Array(8 * KiB).fill(0x63), 200 * KiB)
    await img.close()
    expect(qemuCheckStatus(image)).toBe(0)
    // The repaired image holds what was written before the crash, plus the new write.
    const copy = 'rw-expected.raw'
    const raw = Buffer.from(readFileSync(path.join(dir, expectedRaw)))
    raw.fill(0x63, 200 * KiB, 208 * KiB)
    writeFileSync(path.join(dir, copy), raw)
    expect(sameAsRaw(image, copy)).toBe(true)
    // Once: the next read-write open has nothing to repair.
    const again: string[] = []
    await (await Qcow2Image.open(path.join(dir, image), { readOnly: false, notes: again })).close()
    expect(again).toEqual([])
  })

  it('refcounts poked wrong (a leak, a refcount too high, one too low) with the dirty bit set', async () => {
    const image = 'poked.qcow2'
    copyFileSync(path.join(dir, 'reference.qcow2'), path.join(dir, image))
    const p = path.join(dir, image)
    // First a clean image (qemu-img repairs the crash), then known damage plus the dirty bit.
    expect(tool(qemu!.qemuImg, ['check', '-q', '-r', 'all', image]).status).toBe(0)
    setRefcount(p, appendCluster(p), 1)
    setRefcount(p, hostClusterOf(p, readL2Entry(p, 0).descriptor), 2)
    setRefcount(p, hostClusterOf(p, readL2Entry(p, 128).descriptor), 0)
    setIncompatibleBits(p, DIRTY_BIT)
    expect(qemuCheckStatus(image)).toBe(2)
    const notes: string[] = []
    await (await Qcow2Image.open(p, { readOnly: false, notes })).close()
    expect(notes).toHaveLength(1)
    expect(notes[0]).toMatch(/repaired 2 leaked clusters and \d+ corruptions/)
    expect(qemuCheckStatus(image)).toBe(0)
    expect(isDirty(image)).toBe(false)
    expect(sameAsRaw(image, expectedRaw)).toBe(true)
  })

  it('an image also marked corrupt is refused read-write and left as it is', async () => {
    const image = crashedImage('corrupt')
    setIncompatibleBits(path.join(dir, image), CORRUPT_BIT)
    const hash = sha256File(path.join(dir, image))
    const notes: string[] = []
    await expect(Qcow2Image.open(path.join(dir, image), { readOnly: false, notes })).rejects.toThrow(/marked corrupt/)
    expect(notes).toEqual([])
    expect(sha256File(path.join(dir, image))).toBe(hash)
  })

  it('damage the repair cannot fix (a misaligned data cluster) refuses the read-write open', async () => {
    const image = crashedImage('misaligned')
    const p = path.join(dir, image)
    writeL2Entry(p, 1, { descriptor: readL2Entry(p, 1).descriptor + 0x200n, bitmap: 0n })
    const notes: string[] = []
    await expect(Qcow2Image.open(p, { readOnly: false, notes })).rejects.toThrow(/dirty bit set and corruptions its repair could not fix/)
    expect(notes).toHaveLength(1)
    expect(notes[0]).toMatch(/corruptions remain/)
    // The refcounts were repaired; the misaligned entry is what qemu-img still reports.
    const after = JSON.parse(tool(qemu!.qemuImg, ['check', '--output=json', image]).stdout) as Record<string, number>
    expect(after['corruptions']).toBe(1)
    expect(after['leaks'] ?? 0).toBe(0)
  })

  it('qcow2fs mount prints the repair as one note', async () => {
    ensureBuilt()
    const image = crashedImage('mounted')
    const mnt = path.join(dir, 'mnt')
    mkdirSync(mnt)
    const mounted = runCli(['mount', path.join(dir, image), mnt], { timeoutMs: 30_000 })
    try {
      expect(mounted.status, mounted.stderr).toBe(0)
      const notes = mounted.stderr.split('\n').filter((line) => line.startsWith('qcow2fs: note: '))
      expect(notes).toHaveLength(1)
      expect(notes[0]).toMatch(/had the dirty bit set .*: repaired/)
      expect(readFileSync(path.join(mnt, 'mounted.raw')).equals(readFileSync(path.join(dir, expectedRaw)))).toBe(true)
    } finally {
      const unmounted = runCli(['unmount', mnt], { timeoutMs: 30_000 })
      if (unmounted.status !== 0) spawnSync('fusermount', ['-uz', mnt])
    }
    expect(qemuCheckStatus(image)).toBe(0)
    expect(isDirty(image)).toBe(false)
  })
})

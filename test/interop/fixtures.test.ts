/*
 * Every committed fixture image, and every internal snapshot view of one, read whole through
 * the engine facade: the sha256 of what it reads must equal the sha256 of
 * `qemu-img convert -O raw` recorded in fixtures/manifest.json when the fixtures were made.
 * Needs no QEMU at test time.
 */
import { afterEach, describe, expect, it } from 'vitest'
import { Qcow2Image } from '../../lib/image.js'
import {
  VARYING_CHUNK_SIZES,
  fixturePath,
  hashDiskSequential,
  loadManifest,
  readDiskConcurrently,
  sha256,
} from '../helpers/fixtures.js'

const manifest = loadManifest()

interface View {
  label: string
  file: string
  snapshot: string | undefined
  virtualSize: number
  rawSha256: string
}

const views: View[] = manifest.flatMap((entry) => [
  {
    label: entry.file,
    file: entry.file,
    snapshot: undefined,
    virtualSize: entry.virtualSize,
    rawSha256: entry.rawSha256,
  },
  ...(entry.snapshots ?? []).map((s) => ({
    label: `${entry.file} @ snapshot ${s.name}`,
    file: entry.file,
    snapshot: s.name,
    virtualSize: s.virtualSize,
    rawSha256: s.rawSha256,
  })),
])

const opened: Qcow2Image[] = []
afterEach(async () => {
  for (const img of opened.splice(0)) await img.close()
})

async function openView(view: View): Promise<Qcow2Image> {
  const img = await Qcow2Image.open(fixturePath(view.file), {
    readOnly: true,
    ...(view.snapshot !== undefined ? { snapshot: view.snapshot } : {}),
  })
  opened.push(img)
  return img
}

describe('fixture manifest', () => {
  it('covers every kind of image the engine must read', () => {
    const tags = new Set(manifest.flatMap((e) => e.tags))
    for (const tag of [
      'cluster-512',
      'cluster-4096',
      'cluster-65536',
      'cluster-2097152',
      'v2',
      'v3',
      'refcount-1',
      'refcount-16',
      'refcount-64',
      'extended-l2',
      'compressed',
      'zlib',
      'zstd',
      'backing-chain',
      'raw-backing',
      'short-backing',
      'no-backing-format',
      'zero-cluster',
      'snapshot',
      'data-file',
      'data-file-raw',
      'odd-size',
      'demo',
    ]) {
      expect(tags, `no fixture tagged ${tag}`).toContain(tag)
    }
    expect(views.filter((v) => v.snapshot !== undefined).length).toBeGreaterThanOrEqual(3)
  })
})

describe.each(views)('$label', (view) => {
  it('has the virtual size qemu-img reports', async () => {
    const img = await openView(view)
    expect(img.virtualSize).toBe(view.virtualSize)
    expect(img.readOnly).toBe(true)
  })

  it('reads, in sequential chunks of varying sizes, what qemu-img convert -O raw gives', async () => {
    const img = await openView(view)
    expect(await hashDiskSequential(img, VARYING_CHUNK_SIZES)).toBe(view.rawSha256)
  })

  it('reads the same with concurrent unaligned requests in shuffled order', async () => {
    const img = await openView(view)
    const whole = await readDiskConcurrently(img, 8, 5)
    expect(sha256(whole)).toBe(view.rawSha256)
  })
})

describe.each(manifest)('$file info()', (entry) => {
  it('matches the machine-independent keys of qemu-img info', async () => {
    const img = await Qcow2Image.open(fixturePath(entry.file), { readOnly: true })
    opened.push(img)
    expect(img.info()).toMatchObject(entry.qemuInfo)
  })
})

describe('demo images', () => {
  const demos = manifest.filter((e) => e.demo !== undefined)

  it('are listed with what ordinary tools see', () => {
    expect(demos.map((e) => e.file).sort()).toEqual(['demo/base.qcow2', 'demo/overlay.qcow2'])
  })

  it.each(demos)('$file has its MBR partition entry where the manifest says', async (entry) => {
    const img = await Qcow2Image.open(fixturePath(entry.file), { readOnly: true })
    opened.push(img)
    const mbr = new Uint8Array(512)
    await img.read(mbr, 0)
    expect(mbr[510]).toBe(0x55)
    expect(mbr[511]).toBe(0xaa)
    const view = new DataView(mbr.buffer)
    // First partition entry at 446: type at +4, start LBA at +8, sector count at +12.
    expect(mbr[446 + 4]).toBe(0x83)
    expect(view.getUint32(446 + 8, true) * 512).toBe(entry.demo!.partitionOffset)
    expect(view.getUint32(446 + 12, true) * 512).toBe(entry.demo!.partitionBytes)
    // ext4 superblock: 1024 bytes into the partition, magic 0xef53 at +56, label at +120.
    const sb = new Uint8Array(1024)
    await img.read(sb, entry.demo!.partitionOffset + 1024)
    expect(new DataView(sb.buffer).getUint16(56, true)).toBe(0xef53)
    const label = Buffer.from(sb.subarray(120, 136)).toString('latin1').replace(/\0+$/, '')
    expect(label).toBe(entry.demo!.label)
  })
})

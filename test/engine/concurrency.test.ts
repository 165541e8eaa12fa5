/*
 * Concurrent requests on one image, as fuse_loop_mt delivers them: many writes and reads of the
 * same and overlapping clusters in flight at once (allocating writes into fresh clusters, COW
 * from a backing file, subclusters, zero writes), with flushes among them. No double
 * allocation, no lost update, no read of a half-linked cluster: each read returns, for every
 * byte, a value some write put there (or the backing data), the final contents equal the
 * writes applied in the order they were issued, and `qemu-img check` finds no errors or leaks.
 */
import * as fs from 'node:fs'
import * as path from 'node:path'
import { afterAll, beforeAll, describe, expect, test } from 'vitest'
import { Qcow2Image } from '../../lib/image.js'
import { Rng } from '../fuzz/mutate.js'
import { makeTempDir, qemuImg, qemuIo, removeTempDir, requireQemu, run } from '../helpers/qemu.js'

const KiB = 1024
const SIZE = 4 * 1024 * KiB
const qemu = requireQemu('concurrent requests')

describe.skipIf(!qemu)('concurrent requests on one image', () => {
  const tools = qemu!
  let dir = ''
  beforeAll(async () => {
    dir = await makeTempDir('concurrency')
  })
  afterAll(async () => {
    if (dir) await removeTempDir(dir)
  })

  test.each([
    { name: 'plain 64k clusters', opts: 'cluster_size=64k', backing: false },
    { name: 'extended L2 over a backing file', opts: 'cluster_size=64k,extended_l2=on', backing: true },
    { name: '4k clusters over a backing file', opts: 'cluster_size=4k', backing: true },
  ])('$name', async ({ name, opts, backing }) => {
    const slug = name.replace(/\W+/g, '-')
    const image = path.join(dir, `${slug}.qcow2`)
    const model = Buffer.alloc(SIZE)
    if (backing) {
      const base = path.join(dir, `${slug}-base.qcow2`)
      await qemuImg(tools, ['create', '-q', '-f', 'qcow2', base, String(SIZE)])
      await qemuIo(tools, base, [`write -q -P 0x3c 0 ${SIZE}`])
      model.fill(0x3c)
      await qemuImg(tools, ['create', '-q', '-f', 'qcow2', '-o', opts, '-b', path.basename(base), '-F', 'qcow2', image])
    } else {
      await qemuImg(tools, ['create', '-q', '-f', 'qcow2', '-o', opts, image, String(SIZE)])
    }
    const img = await Qcow2Image.open(image, { readOnly: false })
    const rng = new Rng(7)
    const pending: Promise<unknown>[] = []
    const readChecks: Promise<void>[] = []
    const seen = new Set<number>([0, model[0]!])
    for (let i = 0; i < 400; i++) {
      // Offsets crowd into the first 512 KiB so that requests overlap a lot.
      const offset = rng.below(512 * KiB - 8 * KiB) + (rng.below(4) === 0 ? rng.below(SIZE - 520 * KiB) : 0)
      const length = 1 + rng.below(70 * KiB)
      const kind = rng.below(10)
      if (kind < 6) {
        const fill = 1 + (i % 250)
        seen.add(fill)
        model.fill(fill, offset, offset + length)
        pending.push(img.write(Buffer.alloc(length, fill), offset))
      } else if (kind < 7) {
        model.fill(0, offset, offset + length)
        pending.push(img.writeZeroes(offset, length))
      } else if (kind < 9) {
        const buf = Buffer.alloc(length)
        readChecks.push(
          img.read(buf, offset).then(() => {
            for (let b = 0; b < buf.length; b += 97) expect(seen.has(buf[b]!), `byte ${offset + b} = ${buf[b]}`).toBe(true)
          }),
        )
      } else {
        pending.push(img.flush())
      }
    }
    await Promise.all([...pending, ...readChecks])
    const final = Buffer.alloc(SIZE)
    await img.read(final, 0)
    expect(final.equals(model)).toBe(true)
    await img.close()
    const check = await run(tools.qemuImg, ['check', '--output=json', image])
    const report = JSON.parse(check.stdout) as { corruptions?: number; leaks?: number; 'check-errors'?: number }
    expect([report.corruptions ?? 0, report.leaks ?? 0, report['check-errors'] ?? 0]).toEqual([0, 0, 0])
    const raw = path.join(dir, `${slug}.model`)
    fs.writeFileSync(raw, model)
    await run(tools.qemuImg, ['compare', '-q', '-f', 'raw', '-F', 'qcow2', raw, image])
  })
})

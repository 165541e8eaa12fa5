/*
 * Differential random-operation tests of the write path: a seeded sequence of writes (unaligned,
 * cluster-crossing, zero-filled), zero writes, resizes and reads goes to the engine and to an
 * in-memory raw model; every read must match the model, and after close `qemu-img check`
 * finds no errors and no leaks and `qemu-img compare` says the image equals the model.
 */
import * as fs from 'node:fs'
import * as path from 'node:path'
import { afterAll, beforeAll, describe, expect, test } from 'vitest'
import { Qcow2Image } from '../../lib/image.js'
import { type QemuTools, makeTempDir, qemuImg as runQemuImg, qemuIo as runQemuIo, removeTempDir, requireQemu } from '../helpers/qemu.js'
import { uniform } from '../helpers/random.js'

const qemu = requireQemu('write path random operations')
const describeQemu = describe.skipIf(!qemu)
const qemuImg = (args: string[]): Promise<string> => runQemuImg(qemu as QemuTools, args)
const qemuIo = (image: string, commands: string[]): Promise<string> => runQemuIo(qemu as QemuTools, image, commands)

let dir: string
beforeAll(async () => {
  dir = await makeTempDir('write-random')
})
afterAll(async () => {
  await removeTempDir(dir)
})


interface Scenario {
  name: string
  clusterSize: number
  extendedL2: boolean
  backing: boolean
  snapshot: boolean
  compat?: '0.10' | '1.1'
  operations: number
}

const scenarios: Scenario[] = []
for (const clusterSize of [512, 4096, 65536, 2 * 1024 * 1024]) {
  for (const extendedL2 of [false, true]) {
    if (extendedL2 && clusterSize < 16384) continue
    for (const backing of [false, true]) {
      scenarios.push({ name: `cs=${clusterSize} extl2=${extendedL2} backing=${backing}`, clusterSize, extendedL2, backing, snapshot: false, operations: clusterSize >= 2097152 ? 300 : 1500 })
    }
  }
}
scenarios.push({ name: 'cs=65536 snapshot', clusterSize: 65536, extendedL2: false, backing: false, snapshot: true, operations: 1000 })
scenarios.push({ name: 'cs=65536 extl2 snapshot backing', clusterSize: 65536, extendedL2: true, backing: true, snapshot: true, operations: 1000 })
scenarios.push({ name: 'cs=4096 v2 backing', clusterSize: 4096, extendedL2: false, backing: true, snapshot: false, compat: '0.10', operations: 1000 })

describeQemu('write path against a raw model', () => {
  test.each(scenarios)('$name', async (sc) => {
    const seed = (sc.clusterSize * 31 + (sc.extendedL2 ? 7 : 0) + (sc.backing ? 3 : 0) + (sc.snapshot ? 1 : 0)) >>> 0
    const random = uniform(seed)
    const tag = sc.name.replace(/[^a-z0-9]+/gi, '-')
    const image = path.join(dir, `${tag}.qcow2`)
    const size0 = Math.max(8 * sc.clusterSize, 3 * 1024 * 1024)
    let model = Buffer.alloc(size0)
    const opts = [`cluster_size=${sc.clusterSize}`, `extended_l2=${sc.extendedL2 ? 'on' : 'off'}`, `compat=${sc.compat ?? '1.1'}`]
    if (sc.backing) {
      const base = path.join(dir, `${tag}.base.raw`)
      const baseBytes = Buffer.alloc(size0 - 12345)
      for (let i = 0; i < baseBytes.length; i += 4096) baseBytes.fill((i / 4096) & 0xff, i, Math.min(i + 4096, baseBytes.length))
      fs.writeFileSync(base, baseBytes)
      baseBytes.copy(model)
      await qemuImg(['create', '-q', '-f', 'qcow2', '-o', opts.join(','), '-b', path.basename(base), '-F', 'raw', image, String(size0)])
    } else {
      await qemuImg(['create', '-q', '-f', 'qcow2', '-o', opts.join(','), image, String(size0)])
    }
    if (sc.snapshot) {
      await qemuIo(image, ['write -P 0x5c 0 1M'])
      model.fill(0x5c, 0, 1024 * 1024)
      await qemuImg(['snapshot', '-c', 'snap', image])
    }
    const snapshotView = sc.snapshot ? Buffer.from(model) : undefined
    let img = await Qcow2Image.open(image, { readOnly: false })
    const log: string[] = []
    try {
      for (let op = 0; op < sc.operations; op++) {
        const size = img.virtualSize
        const r = random()
        const maxLen = Math.min(size, 3 * sc.clusterSize + 7000)
        const len = 1 + Math.floor(random() * maxLen)
        const offset = Math.floor(random() * (size - len + 1))
        if (r < 0.45) {
          const data = Buffer.alloc(len)
          const fillByte = Math.floor(random() * 256)
          for (let i = 0; i < len; i += 509) data.fill((fillByte + i) & 0xff, i, Math.min(i + 509, len))
          log.push(`write ${offset} ${len}`)
          await img.write(data, offset)
          data.copy(model, offset)
        } else if (r < 0.6) {
          log.push(`zero-data ${offset} ${len}`)
          await img.write(Buffer.alloc(len), offset)
          model.fill(0, offset, offset + len)
        } else if (r < 0.68) {
          // Cluster-aligned zero writes exercise zero clusters and subclusters.
          const cs = sc.clusterSize
          const alignedOffset = Math.floor(offset / cs) * cs
          const alignedLen = Math.min(size - alignedOffset, Math.max(cs, Math.floor(len / cs) * cs))
          log.push(`zeroes ${alignedOffset} ${alignedLen}`)
          await img.writeZeroes(alignedOffset, alignedLen)
          model.fill(0, alignedOffset, alignedOffset + alignedLen)
        } else if (r < 0.72 && !sc.snapshot) {
          const requested = Math.max(sc.clusterSize, Math.floor(size0 * (0.5 + random())))
          // Sizes round up to whole 512-byte sectors, as QEMU needs.
          const newSize = Math.ceil(requested / 512) * 512
          log.push(`resize ${requested}`)
          await img.resize(requested)
          expect(img.virtualSize).toBe(newSize)
          const next = Buffer.alloc(newSize)
          model.copy(next, 0, 0, Math.min(newSize, model.length))
          model = next
        } else if (r < 0.74) {
          log.push('flush')
          await img.flush()
        } else if (r < 0.75) {
          log.push('reopen')
          await img.close()
          img = await Qcow2Image.open(image, { readOnly: false })
        } else {
          const got = Buffer.alloc(len)
          await img.read(got, offset)
          const want = model.subarray(offset, offset + len)
          if (!got.equals(want)) {
            let at = 0
            while (got[at] === want[at]) at++
            throw new Error(`seed ${seed}: read ${offset}+${len} differs at ${offset + at} after: ${log.slice(-8).join('; ')}`)
          }
        }
      }
      const all = Buffer.alloc(img.virtualSize)
      await img.read(all, 0)
      expect(all.equals(model), `seed ${seed}: final read differs`).toBe(true)
    } finally {
      await img.close()
    }
    const check = await qemuImg(['check', '--output=json', image]).catch((err: Error) => err.message)
    const report = JSON.parse(check.slice(check.indexOf('{'))) as Record<string, unknown>
    expect(report['check-errors'] ?? 0, `seed ${seed}: ${check}`).toBe(0)
    expect(report['corruptions'] ?? 0, `seed ${seed}: ${check}`).toBe(0)
    expect(report['leaks'] ?? 0, `seed ${seed}: ${check}`).toBe(0)
    const raw = path.join(dir, `${tag}.model.raw`)
    fs.writeFileSync(raw, model)
    const cmp = await qemuImg(['compare', '-f', 'raw', '-F', 'qcow2', raw, image]).catch((e: Error) => e.message)
    expect(cmp, `seed ${seed}`).toMatch(/Images are identical/)
    if (snapshotView) {
      const snapRaw = path.join(dir, `${tag}.snap.raw`)
      await qemuImg(['convert', '-l', 'snapshot.name=snap', '-O', 'raw', image, snapRaw])
      expect(fs.readFileSync(snapRaw).equals(snapshotView), `seed ${seed}: snapshot view changed`).toBe(true)
    }
  })
})

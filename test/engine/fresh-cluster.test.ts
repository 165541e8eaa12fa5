/*
 * Allocating writes without extended L2 (lib/engine/write-path.ts, #writeWholeCluster): a
 * partial write into a cluster allocated past the end of the file, whose other bytes read as
 * zeros, writes only its own bytes and extends the file over the cluster; everywhere else the
 * whole cluster is written (over a backing file, into a reused free cluster). Checked by
 * counting the data bytes written, reading back, and `qemu-img check` / `compare`.
 */
import * as fs from 'node:fs'
import * as path from 'node:path'
import { afterAll, beforeAll, describe, expect, test } from 'vitest'
import { Qcow2Image } from '../../lib/image.js'
import { NodeBlockFile } from '../../lib/io/block-file.js'
import { CountingFile } from '../helpers/counting-file.js'
import { makeTempDir, qemuImg, qemuIo, removeTempDir, requireQemu, run } from '../helpers/qemu.js'

const KiB = 1024
const CLUSTER = 64 * KiB
const qemu = requireQemu('allocating writes into fresh clusters')

describe.skipIf(!qemu)('allocating writes into fresh clusters', () => {
  const tools = qemu!
  let dir = ''

  beforeAll(async () => {
    dir = await makeTempDir('fresh-cluster')
  })
  afterAll(async () => {
    if (dir) await removeTempDir(dir)
  })

  async function openCounting(image: string) {
    const counting = new CountingFile(NodeBlockFile.open(image, { readOnly: false }))
    const img = Qcow2Image.openFile(counting, image, { readOnly: false })
    return { img, counting }
  }

  async function expectMatches(image: string, model: Buffer): Promise<void> {
    await qemuImg(tools, ['check', '-q', image])
    const raw = path.join(dir, `${path.basename(image)}.model`)
    fs.writeFileSync(raw, model)
    await run(tools.qemuImg, ['compare', '-q', '-f', 'raw', '-F', 'qcow2', raw, image])
  }

  test('a 4 KiB write into a fresh cluster past the end of the file writes 4 KiB', async () => {
    const image = path.join(dir, 'plain.qcow2')
    await qemuImg(tools, ['create', '-q', '-f', 'qcow2', image, '1M'])
    const { img, counting } = await openCounting(image)
    const model = Buffer.alloc(1024 * KiB)
    const chunk = Buffer.alloc(4 * KiB, 0xa5)
    await img.write(chunk, 3 * CLUSTER + 12 * KiB)
    chunk.copy(model, 3 * CLUSTER + 12 * KiB)
    expect(counting.written.get('data')).toBe(4 * KiB)
    // The file covers the whole cluster, so the cluster never lies past its end.
    const readBack = Buffer.alloc(CLUSTER)
    await img.read(readBack, 3 * CLUSTER)
    expect(readBack.equals(model.subarray(3 * CLUSTER, 4 * CLUSTER))).toBe(true)
    // A chunk at a cluster's end, then one at its start: the same, each on its own cluster.
    await img.write(chunk, 6 * CLUSTER - 4 * KiB)
    chunk.copy(model, 6 * CLUSTER - 4 * KiB)
    await img.write(chunk, 7 * CLUSTER)
    chunk.copy(model, 7 * CLUSTER)
    expect(counting.written.get('data')).toBe(12 * KiB)
    await img.close()
    expect(fs.statSync(image).size % CLUSTER).toBe(0)
    await expectMatches(image, model)
  })

  test('the whole cluster is written over a backing file', async () => {
    const base = path.join(dir, 'base.qcow2')
    const overlay = path.join(dir, 'overlay.qcow2')
    await qemuImg(tools, ['create', '-q', '-f', 'qcow2', base, '1M'])
    await qemuIo(tools, base, ['write -q -P 0x5b 0 1M'])
    await qemuImg(tools, ['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', overlay])
    const { img, counting } = await openCounting(overlay)
    const model = Buffer.alloc(1024 * KiB, 0x5b)
    const chunk = Buffer.alloc(4 * KiB, 0xc4)
    await img.write(chunk, 2 * CLUSTER + 8 * KiB)
    chunk.copy(model, 2 * CLUSTER + 8 * KiB)
    expect(counting.written.get('data')).toBe(CLUSTER)
    await img.close()
    await expectMatches(overlay, model)
  })

  test('a reused free cluster inside the file is written whole, so its old bytes go', async () => {
    const image = path.join(dir, 'reuse.qcow2')
    await qemuImg(tools, ['create', '-q', '-f', 'qcow2', image, '1M'])
    let { img, counting } = await openCounting(image)
    const model = Buffer.alloc(1024 * KiB)
    const chunk = Buffer.alloc(4 * KiB, 0xc4)
    await img.write(chunk, 0)
    expect(counting.written.get('data')).toBe(4 * KiB)
    // A whole-cluster zero write releases the host cluster; it stays inside the file.
    await img.writeZeroes(0, CLUSTER)
    await img.close()
    ;({ img, counting } = await openCounting(image))
    await img.write(chunk, 4 * CLUSTER + 32 * KiB)
    chunk.copy(model, 4 * CLUSTER + 32 * KiB)
    expect(counting.written.get('data')).toBe(CLUSTER)
    await img.close()
    await expectMatches(image, model)
  })
})

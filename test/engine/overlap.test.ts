/*
 * The metadata overlap check (lib/meta/overlap-guard.ts): a crafted L2 entry that points guest
 * data at the image's own L1 table, or at its refcount table, makes the write fail with EIO
 * (CorruptImageError), marks the image corrupt and read-only, and leaves the table intact.
 */
import * as fs from 'node:fs'
import * as path from 'node:path'
import { afterAll, beforeAll, describe, expect, test } from 'vitest'
import { CorruptImageError, ReadOnlyError } from '../../lib/errors.js'
import { Qcow2Image } from '../../lib/image.js'
import { entryFileOffset, isMarkedCorrupt, pokeFileBigEndian, readLayout } from '../helpers/l2-inspect.js'
import { makeTempDir, qemuImg, qemuIo, removeTempDir, requireQemu } from '../helpers/qemu.js'

const qemu = requireQemu('metadata overlap check')
/** An L2 entry's COPIED flag (bit 63). */
const COPIED = 1n << 63n

describe.skipIf(!qemu)('metadata overlap check', () => {
  const tools = qemu!
  let dir = ''
  beforeAll(async () => {
    dir = await makeTempDir('overlap')
  })
  afterAll(async () => {
    if (dir) await removeTempDir(dir)
  })

  test.each(['l1', 'reftable'] as const)('a data cluster pointed at the %s is refused, the image marked corrupt', async (target) => {
    const image = path.join(dir, `${target}.qcow2`)
    await qemuImg(tools, ['create', '-q', '-f', 'qcow2', image, '1M'])
    await qemuIo(tools, image, ['write -q -P 0x11 0 64k'])
    const layout = readLayout(image)
    // refcount_table_offset: header offset 48 (8 bytes, big-endian).
    const refcountTableOffset = Number(fs.readFileSync(image).readBigUInt64BE(48))
    const targetOffset = target === 'l1' ? layout.l1TableOffset : refcountTableOffset
    pokeFileBigEndian(image, entryFileOffset(image, 0)!, 8, COPIED | BigInt(targetOffset))
    const before = fs.readFileSync(image).subarray(targetOffset, targetOffset + 65536)

    const img = await Qcow2Image.open(image, { readOnly: false })
    await expect(img.write(Buffer.alloc(4096, 0xee), 0)).rejects.toBeInstanceOf(CorruptImageError)
    await expect(img.write(Buffer.alloc(4096, 0xee), 65536)).rejects.toBeInstanceOf(ReadOnlyError)
    await img.close()
    expect(fs.readFileSync(image).subarray(targetOffset, targetOffset + 65536).equals(before)).toBe(true)
    expect(isMarkedCorrupt(image)).toBe(true)
  })
})

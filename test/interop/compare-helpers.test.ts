/*
 * The comparison helpers the interop tests rely on, checked against an in-memory disk: they
 * must see every byte, report the first difference at the right guest offset, and notice a
 * size mismatch. (If they could not fail, neither could the interop tests.)
 */
import { writeFile } from 'node:fs/promises'
import * as path from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import {
  VARYING_CHUNK_SIZES,
  chunkPlan,
  describeDifference,
  diffDiskWithRaw,
  type ReadableDisk,
  firstDifference,
  hashDiskSequential,
  readDiskConcurrently,
  sha256,
} from '../helpers/fixtures.js'
import { makeTempDir, removeTempDir } from '../helpers/qemu.js'

/** A disk backed by a buffer; records every read so tests can see how it was read. */
class MemoryDisk implements ReadableDisk {
  readonly reads: [number, number][] = []
  constructor(readonly bytes: Uint8Array) {}
  get virtualSize(): number {
    return this.bytes.length
  }
  async read(buf: Uint8Array, guestOffset: number): Promise<void> {
    if (guestOffset < 0 || guestOffset + buf.length > this.bytes.length) throw new RangeError('read past the end')
    this.reads.push([guestOffset, buf.length])
    // Resolve later than synchronously so concurrent readers really interleave.
    await new Promise((resolve) => setImmediate(resolve))
    buf.set(this.bytes.subarray(guestOffset, guestOffset + buf.length))
  }
}

function patterned(size: number): Uint8Array {
  const b = new Uint8Array(size)
  for (let i = 0; i < size; i++) b[i] = (i * 31 + (i >> 9)) & 0xff
  return b
}

describe('chunkPlan', () => {
  it('covers [0, size) exactly, in order, with unaligned pieces', () => {
    const size = 3 * 1024 * 1024 + 1234
    const plan = chunkPlan(size)
    let expected = 0
    for (const [guestOffset, length] of plan) {
      expect(guestOffset).toBe(expected)
      expect(length).toBeGreaterThan(0)
      expected += length
    }
    expect(expected).toBe(size)
    expect(plan.some(([o]) => o % 512 !== 0)).toBe(true)
    expect(plan.some(([, l]) => l >= 1024 * 1024)).toBe(true)
  })

  it('cycles through the varying sizes', () => {
    const plan = chunkPlan(10 * 1024 * 1024)
    expect(plan.slice(0, VARYING_CHUNK_SIZES.length).map(([, l]) => l)).toEqual([...VARYING_CHUNK_SIZES])
  })
})

describe('whole-disk reads', () => {
  const bytes = patterned(2 * 1024 * 1024 + 777)

  it('hashDiskSequential hashes every byte once', async () => {
    const disk = new MemoryDisk(bytes)
    expect(await hashDiskSequential(disk)).toBe(sha256(bytes))
    expect(disk.reads.reduce((n, [, l]) => n + l, 0)).toBe(bytes.length)
  })

  it('readDiskConcurrently returns the same bytes, with reads out of order', async () => {
    const disk = new MemoryDisk(bytes)
    const whole = await readDiskConcurrently(disk, 8)
    expect(firstDifference(whole, bytes)).toBe(-1)
    const offsets = disk.reads.map(([o]) => o)
    expect(offsets).not.toEqual([...offsets].sort((a, b) => a - b))
  })

  it('a single changed byte changes the hash', async () => {
    const changed = bytes.slice()
    changed[1_500_000] = changed[1_500_000]! ^ 1
    expect(await hashDiskSequential(new MemoryDisk(changed))).not.toBe(sha256(bytes))
  })
})

describe('differences', () => {
  it('firstDifference finds the first differing index, or -1', () => {
    const a = patterned(100_000)
    expect(firstDifference(a, a.slice())).toBe(-1)
    const b = a.slice()
    b[70_001] = b[70_001]! ^ 0x80
    b[90_000] = b[90_000]! ^ 1
    expect(firstDifference(a, b)).toBe(70_001)
    expect(firstDifference(a, a.subarray(0, 5000))).toBe(5000)
  })

  it('describeDifference names the offset in hex and both bytes', () => {
    const a = new Uint8Array([1, 2, 3, 4])
    expect(describeDifference(a, new Uint8Array([1, 2, 3, 4]))).toBeUndefined()
    expect(describeDifference(a, new Uint8Array([1, 2, 9, 4]), 'guest offset')).toBe(
      'first difference at guest offset 0x2 (2): 0x03 vs 0x09',
    )
    expect(describeDifference(a, new Uint8Array([1, 2]))).toMatch(/lengths differ: 4 vs 2/)
  })

  describe('diffDiskWithRaw', () => {
    let dir = ''
    const bytes = patterned(1024 * 1024 + 4096 + 3)
    beforeAll(async () => {
      dir = await makeTempDir('compare-helpers')
      await writeFile(path.join(dir, 'same.raw'), bytes)
      const late = bytes.slice()
      late[bytes.length - 2] = late[bytes.length - 2]! ^ 0xff
      await writeFile(path.join(dir, 'late.raw'), late)
      await writeFile(path.join(dir, 'short.raw'), bytes.subarray(0, bytes.length - 512))
    })
    afterAll(async () => {
      if (dir) await removeTempDir(dir)
    })

    it('is silent when the disk equals the raw file', async () => {
      expect(await diffDiskWithRaw(new MemoryDisk(bytes), path.join(dir, 'same.raw'))).toBeUndefined()
    })

    it('reports the first differing guest offset', async () => {
      const at = bytes.length - 2
      const diff = await diffDiskWithRaw(new MemoryDisk(bytes), path.join(dir, 'late.raw'))
      expect(diff).toContain(`first difference at guest offset 0x${at.toString(16)} (${at})`)
    })

    it('reports a size mismatch', async () => {
      const diff = await diffDiskWithRaw(new MemoryDisk(bytes), path.join(dir, 'short.raw'))
      expect(diff).toMatch(/virtual size \d+ differs from qemu-img's raw size \d+/)
    })
  })
})

/*
 * The test file layers the crash tests stand on: MemoryBlockFile behaves like NodeBlockFile
 * (checked side by side on a real file), RecordingFile logs what it passes on, in order, with
 * copies of the bytes, and replaying a recorded engine run rebuilds the engine's file exactly.
 */
import * as fs from 'node:fs'
import * as path from 'node:path'
import { afterAll, beforeAll, describe, expect, test } from 'vitest'
import { Qcow2Image } from '../../lib/image.js'
import { NodeBlockFile } from '../../lib/io/block-file.js'
import { MemoryBlockFile } from '../helpers/memory-file.js'
import { type QemuTools, makeTempDir, qemuImg, removeTempDir, requireQemu } from '../helpers/qemu.js'
import { RecordingFile, replayChanges } from '../helpers/recording-file.js'
import { makeRandom } from './workloads.js'

let dir: string
beforeAll(async () => {
  dir = await makeTempDir('recording-file')
})
afterAll(async () => {
  await removeTempDir(dir)
})

describe('MemoryBlockFile', () => {
  test('reads short only at the end, grows on writes past it, gaps read as zeros', () => {
    const f = MemoryBlockFile.fromBytes('mem', Uint8Array.from([1, 2, 3, 4]))
    expect(f.size).toBe(4)
    const buf = new Uint8Array(6).fill(9)
    expect(f.pread(buf, 2)).toBe(2)
    expect([...buf.subarray(0, 2)]).toEqual([3, 4])
    expect(f.pread(buf, 4)).toBe(0)
    f.pwrite(Uint8Array.from([7, 7]), 10, 'data')
    expect(f.size).toBe(12)
    const all = new Uint8Array(12)
    expect(f.pread(all, 0)).toBe(12)
    expect([...all]).toEqual([1, 2, 3, 4, 0, 0, 0, 0, 0, 0, 7, 7])
  })

  test('a shrinking truncate forgets the tail: growing again reads zeros', () => {
    const f = MemoryBlockFile.fromBytes('mem', new Uint8Array(100).fill(5))
    f.truncate(10)
    f.truncate(50)
    const buf = new Uint8Array(50)
    expect(f.pread(buf, 0)).toBe(50)
    expect(buf.subarray(0, 10).every((b) => b === 5)).toBe(true)
    expect(buf.subarray(10).every((b) => b === 0)).toBe(true)
  })

  test('a read-only view sees later writes and refuses its own', () => {
    const f = MemoryBlockFile.fromBytes('mem', new Uint8Array(8))
    const view = f.readOnlyView()
    expect(view.writable).toBe(false)
    f.pwrite(Uint8Array.from([42]), 3, 'data')
    f.pwrite(Uint8Array.from([43]), 20, 'data')
    expect(view.size).toBe(21)
    const buf = new Uint8Array(1)
    view.pread(buf, 3)
    expect(buf[0]).toBe(42)
    expect(() => view.pwrite(buf, 0, 'data')).toThrow(/read-only/)
    expect(() => view.sync()).toThrow(/read-only/)
    expect(() => view.truncate(0)).toThrow(/read-only/)
    view.close()
    // Closing a view leaves the file usable.
    expect(f.pread(buf, 20)).toBe(1)
  })

  test('fromBytes copies; nothing works after close', () => {
    const source = Uint8Array.from([1, 2, 3])
    const f = MemoryBlockFile.fromBytes('mem', source)
    source[0] = 99
    expect(f.bytes()[0]).toBe(1)
    f.sync()
    f.sync()
    expect(f.syncCount).toBe(2)
    f.close()
    expect(() => f.pread(new Uint8Array(1), 0)).toThrow(/closed/)
  })

  test('same results as NodeBlockFile for a random sequence of writes, truncates and reads', () => {
    const file = path.join(dir, 'side-by-side.bin')
    fs.writeFileSync(file, Buffer.alloc(3000, 0x11))
    const node = NodeBlockFile.open(file, { readOnly: false })
    const mem = MemoryBlockFile.fromFile(file)
    const random = makeRandom(77)
    try {
      for (let i = 0; i < 400; i++) {
        const r = random.float()
        const offset = random.int(20000)
        if (r < 0.45) {
          const bytes = random.bytes(1 + random.int(3000))
          node.pwrite(bytes, offset, 'data')
          mem.pwrite(bytes, offset, 'data')
        } else if (r < 0.55) {
          node.truncate(offset)
          mem.truncate(offset)
        } else {
          const a = new Uint8Array(1 + random.int(5000))
          const b = new Uint8Array(a.length)
          expect(mem.pread(b, offset), `step ${i}: read ${a.length} at ${offset}`).toBe(node.pread(a, offset))
          expect(Buffer.from(b).equals(Buffer.from(a)), `step ${i}: read ${a.length} at ${offset}`).toBe(true)
        }
        expect(mem.size, `step ${i}`).toBe(node.size)
      }
    } finally {
      node.close()
    }
    expect(Buffer.from(mem.bytes()).equals(fs.readFileSync(file))).toBe(true)
  })
})

describe('RecordingFile', () => {
  test('logs writes (with copies of the bytes), truncates, syncs and marks in order', () => {
    const inner = MemoryBlockFile.fromBytes('mem', new Uint8Array(16))
    const rec = new RecordingFile(inner)
    const buf = Uint8Array.from([1, 2, 3])
    rec.pwrite(buf, 4, 'l2')
    buf[0] = 100
    rec.sync()
    rec.mark('flush-begin')
    rec.truncate(8)
    rec.pwrite(buf, 30, 'header')
    expect(rec.events.map((e) => e.kind)).toEqual(['write', 'sync', 'mark', 'truncate', 'write'])
    expect(rec.events.map((e) => e.seq)).toEqual([0, 1, 2, 3, 4])
    expect(rec.events.map((e) => e.change)).toEqual([0, 1, 1, 1, 2])
    expect(rec.changeCount).toBe(3)
    const first = rec.changes[0]!
    expect(first.kind === 'write' && [...first.bytes]).toEqual([1, 2, 3])
    expect(first.kind === 'write' && first.tag).toBe('l2')
    expect(inner.syncCount).toBe(1)
    expect(rec.size).toBe(33)
  })

  test('a call the inner file refuses is not logged', () => {
    const inner = MemoryBlockFile.fromBytes('mem', new Uint8Array(4), { readOnly: true })
    const rec = new RecordingFile(inner)
    expect(() => rec.pwrite(new Uint8Array(1), 0, 'data')).toThrow()
    expect(() => rec.sync()).toThrow()
    expect(rec.events).toEqual([])
  })
})

const qemu = requireQemu('recording file replay')

describe.skipIf(!qemu)('replaying a recorded engine run', () => {
  test('rebuilds the file the engine wrote, byte for byte', async () => {
    const image = path.join(dir, 'replay.qcow2')
    await qemuImg(qemu as QemuTools, ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', image, '4M'])
    const initial = fs.readFileSync(image)
    const mem = MemoryBlockFile.fromBytes(image, initial)
    const rec = new RecordingFile(mem)
    const img = Qcow2Image.openFile(rec, image, { readOnly: false })
    const random = makeRandom(5)
    for (let i = 0; i < 30; i++) {
      await img.write(random.bytes(1 + random.int(20000)), random.int(4 * 1024 * 1024 - 20000))
      if (i % 7 === 6) await img.flush()
    }
    await img.resize(6 * 1024 * 1024)
    await img.close()
    expect(rec.changeCount).toBeGreaterThan(30)
    expect(rec.events.filter((e) => e.kind === 'sync').length).toBeGreaterThan(4)

    const target = MemoryBlockFile.fromBytes(image, initial)
    replayChanges(target, rec.changes, 0, rec.changeCount)
    expect(Buffer.from(target.bytes()).equals(Buffer.from(mem.bytes()))).toBe(true)
    // The image file itself was never written.
    expect(fs.readFileSync(image).equals(initial)).toBe(true)
  })
})

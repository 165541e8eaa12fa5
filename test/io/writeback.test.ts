/*
 * Early writeback (lib/io/writeback.ts, lib/io/native/file_writeback.c): which spans a file
 * hands to the kernel's writeback, and the addon's calls on real files.
 */
import * as fs from 'node:fs'
import * as os from 'node:os'
import * as path from 'node:path'
import { afterAll, beforeAll, describe, expect, test, vi } from 'vitest'
import { NodeBlockFile } from '../../lib/io/block-file.js'
import { EarlyWriteback, WRITEBACK_BATCH_BYTES, type WritebackCalls, writebackCalls } from '../../lib/io/writeback.js'

const MIB = 1024 * 1024

/** Calls that record the starts; `busy` is what inFlight() answers. */
function fakeCalls(): WritebackCalls & { starts: [number, number, number][]; busy: number; waited: number } {
  const calls = {
    starts: [] as [number, number, number][],
    busy: 0,
    waited: 0,
    start(fd: number, offset: number, length: number) {
      calls.starts.push([fd, offset, length])
    },
    waitIdle() {
      calls.waited++
    },
    inFlight() {
      return calls.busy
    },
  }
  return calls
}

describe('EarlyWriteback: the spans it starts', () => {
  test('sequential writes: every batch of written bytes, as one span', () => {
    const calls = fakeCalls()
    const wb = new EarlyWriteback(7, calls)
    for (let at = 0; at < 2 * WRITEBACK_BATCH_BYTES + MIB; at += MIB) wb.wrote(at, MIB)
    expect(calls.starts).toEqual([
      [7, 0, WRITEBACK_BATCH_BYTES],
      [7, WRITEBACK_BATCH_BYTES, WRITEBACK_BATCH_BYTES],
    ])
  })

  test('writes in any order inside a dense span: the span, from its lowest to its highest byte', () => {
    const calls = fakeCalls()
    const wb = new EarlyWriteback(3, calls)
    const base = 100 * MIB
    // Pieces of 2 MiB in reverse order, with a 2 MiB gap every other piece: half the span written.
    const pieces = WRITEBACK_BATCH_BYTES / (2 * MIB)
    for (let i = pieces - 1; i >= 0; i--) wb.wrote(base + i * 4 * MIB, 2 * MIB)
    expect(calls.starts).toEqual([[3, base, (pieces - 1) * 4 * MIB + 2 * MIB]])
  })

  test('scattered writes (less than half of the span written) are left to the kernel', () => {
    const calls = fakeCalls()
    const wb = new EarlyWriteback(3, calls)
    for (let i = 0; i < (2 * WRITEBACK_BATCH_BYTES) / 4096; i++) wb.wrote(i * 64 * 1024, 4096)
    expect(calls.starts).toEqual([])
  })

  test('while two starts run, the span grows and is started whole afterwards', () => {
    const calls = fakeCalls()
    const wb = new EarlyWriteback(5, calls)
    calls.busy = 2
    for (let at = 0; at < WRITEBACK_BATCH_BYTES + 4 * MIB; at += MIB) wb.wrote(at, MIB)
    expect(calls.starts).toEqual([])
    calls.busy = 1
    wb.wrote(WRITEBACK_BATCH_BYTES + 4 * MIB, MIB)
    expect(calls.starts).toEqual([[5, 0, WRITEBACK_BATCH_BYTES + 5 * MIB]])
  })

  test('close waits until no start runs', () => {
    const calls = fakeCalls()
    new EarlyWriteback(5, calls).close()
    expect(calls.waited).toBe(1)
  })
})

describe('the file_writeback addon', () => {
  let dir = ''
  beforeAll(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qcow2fs-writeback-'))
  })
  afterAll(() => fs.rmSync(dir, { recursive: true, force: true }))

  const calls = writebackCalls()
  // `make build` builds it; a checkout without it runs without early writeback.
  const withAddon = calls || process.env.CI === 'true' ? test : test.skip

  withAddon('starts writeback of a written range and reports 0; a closed descriptor gets EBADF', async () => {
    const c = calls!
    const file = path.join(dir, 'f')
    const fd = fs.openSync(file, 'w')
    fs.writeSync(fd, Buffer.alloc(4 * MIB, 1))
    const results = await Promise.all([
      new Promise<number>((done) => c.start(fd, 0, 4 * MIB, done)),
      new Promise<number>((done) => c.start(fd, MIB, 0, done)),
    ])
    expect(results).toEqual([0, 0])
    fs.closeSync(fd)
    const closed = await new Promise<number>((done) => c.start(fd, 0, 4096, done))
    expect(closed).toBe(os.constants.errno.EBADF)
    expect(c.inFlight()).toBe(0)
  })

  withAddon('waitIdle returns once the queued starts have run; bad arguments throw', async () => {
    const c = calls!
    const fd = fs.openSync(path.join(dir, 'g'), 'w')
    fs.writeSync(fd, Buffer.alloc(MIB, 2))
    const done = vi.fn()
    for (let i = 0; i < 8; i++) c.start(fd, 0, MIB, done)
    expect(c.inFlight()).toBe(8)
    c.waitIdle()
    fs.closeSync(fd)
    await vi.waitFor(() => expect(done).toHaveBeenCalledTimes(8))
    expect(done.mock.calls.every(([errno]) => errno === 0)).toBe(true)
    expect(() => c.start(-1, 0, 1, done)).toThrow(TypeError)
    expect(() => c.start(fd, 0, 1, undefined as unknown as () => void)).toThrow(TypeError)
  })

  withAddon('a writable NodeBlockFile starts writeback of its sequential writes; a read-only one never', () => {
    const c = calls!
    const start = vi.spyOn(c, 'start')
    try {
      const file = path.join(dir, 'image')
      fs.writeFileSync(file, '')
      const rw = NodeBlockFile.open(file, { readOnly: false, lock: 'none' })
      const chunk = new Uint8Array(MIB).fill(3)
      for (let at = 0; at < WRITEBACK_BATCH_BYTES; at += MIB) rw.pwrite(chunk, at, 'data')
      rw.close()
      expect(start).toHaveBeenCalledTimes(1)
      expect(start.mock.calls[0]!.slice(1, 3)).toEqual([0, WRITEBACK_BATCH_BYTES])
      const ro = NodeBlockFile.open(file, { readOnly: true, lock: 'none' })
      ro.close()
      expect(start).toHaveBeenCalledTimes(1)
    } finally {
      start.mockRestore()
    }
  })
})

/*
 * Writes answered before they are stored (RawFilesAdapter.writeEarly): the answer goes out
 * first, the bytes are copied before libfuse can reuse its buffer, a failed store is kept and
 * reported to the file's next write, flush or fsync, reads see it meanwhile, and it is stored
 * once the disk takes it again. Driven through the adapter's operation table, then through a
 * real mount.
 */
import { mkdir, mkdtemp, open, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { NoSpaceError } from '../../lib/errors.js'
import { RawFilesAdapter, mountRawFiles } from '../../lib/fuse/adapter.js'
import { errnoOf } from '../../lib/fuse/errno.js'
import type { FuseOperations } from '../../lib/fuse/native.js'
import { MemoryDisk } from './helpers.js'

const KiB = 1024
const ENOSPC = errnoOf('ENOSPC')

/** A memory disk that can store writes at once, refuse to, or fail with ENOSPC. */
class AtOnceDisk extends MemoryDisk {
  events: string[] = []
  atOnce = 0
  /** writeAtOnce returns false (as when the image's lock is held). */
  busy = false
  /** Every store fails with this (writeAtOnce and write). */
  failure: Error | undefined

  constructor(sizeBytes: number) {
    super({ sizeBytes, readOnly: false })
  }

  writeAtOnce(buf: Uint8Array, guestOffset: number): boolean {
    if (this.busy) return false
    if (this.failure) throw this.failure
    this.events.push(`stored ${guestOffset}`)
    this.atOnce++
    this.bytes.set(buf, guestOffset)
    return true
  }

  override async write(buf: Uint8Array, guestOffset: number): Promise<void> {
    if (this.failure) throw this.failure
    this.events.push(`written ${guestOffset}`)
    await super.write(buf, guestOffset)
  }
}

function nextTicks(): Promise<void> {
  return new Promise((done) => setImmediate(done))
}

/** Calls one operation of the table and resolves with what its callback got. */
function call<K extends keyof FuseOperations>(ops: FuseOperations, name: K, ...args: unknown[]): Promise<number> {
  return new Promise((resolve) => {
    const op = ops[name] as (...a: unknown[]) => void
    op(...args, (code: number) => resolve(code))
  })
}

function openFile(ops: FuseOperations): Promise<number> {
  return new Promise((resolve, reject) => {
    ops.open('/disk.raw', 2 /* O_RDWR */, (code: number, fh?: number) => (code < 0 ? reject(new Error(`open: ${code}`)) : resolve(fh!)))
  })
}

describe('writes answered before they are stored', () => {
  it('answers first, stores in the next tick from a copy of the buffer', async () => {
    const disk = new AtOnceDisk(256 * KiB)
    const adapter = new RawFilesAdapter([{ imagePath: 'disk.qcow2', disk }])
    const ops = adapter.operations()
    const fh = await openFile(ops)
    const buf = Buffer.alloc(64 * KiB, 0x5a)
    let answer: number | undefined
    ops.write('/disk.raw', fh, buf, buf.length, 4096, (code: number) => {
      answer = code
      disk.events.push('answered')
    })
    // Answered synchronously, not stored yet; libfuse may now reuse its buffer.
    expect(answer).toBe(64 * KiB)
    expect(disk.events).toEqual(['answered'])
    expect(adapter.pending).toBe(1)
    buf.fill(0xee)
    await nextTicks()
    expect(disk.events).toEqual(['answered', 'stored 4096'])
    expect(adapter.pending).toBe(0)
    expect(disk.bytes.subarray(4096, 4096 + 64 * KiB).every((b) => b === 0x5a)).toBe(true)
  })

  it('takes the ordinary path past the end of the disk and for a disk without writeAtOnce', async () => {
    const disk = new AtOnceDisk(128 * KiB)
    const plain = new MemoryDisk({ sizeBytes: 128 * KiB, readOnly: false })
    const adapter = new RawFilesAdapter([
      { imagePath: 'disk.qcow2', disk },
      { imagePath: 'plain.qcow2', disk: plain },
    ])
    const ops = adapter.operations()
    const fh = await openFile(ops)
    expect(await call(ops, 'write', '/disk.raw', fh, Buffer.alloc(8 * KiB, 1), 8 * KiB, 124 * KiB)).toBe(8 * KiB)
    expect(disk.atOnce).toBe(0)
    expect(disk.virtualSize).toBe(132 * KiB)
    const plainFh = await new Promise<number>((resolve) => ops.open('/plain.raw', 2, (_c: number, h?: number) => resolve(h!)))
    expect(await call(ops, 'write', '/plain.raw', plainFh, Buffer.alloc(4 * KiB, 2), 4 * KiB, 0)).toBe(4 * KiB)
    expect(plain.writes).toBe(1)
    expect(plain.bytes[0]).toBe(2)
  })

  it('a failed store: reads see the data, the next write, fsync and flush fail with its error, then it is stored', async () => {
    const disk = new AtOnceDisk(256 * KiB)
    const adapter = new RawFilesAdapter([{ imagePath: 'disk.qcow2', disk }])
    const ops = adapter.operations()
    const fh = await openFile(ops)
    disk.failure = new NoSpaceError('no space left on the host file system')
    const first = Buffer.alloc(8 * KiB, 0x11)
    expect(await call(ops, 'write', '/disk.raw', fh, first, first.length, 16 * KiB)).toBe(8 * KiB)
    await nextTicks()
    expect(disk.bytes[16 * KiB]).not.toBe(0x11)

    const readBack = Buffer.alloc(32 * KiB)
    expect(await call(ops, 'read', '/disk.raw', fh, readBack, readBack.length, 8 * KiB)).toBe(32 * KiB)
    expect(readBack.subarray(8 * KiB, 16 * KiB).every((b) => b === 0x11)).toBe(true)
    expect(readBack.subarray(0, 8 * KiB)).toEqual(disk.bytes.subarray(8 * KiB, 16 * KiB))

    // The file's next requests report the error and do nothing else.
    expect(await call(ops, 'write', '/disk.raw', fh, Buffer.alloc(4 * KiB, 0x22), 4 * KiB, 0)).toBe(ENOSPC)
    expect(await call(ops, 'fsync', '/disk.raw', 0, fh)).toBe(ENOSPC)
    expect(await call(ops, 'ftruncate', '/disk.raw', fh, 512 * KiB)).toBe(ENOSPC)
    expect(disk.virtualSize).toBe(256 * KiB)
    expect(disk.flushes).toBe(0)
    expect(await adapter.settleAll()).toHaveLength(1)

    // Space again: the kept write is stored before the next one, then flushed.
    disk.failure = undefined
    expect(await call(ops, 'write', '/disk.raw', fh, Buffer.alloc(4 * KiB, 0x33), 4 * KiB, 0)).toBe(4 * KiB)
    expect(disk.events).toEqual(['written 16384', 'written 0'])
    expect(await call(ops, 'fsync', '/disk.raw', 0, fh)).toBe(0)
    expect(disk.flushes).toBe(1)
    expect(disk.bytes.subarray(16 * KiB, 24 * KiB).every((b) => b === 0x11)).toBe(true)
    expect(disk.bytes[0]).toBe(0x33)
    // Settled: the early path is open again.
    expect(await call(ops, 'write', '/disk.raw', fh, Buffer.alloc(4 * KiB, 0x44), 4 * KiB, 4 * KiB)).toBe(4 * KiB)
    await nextTicks()
    expect(disk.atOnce).toBe(1)
    expect(await adapter.settleAll()).toEqual([])
  })

  it('a disk that cannot store at once: the write waits in the background, reads and fsync wait for it', async () => {
    const disk = new AtOnceDisk(256 * KiB)
    const adapter = new RawFilesAdapter([{ imagePath: 'disk.qcow2', disk }])
    const ops = adapter.operations()
    const fh = await openFile(ops)
    disk.busy = true
    expect(await call(ops, 'write', '/disk.raw', fh, Buffer.alloc(4 * KiB, 0x55), 4 * KiB, 0)).toBe(4 * KiB)
    await nextTicks()
    expect(disk.atOnce).toBe(0)
    const readBack = Buffer.alloc(4 * KiB)
    expect(await call(ops, 'read', '/disk.raw', fh, readBack, readBack.length, 0)).toBe(4 * KiB)
    expect(readBack.every((b) => b === 0x55)).toBe(true)
    expect(await call(ops, 'fsync', '/disk.raw', 0, fh)).toBe(0)
    expect(disk.bytes.subarray(0, 4 * KiB).every((b) => b === 0x55)).toBe(true)
    expect(disk.events).toEqual(['written 0'])
  })
})

describe('early write answers through a real mount', () => {
  let root = ''
  beforeAll(async () => {
    root = await mkdtemp(join(tmpdir(), 'qcow2fs-early-'))
  })
  afterAll(async () => {
    await rm(root, { recursive: true, force: true })
  })

  it('sequential writes are stored in order; a full disk fails a later write or fsync, never loses data', async () => {
    const mnt = join(root, 'mnt')
    await mkdir(mnt)
    const disk = new AtOnceDisk(4 * 1024 * KiB)
    const mounted = await mountRawFiles(mnt, [{ imagePath: 'disk.qcow2', disk }])
    try {
      const fh = await open(mounted.paths[0]!, 'r+')
      try {
        const chunk = 128 * KiB
        for (let i = 0; i < 16; i++) await fh.write(Buffer.alloc(chunk, i + 1), 0, chunk, i * chunk)
        await fh.sync()
        for (let i = 0; i < 16; i++) expect(disk.bytes[i * chunk + chunk - 1]).toBe(i + 1)
        expect(disk.atOnce).toBeGreaterThan(0)

        disk.failure = new NoSpaceError('no space left on the host file system')
        // The first write is answered before its store fails; the error comes with a later one.
        let failed: unknown
        for (let i = 16; i < 24 && failed === undefined; i++) {
          try {
            await fh.write(Buffer.alloc(chunk, 0x70 + i), 0, chunk, i * chunk)
            await fh.sync()
          } catch (err) {
            failed = err
          }
        }
        expect(failed).toMatchObject({ code: 'ENOSPC' })
        disk.failure = undefined
        await fh.sync()
        expect(disk.bytes[16 * chunk]).toBe(0x70 + 16)
      } finally {
        await fh.close()
      }
    } finally {
      await mounted.session.unmount(false)
    }
  }, 60_000)
})

/*
 * Host faults during writes and flushes: a file layer that fails one chosen pwrite (or
 * truncate) with ENOSPC or EIO, as a full or failing disk does. For every point of a workload
 * where a write can fail:
 *   - the failing call rejects with that error (ENOSPC stays ENOSPC, EIO stays EIO: the FUSE
 *     adapter turns them into the same errnos), and the image stays open;
 *   - once the fault is gone ("space was freed"), the same image takes writes and flushes again;
 *   - after close, `qemu-img check` finds no corruption (leaks are allowed: clusters allocated
 *     for a write that failed), and every write that succeeded reads back.
 * A failed sync (fdatasync) is different: the kernel may have dropped the dirty pages, so the
 * image must never claim durability again (lib/io/block-file.ts: the failure is sticky).
 */
import * as fs from 'node:fs'
import * as path from 'node:path'
import { afterAll, beforeAll, describe, expect, test } from 'vitest'
import { Qcow2Image } from '../../lib/image.js'
import { type BlockFile, NodeBlockFile, type WriteTag } from '../../lib/io/block-file.js'
import { MemoryBlockFile } from '../helpers/memory-file.js'
import { runProcess } from '../fuse/helpers.js'
import { makeTempDir, qemuImg, removeTempDir, requireQemu, run } from '../helpers/qemu.js'

const KiB = 1024
const qemu = requireQemu('host faults during writes')

function systemError(code: 'ENOSPC' | 'EIO', syscall: string): NodeJS.ErrnoException {
  const err: NodeJS.ErrnoException = new Error(`${code}: simulated, ${syscall}`)
  err.code = code
  err.syscall = syscall
  return err
}

/** Fails the `failAt`-th change (pwrite or truncate, counting from 1) while `armed`. */
class FaultFile implements BlockFile {
  changes = 0
  armed = true
  constructor(
    private readonly inner: MemoryBlockFile,
    private readonly failAt: number,
    private readonly code: 'ENOSPC' | 'EIO',
  ) {}
  get path(): string {
    return this.inner.path
  }
  get size(): number {
    return this.inner.size
  }
  get writable(): boolean {
    return true
  }
  pread(buf: Uint8Array, hostOffset: number): number {
    return this.inner.pread(buf, hostOffset)
  }
  #maybeFail(syscall: string): void {
    this.changes++
    if (this.armed && this.changes === this.failAt) throw systemError(this.code, syscall)
  }
  pwrite(buf: Uint8Array, hostOffset: number, tag: WriteTag): void {
    this.#maybeFail('pwrite')
    this.inner.pwrite(buf, hostOffset, tag)
  }
  sync(): void {
    this.inner.sync()
  }
  truncate(size: number): void {
    this.#maybeFail('ftruncate')
    this.inner.truncate(size)
  }
  allocatedBytes(): number {
    return this.inner.allocatedBytes()
  }
  close(): void {
    this.inner.close()
  }
}

interface Op {
  guestOffset: number
  bytes: number
  fill: number
  zero?: boolean
}

/** Allocating writes, overwrites, a zero write and L2 growth across the disk, then a flush. */
function workload(): Op[] {
  const ops: Op[] = []
  for (let i = 0; i < 12; i++) ops.push({ guestOffset: (i * 5 + 1) * 48 * KiB + (i % 3) * 512, bytes: (1 + (i % 4)) * 12 * KiB, fill: 0x20 + i })
  ops.push({ guestOffset: 8 * 1024 * KiB - 4 * KiB, bytes: 4 * KiB, fill: 0x7e })
  ops.push({ guestOffset: 48 * KiB, bytes: 64 * KiB, fill: 0, zero: true })
  ops.push({ guestOffset: 100 * KiB, bytes: 30 * KiB, fill: 0x55 })
  return ops
}

describe.skipIf(!qemu)('host faults during writes and flushes', () => {
  const tools = qemu!
  let dir = ''
  let pristine: Uint8Array

  beforeAll(async () => {
    dir = await makeTempDir('faults')
    const image = path.join(dir, 'pristine.qcow2')
    await qemuImg(tools, ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=16k', image, '8M'])
    pristine = new Uint8Array(fs.readFileSync(image))
  })
  afterAll(async () => {
    if (dir) await removeTempDir(dir)
  })

  /** Runs the workload on a fault file; returns the model of what must read back. */
  async function runWithFault(failAt: number, code: 'ENOSPC' | 'EIO') {
    const memory = MemoryBlockFile.fromBytes('faulty.qcow2', pristine)
    const file = new FaultFile(memory, failAt, code)
    const img = Qcow2Image.openFile(file, path.join(dir, 'faulty.qcow2'), { readOnly: false })
    const model = Buffer.alloc(8 * 1024 * KiB)
    /** Ranges whose content is undefined: a write that failed may have landed or not. */
    const unsure: Op[] = []
    let failures = 0
    for (const op of workload()) {
      try {
        if (op.zero) await img.writeZeroes(op.guestOffset, op.bytes)
        else await img.write(Buffer.alloc(op.bytes, op.fill), op.guestOffset)
        model.fill(op.fill, op.guestOffset, op.guestOffset + op.bytes)
      } catch (err) {
        expect((err as NodeJS.ErrnoException).code, String(err)).toBe(code)
        failures++
        unsure.push(op)
      }
    }
    try {
      await img.flush()
    } catch (err) {
      expect((err as NodeJS.ErrnoException).code, String(err)).toBe(code)
      failures++
    }
    // Space was freed: the same image writes and flushes again.
    const changesBeforeRecovery = file.changes
    file.armed = false
    await img.write(Buffer.alloc(4 * KiB, 0x99), 2 * 1024 * KiB)
    model.fill(0x99, 2 * 1024 * KiB, 2 * 1024 * KiB + 4 * KiB)
    await img.flush()
    const readBack = Buffer.alloc(model.length)
    await img.read(readBack, 0)
    await img.close()
    return { memory, model, unsure, failures, changes: changesBeforeRecovery, readBack }
  }

  function maskUnsure(buf: Buffer, unsure: readonly Op[]): Buffer {
    const copy = Buffer.from(buf)
    for (const op of unsure) copy.fill(0xaa, op.guestOffset, op.guestOffset + op.bytes)
    return copy
  }

  test.each(['ENOSPC', 'EIO'] as const)('a %s at every write and truncate: reported, recoverable, no corruption', async (code) => {
    const { changes: total } = await runWithFault(0, code)
    expect(total).toBeGreaterThan(20)
    for (let failAt = 1; failAt <= total; failAt++) {
      const { memory, model, unsure, failures, readBack } = await runWithFault(failAt, code)
      expect(failures, `fault at change ${failAt}`).toBeGreaterThan(0)
      expect(maskUnsure(readBack, unsure).equals(maskUnsure(model, unsure)), `fault at change ${failAt}: contents`).toBe(true)
      const image = path.join(dir, `fault-${code}-${failAt}.qcow2`)
      fs.writeFileSync(image, memory.bytes())
      const check = await runProcess(tools.qemuImg, ['check', '--output=json', image])
      const report = JSON.parse(check.stdout.toString()) as { corruptions?: number; 'check-errors'?: number }
      expect(report.corruptions ?? 0, `fault at change ${failAt}: ${check.stdout.toString()}`).toBe(0)
      expect(report['check-errors'] ?? 0, `fault at change ${failAt}`).toBe(0)
      // What qemu-img reads is what the engine read.
      const raw = path.join(dir, `fault-${code}-${failAt}.raw`)
      await run(tools.qemuImg, ['convert', '-O', 'raw', image, raw])
      expect(fs.readFileSync(raw).equals(readBack), `fault at change ${failAt}: qemu-img reads the same`).toBe(true)
      fs.rmSync(image)
      fs.rmSync(raw)
    }
  }, 300_000)

  test('a failed fdatasync is sticky: later syncs fail too, so no flush claims durability', async () => {
    const image = path.join(dir, 'sticky.qcow2')
    fs.writeFileSync(image, pristine)
    const file = NodeBlockFile.open(image, { readOnly: false })
    // Simulate the kernel reporting a writeback error once.
    const realSync = NodeBlockFile.prototype.sync
    let failNext = true
    const syncSpy = function (this: NodeBlockFile) {
      if (failNext) {
        failNext = false
        return this.recordSyncFailure(systemError('EIO', 'fdatasync'))
      }
      return realSync.call(this)
    }
    ;(file as unknown as { sync: () => void }).sync = syncSpy
    const img = Qcow2Image.openFile(file, image, { readOnly: false })
    await img.write(Buffer.alloc(64 * KiB, 0x42), 0)
    await expect(img.flush()).rejects.toMatchObject({ code: 'EIO' })
    await expect(img.flush()).rejects.toMatchObject({ code: 'EIO' })
    await img.write(Buffer.alloc(4 * KiB, 0x43), 128 * KiB)
    await expect(img.flush()).rejects.toMatchObject({ code: 'EIO' })
    await img.close().catch(() => undefined)
  })
})

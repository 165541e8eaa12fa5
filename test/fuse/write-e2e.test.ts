/*
 * Writable mounts end to end, as a user uses them, through dist/cli/main.js and real tools:
 * cp onto the raw file resizes the disk to the copied size (also over a backing file), truncate
 * grows and shrinks it, -o fixed-size refuses size changes with EPERM, an image marked corrupt
 * is served read-only with a note (and refused with -o rw), mkfs.ext4 plus a loop mount and a
 * copied tree survive an unmount and a remount, and data fsynced through the mount survives a
 * kill -9 of the server. Every image written here passes `qemu-img check` (no errors, no leaks
 * after a clean unmount; after the kill, leaks only) and `qemu-img compare`.
 */
import { spawn } from 'node:child_process'
import { createHash } from 'node:crypto'
import { mkdir, open, readFile, stat, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { controlSocketPath, sendControlRequest } from '../../lib/fuse/control.js'
import { REPO_ROOT, ensureBuilt } from '../cli/helpers.js'
import { CliMounts, expectExt4Holds, expectIdentical, makeExt4With } from '../helpers/cli-mounts.js'
import { convertToRaw, makeTempDir, qemuImg, qemuInfo, qemuIo, removeTempDir, requireQemu, run } from '../helpers/qemu.js'
import { forceUnmount, isMounted, processRuns, runProcess, waitFor } from './helpers.js'

const qemu = requireQemu('writable mounts end to end')
const MiB = 1024 * 1024

let dir = ''
let mounts: CliMounts

/** `qemu-img check --output=json`, which exits 2 on corruption and 3 on leaks only. */
async function check(tools: NonNullable<typeof qemu>, image: string): Promise<{ code: number | null; corruptions: number; leaks: number }> {
  const r = await runProcess(tools.qemuImg, ['check', '--output=json', image])
  const report = JSON.parse(r.stdout.toString() || '{}') as { corruptions?: number; leaks?: number; 'check-errors'?: number }
  expect(report['check-errors'] ?? 0, r.stderr).toBe(0)
  return { code: r.code, corruptions: report.corruptions ?? 0, leaks: report.leaks ?? 0 }
}

async function expectClean(tools: NonNullable<typeof qemu>, image: string): Promise<void> {
  const result = await check(tools, image)
  expect(result, `qemu-img check ${image}`).toEqual({ code: 0, corruptions: 0, leaks: 0 })
}

/** Patterned data with zero runs (cp skips them as holes) and a length that is not a sector multiple. */
function sampleData(sizeBytes: number, seed: number): Buffer {
  const data = Buffer.alloc(sizeBytes)
  for (let offset = 0; offset < sizeBytes; offset += 65536) {
    const block = Math.floor(offset / 65536)
    if ((block + seed) % 5 === 0) continue
    const end = Math.min(sizeBytes, offset + 65536)
    for (let i = offset; i < end; i++) data[i] = (i * 7 + seed + (i >> 12)) & 0xff
  }
  return data
}

async function sha256(path: string): Promise<string> {
  return createHash('sha256').update(await readFile(path)).digest('hex')
}

describe.skipIf(!qemu)('writable mounts end to end', () => {
  const tools = qemu!

  beforeAll(async () => {
    ensureBuilt()
    dir = await makeTempDir('write-e2e')
    mounts = new CliMounts(dir, 120_000)
  })

  afterAll(async () => {
    if (mounts) await mounts.cleanup()
    if (dir) await removeTempDir(dir)
  })

  it('cp onto the raw file resizes the disk to the copied size, larger or smaller', async () => {
    const image = join(dir, 'cp.qcow2')
    await qemuImg(tools, ['create', '-q', '-f', 'qcow2', image, '4M'])
    await qemuIo(tools, image, ['write -q -P 0x5e 0 4M'])
    const { mnt, raw } = await mounts.mountImage(image)
    expect(raw).toBe(join(mnt, 'cp.raw'))

    const large = join(dir, 'large.bin')
    await writeFile(large, sampleData(6 * MiB + 1536, 1))
    let cp = await runProcess('cp', [large, raw])
    expect(cp.code, cp.stderr).toBe(0)
    expect((await stat(raw)).size).toBe(6 * MiB + 1536)
    expect(await sha256(raw)).toBe(await sha256(large))
    await mounts.unmount(mnt)
    await expectClean(tools, image)
    expect((await qemuInfo(tools, image))['virtual-size']).toBe(6 * MiB + 1536)
    await expectIdentical(tools, large, image)

    const small = join(dir, 'small.bin')
    await writeFile(small, sampleData(MiB + 512, 2))
    const again = await mounts.mountImage(image)
    cp = await runProcess('cp', [small, again.raw])
    expect(cp.code, cp.stderr).toBe(0)
    await mounts.unmount(again.mnt)
    await expectClean(tools, image)
    expect((await qemuInfo(tools, image))['virtual-size']).toBe(MiB + 512)
    await expectIdentical(tools, small, image)
  })

  it('cp onto an overlay replaces what the backing file showed, zero runs included', async () => {
    const base = join(dir, 'base.qcow2')
    const overlay = join(dir, 'overlay.qcow2')
    await qemuImg(tools, ['create', '-q', '-f', 'qcow2', base, '8M'])
    await qemuIo(tools, base, ['write -q -P 0xba 0 8M'])
    await qemuImg(tools, ['create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on,cluster_size=64k', '-b', 'base.qcow2', '-F', 'qcow2', overlay])
    const source = join(dir, 'over.bin')
    await writeFile(source, sampleData(5 * MiB, 3))
    const { mnt, raw } = await mounts.mountImage(overlay)
    const cp = await runProcess('cp', [source, raw])
    expect(cp.code, cp.stderr).toBe(0)
    await mounts.unmount(mnt)
    await expectClean(tools, overlay)
    await expectIdentical(tools, source, overlay)
  })

  it('truncate grows and shrinks the disk; grown bytes read as zeros', async () => {
    const image = join(dir, 'trunc.qcow2')
    await qemuImg(tools, ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', image, '2M'])
    await qemuIo(tools, image, ['write -q -P 0x21 0 2M'])
    const { mnt, raw } = await mounts.mountImage(image)
    let r = await runProcess('truncate', ['-s', '10M', raw])
    expect(r.code, r.stderr).toBe(0)
    expect((await stat(raw)).size).toBe(10 * MiB)
    r = await runProcess('truncate', ['-s', String(MiB + 4096 + 512), raw])
    expect(r.code, r.stderr).toBe(0)
    await mounts.unmount(mnt)
    await expectClean(tools, image)
    const expected = Buffer.alloc(MiB + 4096 + 512, 0x21)
    const reference = join(dir, 'trunc.ref')
    await writeFile(reference, expected)
    await expectIdentical(tools, reference, image)
  })

  it('-o fixed-size refuses every size change with EPERM and still writes in place', async () => {
    const image = join(dir, 'fixed.qcow2')
    await qemuImg(tools, ['create', '-q', '-f', 'qcow2', image, '1M'])
    const { mnt, raw } = await mounts.mountImage(image, ['-o', 'fixed-size'])
    const source = join(dir, 'fixed.bin')
    await writeFile(source, Buffer.alloc(2 * MiB, 0x44))
    const cp = await runProcess('cp', [source, raw])
    expect(cp.code).not.toBe(0)
    expect(cp.stderr).toMatch(/Operation not permitted/)
    const truncate = await runProcess('truncate', ['-s', '2M', raw])
    expect(truncate.stderr).toMatch(/Operation not permitted/)
    const dd = await runProcess('dd', [`if=${source}`, `of=${raw}`, 'bs=64K', 'count=4', 'conv=notrunc,fsync', 'status=none'])
    expect(dd.code, dd.stderr).toBe(0)
    expect((await stat(raw)).size).toBe(MiB)
    await mounts.unmount(mnt)
    await expectClean(tools, image)
    const expected = Buffer.alloc(MiB)
    expected.fill(0x44, 0, 256 * 1024)
    const reference = join(dir, 'fixed.ref')
    await writeFile(reference, expected)
    await expectIdentical(tools, reference, image)
  })

  it('serves an image marked corrupt read-only with a note, refuses it with -o rw, leaves it unchanged', async () => {
    const image = join(dir, 'corrupt.qcow2')
    await qemuImg(tools, ['create', '-q', '-f', 'qcow2', image, '1M'])
    await qemuIo(tools, image, ['write -q -P 0x99 0 64k'])
    // incompatible_features (header offset 72, 8 bytes big-endian): bit 1 is "corrupt".
    const fd = await open(image, 'r+')
    await fd.write(Buffer.from([0x02]), 0, 1, 79)
    await fd.close()
    const before = await sha256(image)

    const { mnt, raw, stderr } = await mounts.mountImage(image)
    expect(stderr).toMatch(/^qcow2fs: note: [^\n]*corrupt[^\n]*mounted read-only\n$/)
    expect((await readFile(raw)).subarray(0, 65536).every((b) => b === 0x99)).toBe(true)
    const dd = await runProcess('dd', ['if=/dev/zero', `of=${raw}`, 'bs=4k', 'count=1', 'conv=notrunc', 'status=none'])
    expect(dd.stderr).toMatch(/Read-only file system/)
    await mounts.unmount(mnt)

    const refusedAt = await mounts.newMountpoint()
    const refused = await mounts.cli(['mount', '-o', 'rw', image, refusedAt])
    expect(refused.code).toBe(1)
    expect(refused.stderr).toMatch(/^qcow2fs: [^\n]*corrupt[^\n]*\n$/)
    expect(isMounted(refusedAt)).toBe(false)
    expect(await sha256(image)).toBe(before)
  })

  it('mkfs.ext4, a loop mount and a copied tree survive unmount and remount', async () => {
    const image = join(dir, 'ext4.qcow2')
    await qemuImg(tools, ['create', '-q', '-f', 'qcow2', image, '256M'])
    const { mnt, raw } = await mounts.mountImage(image)
    const tree = join(dir, 'tree')
    await mkdir(join(tree, 'big'), { recursive: true })
    await writeFile(join(tree, 'big', 'sample.bin'), sampleData(20 * MiB + 123, 4))
    for (let i = 0; i < 50; i++) await writeFile(join(tree, `note-${i}.txt`), `note ${i}\n`.repeat(i * 37 + 1))
    const loop = await mounts.newLoopMountpoint()
    const sources = [tree, join(REPO_ROOT, 'fixtures')]
    await makeExt4With(raw, loop, sources)
    await mounts.unmount(mnt)
    await expectClean(tools, image)

    const again = await mounts.mountImage(image)
    await expectExt4Holds(again.raw, loop, sources)
    await mounts.unmount(again.mnt)
    await expectClean(tools, image)
  }, 180_000)

  it('keeps every block fsynced through the mount when the server is killed with SIGKILL', async () => {
    const image = join(dir, 'kill.qcow2')
    await qemuImg(tools, ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=64k', image, '64M'])
    const { mnt, raw } = await mounts.mountImage(image)
    const { reply, hangUp } = await sendControlRequest(controlSocketPath(mnt), { op: 'status' }, 10_000)
    hangUp()
    if (!reply.ok) throw new Error(reply.error)
    const serverPid = reply.pid

    // A writer that writes 48 KiB blocks at scattered offsets (partial clusters, cluster
    // crossings), fsyncs after each, and prints the index of each fsynced block.
    const writerScript = `
      const fs = require('node:fs')
      const fd = fs.openSync(process.argv[1], 'r+')
      for (let i = 0; ; i++) {
        const block = Buffer.alloc(49152, (i % 250) + 1)
        fs.writeSync(fd, block, 0, block.length, ((i * 7919) % 1300) * 49152)
        fs.fsyncSync(fd)
        process.stdout.write(i + '\\n')
      }`
    const writer = spawn(process.execPath, ['-e', writerScript, raw], { stdio: ['ignore', 'pipe', 'pipe'] })
    const acknowledged: number[] = []
    let pending = ''
    writer.stdout.setEncoding('utf8')
    writer.stdout.on('data', (chunk: string) => {
      pending += chunk
      const lines = pending.split('\n')
      pending = lines.pop()!
      for (const line of lines) acknowledged.push(Number(line))
    })
    const writerExited = new Promise((done) => writer.once('exit', done))
    await waitFor(() => acknowledged.length >= 60, 60_000, '60 fsynced blocks')
    process.kill(serverPid, 'SIGKILL')
    await waitFor(() => !processRuns(serverPid), 10_000, 'the server to die')
    writer.kill('SIGKILL')
    await writerExited
    await forceUnmount(mnt)
    expect(isMounted(mnt)).toBe(false)

    // Leaks are allowed after a crash; corruption is not.
    const result = await check(tools, image)
    expect(result.corruptions).toBe(0)
    expect([0, 3]).toContain(result.code)
    const reference = join(dir, 'kill.ref')
    await convertToRaw(tools, image, reference)
    const contents = await readFile(reference)
    // Blocks overlap: each sampled byte holds the last acknowledged block that wrote it, or
    // the block in flight when the server died (written, never acknowledged) if it covers it.
    const offsetOf = (i: number) => ((i * 7919) % 1300) * 49152
    const inFlight = Math.max(...acknowledged) + 1
    const owner = new Int32Array(contents.length).fill(-1)
    for (const i of acknowledged) owner.fill(i, offsetOf(i), offsetOf(i) + 49152)
    let sampled = 0
    for (let b = 0; b < contents.length; b += 4096) {
      const i = owner[b]!
      if (i < 0) continue
      const allowed = [(i % 250) + 1]
      if (b >= offsetOf(inFlight) && b < offsetOf(inFlight) + 49152) allowed.push((inFlight % 250) + 1)
      expect(allowed, `block ${i} at 0x${b.toString(16)}`).toContain(contents[b])
      sampled++
    }
    expect(sampled).toBeGreaterThan(60 * 8)
    // The image is usable again: a clean mount, a write, a clean unmount.
    const again = await mounts.mountImage(image)
    const r = await runProcess('dd', ['if=/dev/zero', `of=${again.raw}`, 'bs=4k', 'count=1', 'conv=notrunc,fsync', 'status=none'])
    expect(r.code, r.stderr).toBe(0)
    await mounts.unmount(again.mnt)
    expect((await check(tools, image)).corruptions).toBe(0)
    await run(tools.qemuImg, ['check', '-q', '-r', 'leaks', image])
    await expectClean(tools, image)
  }, 120_000)
})

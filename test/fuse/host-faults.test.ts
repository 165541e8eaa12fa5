/*
 * A real full file system under a mount: the image lives on a small tmpfs. Writing more than
 * fits fails with ENOSPC for the writer, the mount stays up and readable, the image has no
 * corruption; once the tmpfs is made larger ("space freed"), the same mount writes again and
 * an unmount leaves an image that qemu-img checks and compares as identical.
 */
import { mkdir, readFile, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { serverLogPath } from '../../lib/fuse/control.js'
import { CLI_PATH, ensureBuilt } from '../cli/helpers.js'
import { isCi, makeTempDir, qemuImg, removeTempDir, requireQemu } from '../helpers/qemu.js'
import { forceUnmount, isMounted, mountEntry, runProcess } from './helpers.js'

const qemu = requireQemu('a full file system under a mount')
const MiB = 1024 * 1024
/** Mounting a tmpfs needs root; outside CI a non-root run skips, in CI it fails. */
const isRoot = process.getuid?.() === 0

function cli(args: string[]) {
  const env = { ...process.env }
  delete env.DEBUG
  return runProcess(process.execPath, [CLI_PATH, ...args], { timeoutMs: 120_000, env })
}

describe.skipIf(!qemu || (!isRoot && !isCi()))('a full file system under a mount', () => {
  const tools = qemu!
  let dir = ''
  let small = ''
  let mnt = ''

  beforeAll(async () => {
    ensureBuilt()
    dir = await makeTempDir('host-faults')
    small = join(dir, 'small')
    mnt = join(dir, 'mnt')
    await mkdir(small)
    await mkdir(mnt)
    const r = await runProcess('mount', ['-t', 'tmpfs', '-o', 'size=6M', 'tmpfs', small])
    expect(r.code, r.stderr).toBe(0)
  })

  afterAll(async () => {
    if (mountEntry(mnt)?.fsType === 'fuse.qcow2fs') await cli(['unmount', '--lazy', mnt]).catch(() => undefined)
    await forceUnmount(mnt)
    await runProcess('rm', ['-f', serverLogPath(mnt)])
    if (isMounted(small)) await runProcess('umount', ['-l', small])
    if (dir) await removeTempDir(dir)
  })

  it('ENOSPC for the writer, the mount stays up, writing works again once there is space', async () => {
    const image = join(small, 'disk.qcow2')
    await qemuImg(tools, ['create', '-q', '-f', 'qcow2', image, '64M'])
    const data = Buffer.alloc(16 * MiB)
    for (let i = 0; i < data.length; i += 4) data.writeUInt32LE((i * 2654435761) >>> 0, i)
    const source = join(dir, 'data.bin')
    await writeFile(source, data)

    const mount = await cli(['mount', image, mnt])
    expect(mount.code, mount.stderr).toBe(0)
    const raw = join(mnt, 'disk.raw')
    const full = await runProcess('dd', [`if=${source}`, `of=${raw}`, 'bs=1M', 'conv=notrunc,fsync', 'status=none'])
    expect(full.code).not.toBe(0)
    expect(full.stderr).toMatch(/No space left on device/)
    // The mount is up: the file is there and reads.
    const head = await runProcess('dd', [`if=${raw}`, 'of=/dev/null', 'bs=1M', 'count=4', 'status=none'])
    expect(head.code, head.stderr).toBe(0)

    // Space freed: the tmpfs grows, the same mount writes everything.
    const grow = await runProcess('mount', ['-o', 'remount,size=64M', small])
    expect(grow.code, grow.stderr).toBe(0)
    const again = await runProcess('dd', [`if=${source}`, `of=${raw}`, 'bs=1M', 'conv=notrunc,fsync', 'status=none'])
    expect(again.code, again.stderr).toBe(0)
    const unmount = await cli(['unmount', mnt])
    expect(unmount.code, unmount.stderr).toBe(0)

    const check = await runProcess(tools.qemuImg, ['check', '--output=json', image])
    const report = JSON.parse(check.stdout.toString()) as { corruptions?: number; 'check-errors'?: number }
    expect(report.corruptions ?? 0, check.stdout.toString()).toBe(0)
    expect(report['check-errors'] ?? 0).toBe(0)
    const reference = join(dir, 'reference.raw')
    const expected = Buffer.alloc(64 * MiB)
    data.copy(expected, 0)
    await writeFile(reference, expected)
    const compare = await runProcess(tools.qemuImg, ['compare', '-f', 'raw', '-F', 'qcow2', reference, image])
    expect(compare.code, compare.stdout.toString()).toBe(0)
    expect((await readFile(image)).length).toBeGreaterThan(16 * MiB)
  }, 120_000)
})

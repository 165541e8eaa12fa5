/*
 * Image locks between qcow2fs mounts and QEMU, end to end: the mount server takes the lock
 * bytes QEMU takes (compared in /proc/locks with qemu-io's), QEMU refuses an image a mount
 * writes (and qcow2fs mount refuses one QEMU writes, exit 1, nothing left mounted), two mounts
 * of one image cannot both write, backing files are shared, and an unmount leaves no lock.
 */
import { type ChildProcessWithoutNullStreams, spawn } from 'node:child_process'
import { createHash } from 'node:crypto'
import { mkdir, open, readFile, rm } from 'node:fs/promises'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { serverLogPath } from '../../lib/fuse/control.js'
import { CLI_PATH, ensureBuilt } from '../cli/helpers.js'
import { lockedBytesOn } from '../helpers/locks.js'
import { type QemuTools, makeTempDir, qemuImg, qemuIo, removeTempDir, requireQemu } from '../helpers/qemu.js'
import { forceUnmount, isMounted, mountEntry, processesMentioning, runProcess, waitFor } from './helpers.js'

const qemu = requireQemu('image locks between qcow2fs and QEMU')
const MiB = 1024 * 1024
/** The bytes QEMU 7.2's qemu-io holds for a read-write image, and for a read-only or backing one. */
const WRITER_BYTES = [100, 101, 103, 201, 203]
const READER_BYTES = [100, 201, 203]

let dir = ''
let mountCount = 0
const mountpoints: string[] = []
const holders: ChildProcessWithoutNullStreams[] = []

async function newMountpoint(): Promise<string> {
  const mnt = join(dir, `mnt${mountCount++}`)
  await mkdir(mnt)
  mountpoints.push(mnt)
  return mnt
}

function cli(args: string[]) {
  const env = { ...process.env }
  delete env.DEBUG
  return runProcess(process.execPath, [CLI_PATH, ...args], { timeoutMs: 60_000, env })
}

/** Mounts (in the background) and expects success; returns the mountpoint. */
async function mount(images: string[], options: string[] = []): Promise<string> {
  const mnt = await newMountpoint()
  const r = await cli(['mount', ...options, ...images, mnt])
  expect(r.code, r.stderr).toBe(0)
  expect(mountEntry(mnt)?.fsType).toBe('fuse.qcow2fs')
  return mnt
}

async function unmount(mnt: string): Promise<void> {
  const r = await cli(['unmount', mnt])
  expect(r.code, r.stderr).toBe(0)
}

async function expectNothingLeft(mnt: string): Promise<void> {
  expect(isMounted(mnt), `${mnt} is still mounted`).toBe(false)
  await waitFor(() => processesMentioning(mnt).length === 0, 10_000, `no process left mentioning ${mnt}`)
}

/** Writes `bytes` bytes of `value` at `offset` of a file and fsyncs it. */
async function writeAt(file: string, offset: number, bytes: number, value: number): Promise<void> {
  const handle = await open(file, 'r+')
  try {
    await handle.write(Buffer.alloc(bytes, value), 0, bytes, offset)
    await handle.sync()
  } finally {
    await handle.close()
  }
}

async function sha256(path: string): Promise<string> {
  return createHash('sha256').update(await readFile(path)).digest('hex')
}

/**
 * qemu-io holding IMAGE open until released: its stdin is a pipe, so it waits at its prompt.
 * Resolves once its locks are in /proc/locks.
 */
async function holdWithQemuIo(tools: QemuTools, image: string, flags: string[] = []): Promise<{ release(): Promise<void> }> {
  const child = spawn(tools.qemuIo, [...flags, '-f', 'qcow2', image], { stdio: ['pipe', 'pipe', 'pipe'] })
  holders.push(child)
  let stderr = ''
  child.stderr.setEncoding('utf8')
  child.stderr.on('data', (chunk: string) => (stderr += chunk))
  child.stdout.resume()
  const exited = new Promise<void>((done) => (child.exitCode !== null ? done() : child.once('exit', () => done())))
  await waitFor(
    () => {
      if (child.exitCode !== null) throw new Error(`qemu-io ${flags.join(' ')} ${image} exited ${child.exitCode}: ${stderr}`)
      return lockedBytesOn(image).includes(100)
    },
    10_000,
    `qemu-io to lock ${image}`,
  )
  return {
    async release() {
      child.stdin.end()
      await exited
    },
  }
}

/** qemu-io with commands on IMAGE: its exit code and output (never rejects). */
async function qemuIoStatus(tools: QemuTools, image: string, args: string[]) {
  const r = await runProcess(tools.qemuIo, [...args, '-f', 'qcow2', image], { timeoutMs: 60_000 })
  return { code: r.code, out: `${r.stdout.toString()}${r.stderr}` }
}

async function qemuImgStatus(tools: QemuTools, args: string[]) {
  const r = await runProcess(tools.qemuImg, args, { timeoutMs: 60_000 })
  return { code: r.code, out: `${r.stdout.toString()}${r.stderr}` }
}

describe.skipIf(!qemu)('image locks between qcow2fs and QEMU', () => {
  const tools = qemu!
  let disk = ''
  let base = ''

  /** A fresh image with data (0x11 in its first MiB); its name is unique in the test dir. */
  async function newDisk(name: string): Promise<string> {
    const image = join(dir, `${name}.qcow2`)
    await qemuImg(tools, ['create', '-q', '-f', 'qcow2', image, '8M'])
    await qemuIo(tools, image, ['write -q -P 0x11 0 1M'])
    return image
  }

  async function newOverlay(name: string): Promise<string> {
    const image = join(dir, `${name}.qcow2`)
    await qemuImg(tools, ['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', image])
    return image
  }

  beforeAll(async () => {
    ensureBuilt()
    dir = await makeTempDir('lock')
    disk = await newDisk('disk')
    base = await newDisk('base')
  })

  afterAll(async () => {
    for (const child of holders) if (child.exitCode === null) child.kill('SIGKILL')
    for (const mnt of mountpoints) {
      if (mountEntry(mnt)?.fsType === 'fuse.qcow2fs') await cli(['unmount', '--lazy', mnt]).catch(() => undefined)
      await forceUnmount(mnt)
      await rm(serverLogPath(mnt), { force: true })
    }
    if (dir) await removeTempDir(dir)
  })

  it('a mount holds the lock bytes qemu-io holds: read-write, read-only (-o ro / -r), and on a backing file', async () => {
    const overlay = await newOverlay('same-bytes')
    const measured: Record<string, { qemu: number[]; ours: number[] }> = {}
    for (const [label, image, qemuFlags, mountOptions, lockedFile] of [
      ['read-write', disk, [], [], disk],
      ['read-only', disk, ['-r'], ['-o', 'ro'], disk],
      ['backing file of a read-write overlay', overlay, [], [], base],
    ] as const) {
      const holder = await holdWithQemuIo(tools, image, [...qemuFlags])
      const qemuBytes = lockedBytesOn(lockedFile)
      await holder.release()
      expect(lockedBytesOn(lockedFile), `${label}: qemu-io released its locks`).toEqual([])
      const mnt = await mount([image], [...mountOptions])
      const ourBytes = lockedBytesOn(lockedFile)
      await unmount(mnt)
      expect(lockedBytesOn(lockedFile), `${label}: the unmount released ours`).toEqual([])
      measured[label] = { qemu: qemuBytes, ours: ourBytes }
    }
    expect(measured).toEqual({
      'read-write': { qemu: WRITER_BYTES, ours: WRITER_BYTES },
      'read-only': { qemu: READER_BYTES, ours: READER_BYTES },
      'backing file of a read-write overlay': { qemu: READER_BYTES, ours: READER_BYTES },
    })
  })

  it('QEMU refuses an image a mount writes, to write and to read, as it refuses one another QEMU writes; the image is unchanged', async () => {
    const image = await newDisk('mounted-rw')
    const mnt = await mount([image])
    const raw = join(mnt, 'mounted-rw.raw')
    await writeAt(raw, 131072, 65536, 0)
    const before = await sha256(image)

    const write = await qemuIoStatus(tools, image, ['-c', 'write -P 0x55 0 64k'])
    expect(write.code).toBe(1)
    expect(write.out).toMatch(/Failed to get "write" lock\nIs another process using the image/)
    const read = await qemuIoStatus(tools, image, ['-r', '-c', 'read 0 512'])
    expect(read.code).toBe(1)
    expect(read.out).toMatch(/Failed to get shared "write" lock\nIs another process using the image/)
    // Forced sharing reads it, as with a QEMU writer.
    const forced = await qemuIoStatus(tools, image, ['-r', '-U', '-c', 'read -P 0x11 0 64k'])
    expect(forced.code, forced.out).toBe(0)

    expect(await sha256(image)).toBe(before)
    const contents = await readFile(raw)
    expect(contents.subarray(0, 65536).every((b) => b === 0x11)).toBe(true)
    expect(contents.subarray(131072, 196608).every((b) => b === 0)).toBe(true)
    await unmount(mnt)
    expect(lockedBytesOn(image)).toEqual([])
  })

  it('qemu-img info behaves on a read-write mount as on a QEMU writer: refused without -U, shown with -U', async () => {
    const image = await newDisk('info')
    const results: Record<string, unknown> = {}
    for (const holderKind of ['qemu-io', 'qcow2fs mount']) {
      const release =
        holderKind === 'qemu-io'
          ? (await holdWithQemuIo(tools, image)).release
          : await (async () => {
              const mnt = await mount([image])
              return () => unmount(mnt)
            })()
      const plain = await qemuImgStatus(tools, ['info', image])
      const forced = await qemuImgStatus(tools, ['info', '-U', image])
      const ours = await cli(['info', image])
      const oursForced = await cli(['info', '-U', image])
      await release()
      results[holderKind] = {
        'qemu-img info': { code: plain.code, lockError: /Failed to get shared "write" lock/.test(plain.out) },
        'qemu-img info -U': { code: forced.code, virtualSize: /virtual size: 8 MiB/.test(forced.out) },
        'qcow2fs info': { code: ours.code, stderr: ours.stderr },
        'qcow2fs info -U': { code: oursForced.code, virtualSize: /virtual size: 8 MiB/.test(oursForced.stdout.toString()) },
      }
    }
    const expected = {
      'qemu-img info': { code: 1, lockError: true },
      'qemu-img info -U': { code: 0, virtualSize: true },
      'qcow2fs info': { code: 1, stderr: `qcow2fs: '${image}' is in use by another process (locked for writing by QEMU or a qcow2fs mount); close it there first\n` },
      'qcow2fs info -U': { code: 0, virtualSize: true },
    }
    expect(results).toEqual({ 'qemu-io': expected, 'qcow2fs mount': expected })
  })

  it('qcow2fs mount of an image a running qemu-io writes: exit 1 with the reason, nothing mounted, nothing running, no lock left, image unchanged; -o ro too; -o ro,nolock reads it', async () => {
    const image = await newDisk('qemu-writes')
    const holder = await holdWithQemuIo(tools, image)
    try {
      const before = await sha256(image)
      for (const options of [[], ['-o', 'rw'], ['-o', 'ro']]) {
        const mnt = await newMountpoint()
        const r = await cli(['mount', ...options, image, mnt])
        expect(r.code, `mount ${options.join(' ')}`).toBe(1)
        expect(r.stderr).toBe(`qcow2fs: '${image}' is in use by another process (locked for writing by QEMU or a qcow2fs mount); close it there first\n`)
        expect(r.stdout.length).toBe(0)
        await expectNothingLeft(mnt)
      }
      expect(await sha256(image)).toBe(before)
      expect(lockedBytesOn(image)).toEqual(WRITER_BYTES)
      // With a free image first on the command line: that one is opened (and locked), then
      // closed again when the busy one is refused.
      const free = await newDisk('free')
      const both = await newMountpoint()
      const r = await cli(['mount', free, image, both])
      expect(r.code).toBe(1)
      expect(r.stderr).toMatch(/^qcow2fs: '[^']*qemu-writes\.qcow2' is in use by another process \(locked for writing/)
      await expectNothingLeft(both)
      expect(lockedBytesOn(free)).toEqual([])
      // Without the lock a read-only mount goes ahead (and takes no lock).
      const mnt = await mount([image], ['-o', 'ro,nolock'])
      expect(lockedBytesOn(image)).toEqual(WRITER_BYTES)
      const contents = await readFile(join(mnt, 'qemu-writes.raw'))
      expect(contents.subarray(0, MiB).every((b) => b === 0x11)).toBe(true)
      await unmount(mnt)
    } finally {
      await holder.release()
    }
  })

  it('an image a running qemu-io reads (-r): the default mount falls back to read-only with a note; -o rw is refused', async () => {
    const image = await newDisk('qemu-reads')
    const holder = await holdWithQemuIo(tools, image, ['-r'])
    try {
      const busy = `'${image}' is in use by another process (open read-only in QEMU or a qcow2fs mount, which do not share writing); open it read-only, or close it there first`
      const refused = await newMountpoint()
      const r = await cli(['mount', '-o', 'rw', image, refused])
      expect(r.code).toBe(1)
      expect(r.stderr).toBe(`qcow2fs: ${busy}\n`)
      await expectNothingLeft(refused)

      const mnt = await newMountpoint()
      const auto = await cli(['mount', image, mnt])
      expect(auto.code, auto.stderr).toBe(0)
      expect(auto.stderr).toBe(`qcow2fs: note: ${busy}: mounted read-only\n`)
      expect(lockedBytesOn(image)).toEqual([...READER_BYTES, ...READER_BYTES].sort((a, b) => a - b))
      const write = await runProcess('dd', ['if=/dev/zero', `of=${join(mnt, 'qemu-reads.raw')}`, 'bs=512', 'count=1', 'conv=notrunc', 'status=none'])
      expect(write.code).not.toBe(0)
      expect(write.stderr).toMatch(/Read-only file system/)
      await unmount(mnt)
    } finally {
      await holder.release()
    }
  })

  it('two mounts of one image: a second is refused while the first writes (rw, ro, default); two read-only mounts share it', async () => {
    const image = await newDisk('twice')
    const first = await mount([image])
    const before = await sha256(image)
    for (const options of [[], ['-o', 'rw'], ['-o', 'ro']]) {
      const mnt = await newMountpoint()
      const r = await cli(['mount', ...options, image, mnt])
      expect(r.code, `second mount ${options.join(' ')}`).toBe(1)
      expect(r.stderr).toBe(`qcow2fs: '${image}' is in use by another process (locked for writing by QEMU or a qcow2fs mount); close it there first\n`)
      await expectNothingLeft(mnt)
    }
    expect(await sha256(image)).toBe(before)
    await unmount(first)

    const a = await mount([image], ['-o', 'ro'])
    const b = await mount([image], ['-o', 'ro'])
    expect((await readFile(join(a, 'twice.raw'))).equals(await readFile(join(b, 'twice.raw')))).toBe(true)
    const writer = await newMountpoint()
    const r = await cli(['mount', '-o', 'rw', image, writer])
    expect(r.code).toBe(1)
    expect(r.stderr).toMatch(/is in use by another process \(open read-only in QEMU or a qcow2fs mount/)
    await unmount(a)
    await unmount(b)
    expect(lockedBytesOn(image)).toEqual([])
  })

  it('a backing file under a read-write mount of one overlay serves a second overlay mounted read-write, and QEMU on a third; nobody can write it', async () => {
    const one = await newOverlay('overlay-one')
    const two = await newOverlay('overlay-two')
    const three = await newOverlay('overlay-three')
    const mntOne = await mount([one])
    const mntTwo = await mount([two])
    expect(lockedBytesOn(base)).toEqual([...READER_BYTES, ...READER_BYTES].sort((a, b) => a - b))
    await writeAt(join(mntOne, 'overlay-one.raw'), 4096, 4096, 0xaa)
    await writeAt(join(mntTwo, 'overlay-two.raw'), 4096, 4096, 0xbb)
    // QEMU shares the backing file too (a third overlay, written), but cannot write it.
    const third = await qemuIoStatus(tools, three, ['-c', 'write -P 0xcc 8k 4k'])
    expect(third.code, third.out).toBe(0)
    const baseWrite = await qemuIoStatus(tools, base, ['-c', 'write -P 0x55 0 4k'])
    expect(baseWrite.code).toBe(1)
    expect(baseWrite.out).toMatch(/Failed to get "write" lock/)
    const ours = await cli(['mount', '-o', 'rw', base, await newMountpoint()])
    expect(ours.code).toBe(1)
    expect(ours.stderr).toMatch(/^qcow2fs: '[^']*base\.qcow2' is in use by another process \(open read-only in QEMU or a qcow2fs mount/)

    const rawOne = await readFile(join(mntOne, 'overlay-one.raw'))
    const rawTwo = await readFile(join(mntTwo, 'overlay-two.raw'))
    expect(rawOne.subarray(4096, 8192).every((b) => b === 0xaa)).toBe(true)
    expect(rawTwo.subarray(4096, 8192).every((b) => b === 0xbb)).toBe(true)
    expect(rawOne.subarray(0, 4096).every((b) => b === 0x11)).toBe(true)
    await unmount(mntOne)
    await unmount(mntTwo)
    expect(lockedBytesOn(base)).toEqual([])
  })

  it('after an unmount no lock is left: QEMU writes the image', async () => {
    const image = await newDisk('after')
    const mnt = await mount([image])
    expect(lockedBytesOn(image)).toEqual(WRITER_BYTES)
    await unmount(mnt)
    expect(lockedBytesOn(image)).toEqual([])
    const write = await qemuIoStatus(tools, image, ['-c', 'write -P 0x66 0 4k'])
    expect(write.code, write.out).toBe(0)
    const check = await qemuImgStatus(tools, ['check', image])
    expect(check.code, check.out).toBe(0)
  })
})

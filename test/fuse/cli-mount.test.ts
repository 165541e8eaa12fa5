/*
 * `qcow2fs mount` / `qcow2fs unmount` end to end, through dist/cli/main.js, on images made by
 * qemu-img: contents (dd bs=1M, cp) against `qemu-img convert -O raw`, every way a server ends
 * (unmount, umount, fusermount -u, SIGTERM, SIGINT) closing its images and exiting 0, and the
 * failures that must leave nothing behind (no mount, no process, the image unchanged).
 */
import { spawn } from 'node:child_process'
import { createHash } from 'node:crypto'
import { mkdir, readFile, readdir, rm, stat, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { controlSocketPath, sendControlRequest, serverLogPath } from '../../lib/fuse/control.js'
import { CLI_PATH, ensureBuilt } from '../cli/helpers.js'
import { dropFromPageCache } from '../helpers/page-cache.js'
import { convertToRaw, makeTempDir, qemuImg, qemuIo, removeTempDir, requireQemu } from '../helpers/qemu.js'
import { forceUnmount, isMounted, mountEntry, processRuns, processesMentioning, runProcess, waitFor } from './helpers.js'

const qemu = requireQemu('qcow2fs mount / unmount')
const MiB = 1024 * 1024

let dir = ''
let mountCount = 0
const mountpoints: string[] = []

async function newMountpoint(): Promise<string> {
  const mnt = join(dir, `mnt${mountCount++}`)
  await mkdir(mnt)
  mountpoints.push(mnt)
  return mnt
}

function cliEnv(extra: NodeJS.ProcessEnv = {}): NodeJS.ProcessEnv {
  const env = { ...process.env, ...extra }
  if (extra.DEBUG === undefined) delete env.DEBUG
  return env
}

function cli(args: string[], extra: NodeJS.ProcessEnv = {}) {
  return runProcess(process.execPath, [CLI_PATH, ...args], { timeoutMs: 60_000, env: cliEnv(extra) })
}

async function sha256(path: string): Promise<string> {
  return createHash('sha256').update(await readFile(path)).digest('hex')
}

/** The pid of the server behind a mountpoint, from its control socket. */
async function serverPid(mnt: string): Promise<number> {
  const { reply, hangUp } = await sendControlRequest(controlSocketPath(mnt), { op: 'status' }, 10_000)
  hangUp()
  if (!reply.ok) throw new Error(reply.error)
  return reply.pid
}

/** `mount -f` as a child of this test: resolves once it printed its files. */
async function mountForeground(images: string[], mnt: string) {
  const child = spawn(process.execPath, [CLI_PATH, 'mount', '-f', ...images, mnt], {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: cliEnv({ DEBUG: 'qcow2fs:server' }),
  })
  let stdout = ''
  let stderr = ''
  child.stdout.setEncoding('utf8')
  child.stderr.setEncoding('utf8')
  child.stderr.on('data', (c: string) => (stderr += c))
  const exited = new Promise<number | null>((done) => child.once('exit', (code) => done(code)))
  await new Promise<void>((done, fail) => {
    child.stdout.on('data', (c: string) => {
      stdout += c
      if (stdout.split('\n').length > images.length) done()
    })
    void exited.then((code) => fail(new Error(`mount -f exited ${code} before printing its files: ${stderr}`)))
  })
  return { child, exited, stdout: () => stdout, stderr: () => stderr }
}

async function expectNothingLeft(mnt: string): Promise<void> {
  expect(isMounted(mnt), `${mnt} is still mounted`).toBe(false)
  await waitFor(() => processesMentioning(mnt).length === 0, 10_000, `no process left mentioning ${mnt}`)
}

describe.skipIf(!qemu)('qcow2fs mount and unmount', () => {
  const tools = qemu!
  let disk = ''
  let other = ''
  let snap = ''
  let diskRaw: Buffer
  let otherRaw: Buffer

  beforeAll(async () => {
    ensureBuilt()
    dir = await makeTempDir('fuse-cli')
    disk = join(dir, 'disk.qcow2')
    await qemuImg(tools, ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=65536', disk, '64M'])
    await qemuIo(tools, disk, ['write -q -P 0x11 0 1M', 'write -q -P 0x22 5M 3M', 'write -q -P 0x5a 33554431 7', 'write -q -P 0x33 63M 1M'])
    other = join(dir, 'other.qcow2')
    await qemuImg(tools, ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', other, String(3 * MiB + 512)])
    await qemuIo(tools, other, ['write -q -P 0x44 4096 8192', 'write -q -P 0x55 3145728 512'])
    snap = join(dir, 'snap.qcow2')
    await qemuImg(tools, ['create', '-q', '-f', 'qcow2', snap, '8M'])
    await qemuIo(tools, snap, ['write -q -P 0x66 0 2M'])
    await qemuImg(tools, ['snapshot', '-c', 'before', snap])
    await qemuIo(tools, snap, ['write -q -P 0x77 1M 2M'])
    await convertToRaw(tools, disk, join(dir, 'disk.ref'))
    await convertToRaw(tools, other, join(dir, 'other.ref'))
    await convertToRaw(tools, snap, join(dir, 'snap-before.ref'), { snapshot: 'before' })
    diskRaw = await readFile(join(dir, 'disk.ref'))
    otherRaw = await readFile(join(dir, 'other.ref'))
  })

  afterAll(async () => {
    // A failing test must not leave a mount (or a server) behind.
    for (const mnt of mountpoints) {
      if (mountEntry(mnt)?.fsType === 'fuse.qcow2fs') {
        await cli(['unmount', '--lazy', mnt]).catch(() => undefined)
      }
      await forceUnmount(mnt)
      // The DEBUG runs leave their server logs in the runtime directory.
      await rm(serverLogPath(mnt), { force: true })
    }
    if (dir) await removeTempDir(dir)
  })

  describe('a mount in the background', () => {
    let mnt = ''
    let pid = 0
    let imageHashes: string[] = []

    beforeAll(async () => {
      mnt = await newMountpoint()
      imageHashes = [await sha256(disk), await sha256(other)]
    })

    it('mounts two images, prints their raw files and exits 0', async () => {
      const r = await cli(['mount', '-o', 'ro,cache-size=256K', disk, other, mnt])
      expect(r.code, r.stderr).toBe(0)
      expect(r.stdout.toString()).toBe(`${join(mnt, 'disk.raw')}\n${join(mnt, 'other.raw')}\n`)
      expect(mountEntry(mnt)?.fsType).toBe('fuse.qcow2fs')
      expect((await readdir(mnt)).sort()).toEqual(['disk.raw', 'other.raw'])
      expect((await stat(join(mnt, 'disk.raw'))).size).toBe(64 * MiB)
      expect((await stat(join(mnt, 'other.raw'))).size).toBe(3 * MiB + 512)
      pid = await serverPid(mnt)
      expect(processRuns(pid)).toBe(true)
    })

    it('reads with dd bs=1M what qemu-img convert -O raw gives', async () => {
      for (const [name, ref] of [['disk.raw', diskRaw], ['other.raw', otherRaw]] as const) {
        const dd = await runProcess('dd', [`if=${join(mnt, name)}`, 'bs=1M', 'status=none'], { timeoutMs: 60_000 })
        expect(dd.code, dd.stderr).toBe(0)
        expect(dd.stdout.length).toBe(ref.length)
        expect(dd.stdout.equals(ref), `${name} differs from qemu-img's raw`).toBe(true)
      }
    })

    it('copies with cp what qemu-img convert -O raw gives', async () => {
      const copy = join(dir, 'disk.cp')
      const cp = await runProcess('cp', [join(mnt, 'disk.raw'), copy])
      expect(cp.code, cp.stderr).toBe(0)
      expect((await readFile(copy)).equals(diskRaw)).toBe(true)
    })

    it('refuses a second mount on the same mountpoint', async () => {
      const r = await cli(['mount', disk, mnt])
      expect(r.code).toBe(1)
      expect(r.stderr).toMatch(/^qcow2fs: mountpoint '[^']*' is already a mount point \(fuse\.qcow2fs\)[^\n]*\n$/)
      expect(processRuns(pid)).toBe(true)
    })

    it('refuses to unmount while a file is open, and says so in one line', async () => {
      const holder = spawn('sh', ['-c', 'exec 3<"$0"; echo open; exec sleep 60', join(mnt, 'other.raw')], { stdio: ['ignore', 'pipe', 'ignore'] })
      try {
        await new Promise((done) => holder.stdout.once('data', done))
        const r = await cli(['unmount', mnt])
        expect(r.code).toBe(1)
        expect(r.stderr).toMatch(/^qcow2fs: [^\n]*busy[^\n]*\n$/)
        expect(isMounted(mnt)).toBe(true)
      } finally {
        holder.kill('SIGKILL')
        await new Promise((done) => (holder.exitCode !== null || holder.signalCode !== null ? done(undefined) : holder.once('exit', done)))
      }
    })

    it('unmounts with qcow2fs unmount: exits 0 once the server is gone; images unchanged', async () => {
      const r = await cli(['unmount', mnt])
      expect(r.code, r.stderr).toBe(0)
      expect(r.stderr).toBe('')
      expect(isMounted(mnt)).toBe(false)
      expect(processRuns(pid)).toBe(false)
      expect([await sha256(disk), await sha256(other)]).toEqual(imageHashes)
    })

    it('says in one line, exit 1, that a directory is not a qcow2fs mount', async () => {
      const r = await cli(['unmount', mnt])
      expect(r.code).toBe(1)
      expect(r.stderr).toMatch(/^qcow2fs: '[^']*' is not a qcow2fs mount\n$/)
    })
  })

  it('unmount --lazy detaches at once and returns when the last open file is closed', async () => {
    const mnt = await newMountpoint()
    expect((await cli(['mount', disk, mnt])).code).toBe(0)
    const pid = await serverPid(mnt)
    const holder = spawn('sh', ['-c', 'exec 3<"$0"; echo open; exec sleep 1', join(mnt, 'disk.raw')], { stdio: ['ignore', 'pipe', 'ignore'] })
    await new Promise((done) => holder.stdout.once('data', done))
    const holderGone = new Promise((done) => holder.once('exit', done))
    const started = Date.now()
    const r = await cli(['unmount', '--lazy', mnt])
    expect(r.code, r.stderr).toBe(0)
    // It waited for the holder (about a second), and the server is gone now.
    expect(Date.now() - started).toBeGreaterThan(500)
    await holderGone
    expect(isMounted(mnt)).toBe(false)
    expect(processRuns(pid)).toBe(false)
  })

  describe('ending a server from outside', () => {
    for (const how of ['umount', 'fusermount -u', 'SIGTERM'] as const) {
      it(`closes the images and exits after ${how} (background server)`, async () => {
        const mnt = await newMountpoint()
        const r = await cli(['mount', disk, mnt], { DEBUG: 'qcow2fs:server' })
        expect(r.code, r.stderr).toBe(0)
        const pid = await serverPid(mnt)
        if (how === 'umount') expect((await runProcess('umount', [mnt])).code).toBe(0)
        else if (how === 'fusermount -u') expect((await runProcess('fusermount', ['-u', mnt])).code).toBe(0)
        else process.kill(pid, 'SIGTERM')
        await waitFor(() => !processRuns(pid), 10_000, `server ${pid} to exit`)
        expect(isMounted(mnt)).toBe(false)
        expect(await readFile(serverLogPath(mnt), 'utf8')).toContain('images closed')
      })
    }

    for (const how of ['fusermount -u', 'SIGTERM', 'SIGINT'] as const) {
      it(`exits 0 with the images closed after ${how} (mount -f)`, async () => {
        const mnt = await newMountpoint()
        const server = await mountForeground([disk, other], mnt)
        expect(server.stdout()).toBe(`${join(mnt, 'disk.raw')}\n${join(mnt, 'other.raw')}\n`)
        const head = await runProcess('dd', [`if=${join(mnt, 'disk.raw')}`, 'bs=64K', 'count=1', 'status=none'])
        expect(head.stdout.equals(diskRaw.subarray(0, 65536))).toBe(true)
        if (how === 'fusermount -u') expect((await runProcess('fusermount', ['-u', mnt])).code).toBe(0)
        else server.child.kill(how)
        const code = await Promise.race([server.exited, new Promise((done) => setTimeout(() => done('timeout'), 10_000))])
        expect(code, server.stderr()).toBe(0)
        expect(server.stderr()).toContain('images closed')
        await expectNothingLeft(mnt)
      })
    }
  })

  describe('options', () => {
    it('shows an internal snapshot with -o snapshot=NAME', async () => {
      const mnt = await newMountpoint()
      const r = await cli(['mount', '-o', 'snapshot=before', snap, mnt])
      expect(r.code, r.stderr).toBe(0)
      try {
        expect((await readFile(join(mnt, 'snap.raw'))).equals(await readFile(join(dir, 'snap-before.ref')))).toBe(true)
      } finally {
        expect((await cli(['unmount', mnt])).code).toBe(0)
      }
    })

    it('reads a cold image through the read-ahead: dd gets qemu-img\'s bytes, and the server read chunks ahead', async () => {
      const image = join(dir, 'cold.qcow2')
      await qemuImg(tools, ['create', '-q', '-f', 'qcow2', image, '24M'])
      await qemuIo(tools, image, ['write -q -P 0x21 0 10M', 'write -q -P 0x43 12M 12M'])
      await convertToRaw(tools, image, join(dir, 'cold.ref'))
      dropFromPageCache(image)
      const mnt = await newMountpoint()
      const r = await cli(['mount', '-o', 'ro', image, mnt], { DEBUG: 'qcow2fs:io' })
      expect(r.code, r.stderr).toBe(0)
      try {
        const dd = await runProcess('dd', [`if=${join(mnt, 'cold.raw')}`, `of=${join(dir, 'cold.out')}`, 'bs=1M', 'status=none'])
        expect(dd.code, dd.stderr).toBe(0)
      } finally {
        expect((await cli(['unmount', mnt])).code).toBe(0)
      }
      expect((await readFile(join(dir, 'cold.out'))).equals(await readFile(join(dir, 'cold.ref')))).toBe(true)
      // The server logs what its read-ahead did when it closes the image.
      const counts = /read ahead (\d+) chunks, served (\d+) bytes/.exec(await readFile(serverLogPath(mnt), 'utf8'))
      expect(counts, 'no read-ahead line in the server log').not.toBeNull()
      expect(Number(counts![1])).toBeGreaterThanOrEqual(10)
      expect(Number(counts![2])).toBeGreaterThan(12 * MiB)
    })

    it('writes into the image with -o rw; qemu-img check and convert agree', async () => {
      const image = join(dir, 'rw.qcow2')
      await qemuImg(tools, ['create', '-q', '-f', 'qcow2', image, '4M'])
      await qemuIo(tools, image, ['write -q -P 0x12 0 4M'])
      const mnt = await newMountpoint()
      const r = await cli(['mount', '-o', 'rw', image, mnt])
      expect(r.code, r.stderr).toBe(0)
      const patch = Buffer.alloc(300_000, 0xc3)
      await writeFile(join(dir, 'patch.bin'), patch)
      const dd = await runProcess('dd', [`if=${join(dir, 'patch.bin')}`, `of=${join(mnt, 'rw.raw')}`, 'bs=64K', 'seek=1', 'conv=notrunc,fsync', 'status=none'])
      expect(dd.code, dd.stderr).toBe(0)
      expect((await cli(['unmount', mnt])).code).toBe(0)
      await qemuImg(tools, ['check', '-q', image])
      await convertToRaw(tools, image, join(dir, 'rw.ref'))
      const expected = Buffer.alloc(4 * MiB, 0x12)
      patch.copy(expected, 65536)
      expect((await readFile(join(dir, 'rw.ref'))).equals(expected)).toBe(true)
    })
  })

  describe('failures leave nothing behind', () => {
    const cases: { name: string; exitCode: number; args: (mnt: string) => Promise<string[]>; message: RegExp }[] = [
      { name: 'a missing image', exitCode: 1, args: async (mnt) => [disk, join(dir, 'missing.qcow2'), mnt], message: /missing\.qcow2/ },
      { name: 'an unknown -o option', exitCode: 2, args: async (mnt) => ['-o', 'ro,bogus', disk, mnt], message: /unknown mount option 'bogus'/ },
      { name: 'a bad cache-size', exitCode: 2, args: async (mnt) => ['-o', 'cache-size=12Q', disk, mnt], message: /cache-size=12Q/ },
      { name: 'a missing mountpoint', exitCode: 1, args: async () => [disk, join(dir, 'no-such-dir')], message: /does not exist/ },
      { name: 'a mountpoint that is a file', exitCode: 1, args: async () => [disk, join(dir, 'disk.ref')], message: /not a directory/ },
      {
        name: 'a mountpoint that is not empty',
        exitCode: 1,
        args: async (mnt) => {
          await writeFile(join(mnt, 'occupant'), 'x')
          return [disk, mnt]
        },
        message: /not empty/,
      },
      {
        name: 'an image that is not qcow2',
        exitCode: 1,
        args: async (mnt) => [disk, join(dir, 'other.ref'), mnt],
        message: /other\.ref/,
      },
      { name: 'two images with one stem', exitCode: 1, args: async (mnt) => [disk, join(dir, 'disk.ref'), mnt], message: /both appear as disk\.raw/ },
      { name: 'a missing snapshot', exitCode: 1, args: async (mnt) => ['-o', 'snapshot=nope', snap, mnt], message: /nope/ },
    ]

    for (const c of cases) {
      it(`fails on ${c.name}: one line, exit ${c.exitCode}, within 10 s, image unchanged`, async () => {
        const mnt = await newMountpoint()
        const before = [await sha256(disk), await sha256(snap)]
        const started = Date.now()
        const r = await cli(['mount', ...(await c.args(mnt))])
        expect(Date.now() - started).toBeLessThan(10_000)
        expect(r.code).toBe(c.exitCode)
        expect(r.stdout.length).toBe(0)
        expect(r.stderr).toMatch(/^qcow2fs: [^\n]+\n$/)
        expect(r.stderr).toMatch(c.message)
        await expectNothingLeft(mnt)
        expect([await sha256(disk), await sha256(snap)]).toEqual(before)
      })
    }
  })
})

/*
 * The FUSE adapter on real mounts (in this process) over in-memory disks: names, attributes,
 * reads at and across EOF, unaligned reads, several reader processes at once, EROFS/ENOENT,
 * writes and truncation on a writable disk, an EIO region that fails alone, unmounting.
 */
import { spawn } from 'node:child_process'
import { constants as fsConstants } from 'node:fs'
import { mkdir, mkdtemp, open, readFile, readdir, rm, stat, statfs, truncate, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest'
import { InvalidRequestError } from '../../lib/errors.js'
import { type MountedRawFiles, RawFilesAdapter, mountRawFiles, rawFileName } from '../../lib/fuse/adapter.js'
import { MemoryDisk, forceUnmount, isMounted, patternBytes, runProcess, waitFor } from './helpers.js'

const MiB = 1024 * 1024

let root = ''
const mountpoints: string[] = []
const live: MountedRawFiles[] = []

async function freshMountpoint(): Promise<string> {
  const dir = join(root, `mnt${mountpoints.length}`)
  await mkdir(dir)
  mountpoints.push(dir)
  return dir
}

async function mountDisks(
  sources: { imagePath: string; disk: MemoryDisk; times?: { atime: Date; mtime: Date; ctime: Date } }[],
  opts: { fixedSize?: boolean } = {},
) {
  const mnt = await freshMountpoint()
  const mounted = await mountRawFiles(mnt, sources, opts)
  live.push(mounted)
  return mounted
}

async function unmountAll(): Promise<void> {
  for (const m of live.splice(0)) {
    await m.session.unmount(true).catch(() => undefined)
    await Promise.race([m.session.ended, new Promise((done) => setTimeout(done, 5_000))])
    m.session.release()
  }
}

async function readAt(path: string, guestOffset: number, length: number): Promise<Buffer> {
  const fh = await open(path, 'r')
  try {
    const buf = Buffer.alloc(length)
    const { bytesRead } = await fh.read(buf, 0, length, guestOffset)
    return buf.subarray(0, bytesRead)
  } finally {
    await fh.close()
  }
}

beforeAll(async () => {
  root = await mkdtemp(join(tmpdir(), 'qcow2fs-adapter-'))
})

afterEach(unmountAll)

afterAll(async () => {
  await unmountAll()
  // Whatever a failed test left mounted goes too, before the directory does.
  for (const mnt of mountpoints) await forceUnmount(mnt)
  if (root) await rm(root, { recursive: true, force: true })
})

describe('names', () => {
  it('turns image names into STEM.raw', () => {
    expect(rawFileName('/images/disk.qcow2')).toBe('disk.raw')
    expect(rawFileName('vm.disk.qcow2')).toBe('vm.disk.raw')
    expect(rawFileName('noext')).toBe('noext.raw')
  })

  it('refuses two images with the same stem in one line naming both', () => {
    const make = () => new RawFilesAdapter([
      { imagePath: '/a/disk.qcow2', disk: new MemoryDisk({ sizeBytes: 4096 }) },
      { imagePath: '/b/disk.img', disk: new MemoryDisk({ sizeBytes: 4096 }) },
    ])
    expect(make).toThrow(InvalidRequestError)
    expect(make).toThrow(/^'\/a\/disk\.qcow2' and '\/b\/disk\.img' would both appear as disk\.raw[^\n]*$/)
  })

  it('mounts nothing when the stems clash', async () => {
    const mnt = await freshMountpoint()
    const disk = new MemoryDisk({ sizeBytes: 4096 })
    await expect(mountRawFiles(mnt, [{ imagePath: 'x.qcow2', disk }, { imagePath: 'x.qcow2', disk }])).rejects.toThrow(/both appear as x\.raw/)
    expect(isMounted(mnt)).toBe(false)
  })
})

describe('directory and attributes', () => {
  it('lists one raw file per image with the virtual size, modes, owner and times', async () => {
    const times = { atime: new Date('2024-01-02T03:04:05Z'), mtime: new Date('2024-02-03T04:05:06Z'), ctime: new Date('2024-03-04T05:06:07Z') }
    const a = new MemoryDisk({ sizeBytes: 3 * MiB + 1234, salt: 1 })
    const b = new MemoryDisk({ sizeBytes: 64 * 1024, salt: 2 })
    const c = new MemoryDisk({ sizeBytes: 8192, salt: 3, readOnly: false })
    const m = await mountDisks([
      { imagePath: '/x/alpha.qcow2', disk: a, times },
      { imagePath: '/y/beta.qcow2', disk: b },
      { imagePath: '/z/gamma.qcow2', disk: c },
    ])
    expect((await readdir(m.session.mountpoint)).sort()).toEqual(['alpha.raw', 'beta.raw', 'gamma.raw'])
    expect(m.paths).toEqual(['alpha', 'beta', 'gamma'].map((s) => join(m.session.mountpoint, `${s}.raw`)))

    const sa = await stat(m.paths[0]!)
    expect(sa.isFile()).toBe(true)
    expect(sa.size).toBe(3 * MiB + 1234)
    expect(sa.mode & 0o777).toBe(0o444)
    expect(sa.uid).toBe(process.getuid!())
    expect(sa.gid).toBe(process.getgid!())
    expect(sa.mtime.getTime()).toBe(times.mtime.getTime())
    expect((await stat(m.paths[1]!)).size).toBe(64 * 1024)
    expect((await stat(m.paths[2]!)).mode & 0o777).toBe(0o644)

    const sd = await stat(m.session.mountpoint)
    expect(sd.isDirectory()).toBe(true)
    // One writable disk: the directory (and the mount) are read-write.
    expect(sd.mode & 0o777).toBe(0o755)

    const fs = await statfs(m.session.mountpoint)
    expect(fs.blocks * fs.bsize).toBeGreaterThanOrEqual(3 * MiB + 1234 + 64 * 1024 + 8192)
  })

  it('makes an all read-only mount read-only: directory 0555 and a ro mount', async () => {
    const m = await mountDisks([{ imagePath: 'ro.qcow2', disk: new MemoryDisk({ sizeBytes: 4096 }) }])
    expect((await stat(m.session.mountpoint)).mode & 0o777).toBe(0o555)
    await expect(writeFile(join(m.session.mountpoint, 'new-file'), 'x')).rejects.toMatchObject({ code: 'EROFS' })
  })

  it('answers ENOENT for unknown names', async () => {
    const m = await mountDisks([{ imagePath: 'known.qcow2', disk: new MemoryDisk({ sizeBytes: 4096 }) }])
    await expect(stat(join(m.session.mountpoint, 'unknown.raw'))).rejects.toMatchObject({ code: 'ENOENT' })
    await expect(open(join(m.session.mountpoint, 'known.qcow2'), 'r')).rejects.toMatchObject({ code: 'ENOENT' })
  })
})

describe('reads', () => {
  const sizeBytes = 5 * MiB + 777
  let disk: MemoryDisk
  let raw = ''

  beforeAll(() => {
    disk = new MemoryDisk({ sizeBytes, salt: 0x5a5a })
  })

  async function mountOne(d: MemoryDisk = disk) {
    const m = await mountDisks([{ imagePath: 'disk.qcow2', disk: d }])
    raw = m.paths[0]!
    return m
  }

  it('reads the whole file byte for byte', async () => {
    await mountOne()
    const content = await readFile(raw)
    expect(content.length).toBe(sizeBytes)
    expect(content.equals(disk.bytes)).toBe(true)
  })

  it('reads unaligned ranges', async () => {
    await mountOne()
    for (const [offset, length] of [
      [1, 1],
      [4095, 2],
      [4097, 8191],
      [MiB - 3, 131072 + 7],
      [3 * MiB + 12345, 300_001],
    ] as const) {
      const got = await readAt(raw, offset, length)
      expect(got.equals(disk.bytes.subarray(offset, offset + length)), `${length} bytes at ${offset}`).toBe(true)
    }
  })

  it('reads short at the end of the file and nothing past it', async () => {
    await mountOne()
    const straddling = await readAt(raw, sizeBytes - 100, 4096)
    expect(straddling.length).toBe(100)
    expect(straddling.equals(disk.bytes.subarray(sizeBytes - 100))).toBe(true)
    expect((await readAt(raw, sizeBytes, 4096)).length).toBe(0)
    expect((await readAt(raw, sizeBytes + 10 * MiB, 4096)).length).toBe(0)
  })

  it('serves several reader processes at once, each its own range', async () => {
    const slow = new MemoryDisk({ sizeBytes: 16 * MiB, salt: 77, readDelayMs: 3 })
    await mountOne(slow)
    const readers = [0, 1, 2, 3].map((i) =>
      runProcess('dd', [`if=${raw}`, 'bs=256K', `skip=${i * 16}`, 'count=16', 'status=none'], { timeoutMs: 60_000 }),
    )
    const results = await Promise.all(readers)
    results.forEach((r, i) => {
      expect(r.code, r.stderr).toBe(0)
      expect(r.stdout.equals(slow.bytes.subarray(i * 4 * MiB, (i + 1) * 4 * MiB)), `reader ${i}`).toBe(true)
    })
    // The requests really overlapped (fuse_loop_mt threads, answered concurrently).
    expect(slow.maxInFlight).toBeGreaterThan(1)
  })

  it('fails a read of a damaged region with EIO, alone; the mount stays up', async () => {
    const damaged = { start: 2 * MiB, end: 2 * MiB + 64 * 1024 }
    const bad = new MemoryDisk({ sizeBytes: 4 * MiB, salt: 9, damaged })
    const m = await mountOne(bad)
    await expect(readAt(raw, damaged.start + 4096, 4096)).rejects.toMatchObject({ code: 'EIO' })
    // Before and after the region, and again after the failure: good data.
    expect((await readAt(raw, 0, 8192)).equals(bad.bytes.subarray(0, 8192))).toBe(true)
    expect((await readAt(raw, damaged.end, 65536)).equals(bad.bytes.subarray(damaged.end, damaged.end + 65536))).toBe(true)
    expect((await readAt(raw, damaged.start - 4096, 4096)).equals(bad.bytes.subarray(damaged.start - 4096, damaged.start))).toBe(true)
    // A sequential reader through the region gets EIO from dd, not a crash of the server.
    const dd = await runProcess('dd', [`if=${raw}`, 'of=/dev/null', 'bs=1M'], { timeoutMs: 30_000 })
    expect(dd.code).not.toBe(0)
    expect(dd.stderr).toMatch(/Input\/output error/)
    expect(isMounted(m.session.mountpoint)).toBe(true)
    expect(await readdir(m.session.mountpoint)).toEqual(['disk.raw'])
    expect((await readAt(raw, 3 * MiB, 4096)).equals(bad.bytes.subarray(3 * MiB, 3 * MiB + 4096))).toBe(true)
  })
})

describe('writes', () => {
  it('answers EROFS to a write open of a read-only disk next to a writable one', async () => {
    const m = await mountDisks([
      { imagePath: 'ro.qcow2', disk: new MemoryDisk({ sizeBytes: 8192 }) },
      { imagePath: 'rw.qcow2', disk: new MemoryDisk({ sizeBytes: 8192, readOnly: false }) },
    ])
    // root ignores the 0444 mode: this EROFS comes from the adapter's open.
    await expect(open(m.paths[0]!, fsConstants.O_WRONLY)).rejects.toMatchObject({ code: 'EROFS' })
    await expect(open(m.paths[0]!, fsConstants.O_RDWR)).rejects.toMatchObject({ code: 'EROFS' })
    const fh = await open(m.paths[1]!, fsConstants.O_RDWR)
    await fh.close()
  })

  it('writes into the disk, flushes on fsync, grows the disk on a write past the end', async () => {
    const disk = new MemoryDisk({ sizeBytes: 1 * MiB, salt: 3, readOnly: false })
    const m = await mountDisks([{ imagePath: 'rw.qcow2', disk }])
    const fh = await open(m.paths[0]!, fsConstants.O_RDWR)
    try {
      const data = Buffer.alloc(200_000, 0xab)
      const { bytesWritten } = await fh.write(data, 0, data.length, 12_345)
      expect(bytesWritten).toBe(data.length)
      await fh.sync()
      expect(disk.flushes).toBeGreaterThan(0)
      expect(disk.bytes.subarray(12_345, 212_345).equals(data)).toBe(true)
      expect(disk.bytes.subarray(0, 12_345).equals(patternBytes(0, 12_345, 3))).toBe(true)
      const back = Buffer.alloc(data.length)
      await fh.read(back, 0, back.length, 12_345)
      expect(back.equals(data)).toBe(true)
      // Past the end, with a gap: the disk grows to the write's end; the gap reads as zeros.
      expect((await fh.write(Buffer.alloc(1024, 0xcd), 0, 1024, MiB + 4096)).bytesWritten).toBe(1024)
      expect(disk.virtualSize).toBe(MiB + 5120)
      expect(disk.bytes.subarray(MiB, MiB + 4096).every((b) => b === 0)).toBe(true)
      expect(disk.bytes.subarray(MiB + 4096).every((b) => b === 0xcd)).toBe(true)
      expect((await fh.stat()).size).toBe(MiB + 5120)
    } finally {
      await fh.close()
    }
  })

  it('receives large writes whole (big_writes): 1 MiB in 128 KiB requests, not 4 KiB ones', async () => {
    const disk = new MemoryDisk({ sizeBytes: 2 * MiB, readOnly: false })
    const m = await mountDisks([{ imagePath: 'big.qcow2', disk }])
    const fh = await open(m.paths[0]!, fsConstants.O_RDWR)
    try {
      const before = disk.writes
      await fh.write(Buffer.alloc(MiB, 0x5a), 0, MiB, 0)
      expect(disk.writes - before).toBe(8)
    } finally {
      await fh.close()
    }
  })

  it('resizes with truncate, ftruncate and O_TRUNC; sizes round up to 512 bytes', async () => {
    const disk = new MemoryDisk({ sizeBytes: 256 * 1024, salt: 4, readOnly: false })
    const m = await mountDisks([{ imagePath: 'rw.qcow2', disk }])
    // writeFile opens with O_TRUNC: the disk becomes exactly what was written.
    await writeFile(m.paths[0]!, Buffer.alloc(1536, 0x11))
    expect((await stat(m.paths[0]!)).size).toBe(1536)
    expect(disk.bytes.equals(Buffer.alloc(1536, 0x11))).toBe(true)

    const fh = await open(m.paths[0]!, fsConstants.O_RDWR)
    try {
      await fh.truncate(3 * MiB)
      expect(disk.virtualSize).toBe(3 * MiB)
      expect((await fh.stat()).size).toBe(3 * MiB)
      expect(disk.bytes.subarray(1536).every((b) => b === 0)).toBe(true)
      await fh.truncate(1000)
      expect(disk.virtualSize).toBe(1024)
      expect((await fh.stat()).size).toBe(1024)
    } finally {
      await fh.close()
    }
    await truncate(m.paths[0]!, 8192)
    expect(disk.virtualSize).toBe(8192)
    expect((await stat(m.paths[0]!)).size).toBe(8192)
  })

  it('grows only, however concurrent writes past the end arrive', async () => {
    const disk = new MemoryDisk({ sizeBytes: 0, readOnly: false })
    const m = await mountDisks([{ imagePath: 'rw.qcow2', disk }])
    const fh = await open(m.paths[0]!, fsConstants.O_RDWR)
    try {
      const chunk = 64 * 1024
      const writes = Array.from({ length: 32 }, (_, i) => fh.write(Buffer.alloc(chunk, i + 1), 0, chunk, i * chunk))
      await Promise.all(writes)
      expect(disk.virtualSize).toBe(32 * chunk)
      for (let i = 0; i < 32; i++) expect(disk.bytes.subarray(i * chunk, (i + 1) * chunk).every((b) => b === i + 1), `chunk ${i}`).toBe(true)
    } finally {
      await fh.close()
    }
  })

  it('fixed-size: every size change fails with EPERM; a straddling write is cut at the end', async () => {
    const disk = new MemoryDisk({ sizeBytes: 64 * 1024, salt: 5, readOnly: false })
    const m = await mountDisks([{ imagePath: 'fixed.qcow2', disk }], { fixedSize: true })
    const fh = await open(m.paths[0]!, fsConstants.O_RDWR)
    try {
      await expect(fh.truncate(4096)).rejects.toMatchObject({ code: 'EPERM' })
      await expect(fh.truncate(MiB)).rejects.toMatchObject({ code: 'EPERM' })
      await fh.truncate(64 * 1024)
      await expect(fh.write(Buffer.alloc(10), 0, 10, 64 * 1024)).rejects.toMatchObject({ code: 'EPERM' })
      expect((await fh.write(Buffer.alloc(8192, 0x77), 0, 8192, 60 * 1024)).bytesWritten).toBe(4096)
      expect(disk.bytes.subarray(60 * 1024).every((b) => b === 0x77)).toBe(true)
    } finally {
      await fh.close()
    }
    await expect(open(m.paths[0]!, fsConstants.O_WRONLY | fsConstants.O_TRUNC)).rejects.toMatchObject({ code: 'EPERM' })
    expect(disk.virtualSize).toBe(64 * 1024)
    expect(disk.resizes).toBe(0)
  })
})

describe('unmounting', () => {
  it('ends the session on an unmount of its own', async () => {
    const m = await mountDisks([{ imagePath: 'u.qcow2', disk: new MemoryDisk({ sizeBytes: 4096 }) }])
    await m.session.unmount(false)
    await m.session.ended
    expect(isMounted(m.session.mountpoint)).toBe(false)
  })

  it('notices an external fusermount -u', async () => {
    const m = await mountDisks([{ imagePath: 'u.qcow2', disk: new MemoryDisk({ sizeBytes: 4096 }) }])
    const r = await runProcess('fusermount', ['-u', m.session.mountpoint])
    expect(r.code, r.stderr).toBe(0)
    await Promise.race([m.session.ended, new Promise((_, fail) => setTimeout(() => fail(new Error('session did not end')), 5_000))])
    expect(m.session.hasEnded).toBe(true)
  })

  it('refuses a plain unmount while a file is open, then unmounts once it is closed', async () => {
    const m = await mountDisks([{ imagePath: 'busy.qcow2', disk: new MemoryDisk({ sizeBytes: 4096 }) }])
    // Another process holds the file: this process serves the mount, and a spawn (fusermount)
    // while it held one of the mount's files itself would deadlock (exec flushes inherited
    // descriptors through FUSE while the parent waits for that exec).
    const holder = spawn('sh', ['-c', 'exec 3<"$0"; echo open; exec sleep 60', m.paths[0]!], { stdio: ['ignore', 'pipe', 'inherit'] })
    try {
      await new Promise<void>((done, fail) => {
        holder.stdout.once('data', () => done())
        holder.once('exit', (code) => fail(new Error(`holder exited ${code}`)))
      })
      await expect(m.session.unmount(false)).rejects.toThrow(/busy/i)
      expect(isMounted(m.session.mountpoint)).toBe(true)
    } finally {
      holder.kill('SIGKILL')
      await new Promise((done) => (holder.exitCode !== null ? done(undefined) : holder.once('exit', done)))
    }
    await m.session.unmount(false)
    await waitFor(() => m.session.hasEnded, 5_000, 'the session to end')
  })
})

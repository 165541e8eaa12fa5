/*
 * The FUSE adapter: a directory with one STEM.raw file per disk (disk.qcow2 -> disk.raw), whose
 * bytes are the disk's guest bytes. It turns fuse-native operations into VirtualDisk calls and
 * every failure into a negative errno (lib/fuse/errno.ts); it never throws into fuse-native,
 * so a failing request fails alone and the mount stays up.
 *
 * Writes: write -> VirtualDisk.write, fsync and a writer's close (flush) -> VirtualDisk.flush.
 * The raw file behaves like a file, and its length is the disk's virtual size: truncate and
 * ftruncate resize the disk (a shrink frees what lies past the new end), open(O_TRUNC) (which
 * atomic_o_trunc hands to us) resizes it to 0, and a write past the end grows it to the write's
 * end, so `cp disk.img mnt/disk.raw` leaves a disk of the copied size. qcow2 sizes are whole
 * 512-byte sectors, so a size that is not one rounds up (the tail reads as zeros). With the
 * fixedSize option every size change fails with EPERM instead (a write past the end included;
 * one that straddles the end is cut short there). A read-only disk answers EROFS to write
 * opens, writes, truncates and utimens.
 *
 * Size changes of one file are serialized (a chain of promises per file) so that concurrent
 * writes past the end, which arrive out of order, only ever grow the disk.
 *
 * Concurrency: libfuse runs a thread per outstanding request (fuse_loop_mt) and fuse-native
 * queues them all onto the JS event loop, so several reads of one disk are in flight at once.
 * The adapter keeps no per-request state besides the handle table and the in-flight count; the
 * disk must accept concurrent reads (VirtualDisk's contract).
 */
import { realpath } from 'node:fs/promises'
import { basename, join, parse } from 'node:path'
import type { VirtualDisk } from '../disk.js'
import { InvalidRequestError } from '../errors.js'
import { log } from '../log.js'
import { errnoOf, toFuseErrno } from './errno.js'
import { FuseSession, type FuseOperations, type FuseStat, type FuseStatfs, type KernelOptions, type OperationTimeouts } from './native.js'

/*
 * Kernel caching and request size, chosen by measurement: test/fuse/measure-read.mjs, 2 GiB
 * fully allocated qcow2 (64 KiB clusters) read through Qcow2Image with dd, medians of 3 mounts
 * per variant, host page cache warm, 2 cores shared with other work (docs/FUSE.md has all runs).
 *
 *   variant                        dd bs=1M 1st   dd bs=1M again   dd bs=4K   requests
 *   libfuse defaults                  883 MiB/s        887 MiB/s   815 MiB/s  16384 x 128K
 *   kernel_cache             <--      894             4547         927        16384 x 128K
 *   direct_io                         786             1175          84        16384 x 128K
 *   kernel_cache, max_read=64K        686             4807         606        32768 x 64K
 *   kernel_cache, read_ahead 512K     817             5090         812        16390 x 128K
 *   kernel_cache, read_ahead 4M       616             4268         636        16444 x 128K
 *
 * So: page cache on (no direct_io: it sends every 4 KiB read as its own request, 10x slower for
 * small-block readers, and re-reads cannot hit a cache), kernel_cache (a raw file changes only
 * through this mount, so the cache stays valid across opens: re-reads run at memory speed),
 * max_read at the 128 KiB the kernel caps requests at anyway (64 KiB doubles the requests and
 * costs 20-25%), readahead left at the kernel's 128 KiB (larger windows did not help the
 * synchronous engine: the JS thread is the bottleneck, max in flight stayed 1). attr/entry
 * timeouts are long because sizes never change behind the kernel's back.
 */
export interface KernelTuning extends Omit<KernelOptions, 'name' | 'readOnly' | 'allowOther'> {
  /** read_ahead_kb of the mount's backing device; undefined keeps the kernel's (128). */
  readAheadKb?: number
}

export const DEFAULT_KERNEL_TUNING: KernelTuning = {
  maxReadBytes: 131072,
  maxReadaheadBytes: 131072,
  kernelCache: true,
  directIo: false,
  attrTimeoutSeconds: 60,
  entryTimeoutSeconds: 60,
}

/*
 * fuse-native answers ETIMEDOUT when an operation has not called back within its timeout
 * (default 15 s). read and write get none on purpose: their buffer is libfuse memory that is
 * freed (read) or reused for the next request (write) once a reply is sent, so answering early
 * while the engine still fills or reads that buffer would corrupt memory. flush, fsync,
 * release and the truncates get none either: they may legitimately take long (writing metadata
 * back, zeroing), and a timeout there would tell a writer that data is durable when it is not
 * known to be. open neither: with O_TRUNC it zeroes the disk, and a timed-out open would leave
 * a handle the kernel never releases. The rest never touch a disk (attributes, directory
 * listing, statfs, utimens): a reply missing for 30 s means a lost callback, and an error beats
 * a hung caller.
 */
export const OPERATION_TIMEOUTS: OperationTimeouts = {
  default: 30_000,
  read: false,
  write: false,
  flush: false,
  fsync: false,
  release: false,
  truncate: false,
  ftruncate: false,
  open: false,
}

const S_IFDIR = 0o040000
const S_IFREG = 0o100000
const O_ACCMODE = 0o3
const O_RDONLY = 0
const O_TRUNC = 0o1000
/** statvfs f_flag bit for a read-only file system. */
const ST_RDONLY = 1
/** st_blksize: the preferred I/O size for cp and friends; one full FUSE request. */
const PREFERRED_IO_BYTES = 131072

const ENOENT = errnoOf('ENOENT')
const EROFS = errnoOf('EROFS')
const EBADF = errnoOf('EBADF')
const EISDIR = errnoOf('EISDIR')
const ENOTDIR = errnoOf('ENOTDIR')
const EPERM = errnoOf('EPERM')

export interface FileTimes {
  atime: Date
  mtime: Date
  ctime: Date
}

/** One disk to expose. `imagePath` only names the file (its stem); it is never opened here. */
export interface RawFileSource {
  imagePath: string
  disk: VirtualDisk
  /** Times to report for the raw file; default: when the adapter was made. */
  times?: FileTimes
}

/** disk.qcow2 -> disk.raw; the stem is the name without its last extension. */
export function rawFileName(imagePath: string): string {
  return `${parse(basename(imagePath)).name}.raw`
}

/** Throws InvalidRequestError (one line) when two images would get the same raw file name. */
export function assertDistinctNames(imagePaths: readonly string[]): void {
  const seen = new Map<string, string>()
  for (const imagePath of imagePaths) {
    const name = rawFileName(imagePath)
    const clash = seen.get(name)
    if (clash !== undefined) {
      throw new InvalidRequestError(`'${clash}' and '${imagePath}' would both appear as ${name}; rename one of them`)
    }
    seen.set(name, imagePath)
  }
}

interface RawFile {
  name: string
  imagePath: string
  disk: VirtualDisk
  times: FileTimes
  ino: number
  /** The last size change of this file; the next one starts after it. */
  sizeChange: Promise<unknown>
  /** Writes answered before they were stored that are not stored yet (see writeEarly). */
  unsettled: UnsettledWrite[]
}

/**
 * A write answered before it was stored, while it is not stored: waiting for the disk's lock
 * (`pending`), or failed and kept to be tried again (`failed`). Reads see its bytes; the next
 * write, flush, fsync or size change of the file first stores it or fails with its error.
 */
interface UnsettledWrite {
  data: Buffer
  guestOffset: number
  pending: Promise<void> | undefined
  error: unknown
}

interface OpenHandle {
  file: RawFile
  writable: boolean
  /** Written through this handle since its last flush. */
  dirty: boolean
}

export interface AdapterOptions {
  /** Refuse every change of a raw file's size with EPERM (the `fixed-size` mount option). */
  fixedSize?: boolean
}

export class RawFilesAdapter {
  readonly files: readonly RawFile[]
  private readonly fixedSize: boolean
  private readonly byPath = new Map<string, RawFile>()
  private readonly handles = new Map<number, OpenHandle>()
  private nextHandle = 1
  private inFlight = 0
  private idleWaiters: Array<() => void> = []
  private scratchBuffer = Buffer.alloc(0)
  private readonly uid = process.getuid?.() ?? 0
  private readonly gid = process.getgid?.() ?? 0
  private readonly dirTimes: FileTimes

  /** Throws InvalidRequestError (one line) when two images would get the same file name. */
  constructor(sources: readonly RawFileSource[], opts: AdapterOptions = {}) {
    this.fixedSize = opts.fixedSize ?? false
    const created = new Date()
    this.dirTimes = { atime: created, mtime: created, ctime: created }
    assertDistinctNames(sources.map((source) => source.imagePath))
    const files: RawFile[] = []
    for (const source of sources) {
      const name = rawFileName(source.imagePath)
      const file: RawFile = {
        name,
        imagePath: source.imagePath,
        disk: source.disk,
        times: source.times ?? { ...this.dirTimes },
        ino: files.length + 2,
        sizeChange: Promise.resolve(),
        unsettled: [],
      }
      files.push(file)
      this.byPath.set(`/${name}`, file)
    }
    this.files = files
  }

  /** True when no disk accepts writes: the mount itself is then read-only. */
  get readOnly(): boolean {
    return this.files.every((file) => file.disk.readOnly)
  }

  /** Number of requests still being answered. */
  get pending(): number {
    return this.inFlight
  }

  /** Resolves when no request is being answered. */
  idle(): Promise<void> {
    if (this.inFlight === 0) return Promise.resolve()
    return new Promise((resolve) => this.idleWaiters.push(resolve))
  }

  /** The fuse-native operation table. */
  operations(): FuseOperations {
    return {
      init: (cb) => cb(0),
      getattr: (path, cb) => this.answer(cb, () => this.getattr(path)),
      readdir: (path, cb) => this.answer(cb, () => this.readdir(path)),
      open: (path, flags, cb) => {
        // O_TRUNC matters only for a writer (a read-only open ignores it, as Linux does).
        if ((flags & O_TRUNC) === 0 || (flags & O_ACCMODE) === O_RDONLY) return this.answer(cb, () => this.open(path, flags))
        let fh = 0
        this.track(
          (code) => cb(code < 0 ? code : 0, code < 0 ? undefined : fh),
          async () => {
            fh = await this.openTruncating(path, flags)
            return 0
          },
        )
      },
      release: (_path, fh, cb) => this.answer(cb, () => this.release(fh)),
      statfs: (_path, cb) => this.answer(cb, () => this.statfs()),
      read: (_path, fh, buf, length, position, cb) => this.track(cb, () => this.read(fh, buf, length, position)),
      write: (_path, fh, buf, length, position, cb) => {
        if (!this.writeEarly(fh, buf, length, position, cb)) this.track(cb, () => this.write(fh, buf, length, position))
      },
      flush: (_path, fh, cb) => this.track(cb, () => this.flush(fh)),
      fsync: (_path, _datasync, fh, cb) => this.track(cb, () => this.fsync(fh)),
      truncate: (path, size, cb) => this.track(cb, () => this.truncate(this.lookup(path), size)),
      ftruncate: (_path, fh, size, cb) => this.track(cb, () => this.truncate(this.handle(fh).file, size)),
      utimens: (path, atime, mtime, cb) => this.answer(cb, () => this.utimens(path, atime, mtime)),
    }
  }

  /* Synchronous operations: the value (or a thrown error) becomes the reply. */

  private answer<T>(cb: (code: number, value?: T) => void, op: () => T): void {
    let value: T
    try {
      value = op()
    } catch (err) {
      return cb(typeof err === 'number' ? err : toFuseErrno(err))
    }
    cb(0, value)
  }

  /* Disk operations: counted while in flight; the resolved number (0 or a byte count) or the
   * rejection's errno becomes the reply. */

  private track(cb: (code: number) => void, op: () => Promise<number>): void {
    this.inFlight++
    let promise: Promise<number>
    try {
      promise = op()
    } catch (err) {
      promise = Promise.reject(err)
    }
    const finish = (code: number) => {
      this.requestDone()
      cb(code)
    }
    promise.then(finish, (err: unknown) => {
      if (typeof err === 'number') return finish(err)
      log.fuse('request failed: %s', err instanceof Error ? err.message : String(err))
      finish(toFuseErrno(err))
    })
  }

  private requestDone(): void {
    this.inFlight--
    if (this.inFlight === 0) for (const wake of this.idleWaiters.splice(0)) wake()
  }

  private lookup(path: string): RawFile {
    const file = this.byPath.get(path)
    if (file) return file
    // A name below one of our files: the kernel asks only if someone tries 'disk.raw/x'.
    if (path.indexOf('/', 1) > 0 && this.byPath.has(path.slice(0, path.indexOf('/', 1)))) throw ENOTDIR
    throw ENOENT
  }

  private handle(fh: number): OpenHandle {
    const handle = this.handles.get(fh)
    if (!handle) throw EBADF
    return handle
  }

  private getattr(path: string): FuseStat {
    if (path === '/') {
      return {
        mode: S_IFDIR | (this.readOnly ? 0o555 : 0o755),
        uid: this.uid,
        gid: this.gid,
        size: 4096,
        nlink: 2,
        ino: 1,
        blksize: 4096,
        blocks: 8,
        ...this.dirTimes,
      }
    }
    const file = this.lookup(path)
    return {
      mode: S_IFREG | (file.disk.readOnly ? 0o444 : 0o644),
      uid: this.uid,
      gid: this.gid,
      size: file.disk.virtualSize,
      nlink: 1,
      ino: file.ino,
      blksize: PREFERRED_IO_BYTES,
      blocks: Math.ceil(file.disk.virtualSize / 512),
      ...file.times,
    }
  }

  private readdir(path: string): string[] {
    if (path !== '/') {
      this.lookup(path)
      throw ENOTDIR
    }
    return ['.', '..', ...this.files.map((file) => file.name)]
  }

  private open(path: string, flags: number): number {
    if (path === '/') throw EISDIR
    const file = this.lookup(path)
    const writable = (flags & O_ACCMODE) !== O_RDONLY
    if (writable && file.disk.readOnly) throw EROFS
    let fh = this.nextHandle
    while (this.handles.has(fh)) fh = fh >= 0x7fffffff ? 1 : fh + 1
    this.nextHandle = fh >= 0x7fffffff ? 1 : fh + 1
    this.handles.set(fh, { file, writable, dirty: false })
    log.fuse('open %s flags 0x%s -> fh %d', path, flags.toString(16), fh)
    return fh
  }

  /** open(O_TRUNC) of a writable disk (atomic_o_trunc hands it to us): the disk becomes empty. */
  private async openTruncating(path: string, flags: number): Promise<number> {
    const file = this.lookup(path)
    if (file.disk.readOnly) throw EROFS
    await this.resize(file, 0)
    const fh = this.open(path, flags)
    this.handle(fh).dirty = true
    return fh
  }

  /**
   * Runs one size change of a file after the ones before it; `target` sees the size as it is
   * then and returns the new size, or undefined for no change.
   */
  private changeSize(file: RawFile, target: (currentSize: number) => number | undefined): Promise<void> {
    const change = file.sizeChange.then(async () => {
      await this.settle(file)
      const sizeBytes = target(file.disk.virtualSize)
      if (sizeBytes === undefined || sizeBytes === file.disk.virtualSize) return
      if (this.fixedSize) throw EPERM
      await file.disk.resize(sizeBytes)
      file.times.mtime = new Date()
    })
    file.sizeChange = change.catch(() => undefined)
    return change
  }

  private resize(file: RawFile, sizeBytes: number): Promise<void> {
    return this.changeSize(file, () => sizeBytes)
  }

  private release(fh: number): void {
    this.handles.delete(fh)
  }

  private async read(fh: number, buf: Buffer, length: number, guestOffset: number): Promise<number> {
    const { file } = this.handle(fh)
    const { disk } = file
    if (guestOffset >= disk.virtualSize) return 0
    const byteCount = Math.min(length, disk.virtualSize - guestOffset)
    // The engine fills fuse-native's own buffer (libfuse memory): no copy.
    await disk.read(buf.subarray(0, byteCount), guestOffset)
    // Writes answered but not stored yet are newer than what the disk has.
    for (const write of file.unsettled) overlay(buf, byteCount, guestOffset, write)
    return byteCount
  }

  /**
   * A write answered before it is stored, so that the next request travels through the kernel
   * while this one is written (sequential writers wait for each answer: dd, cp, fio at queue
   * depth 1). Taken only when the disk can store the write synchronously at once
   * (VirtualDisk.writeAtOnce), the write lies inside the disk, and the file has no unsettled
   * write. The bytes are copied first (libfuse reuses its buffer once the answer is sent), the
   * answer goes out, and the disk stores them in the very next tick (fuse-native sends answers
   * from process.nextTick: see native.ts), before any later request is taken, so no later read,
   * flush or fsync can miss them. When storing fails, or cannot happen at once, the write stays
   * in file.unsettled: reads see it, and the file's next write, flush, fsync or size change
   * stores it first or fails with its error (ENOSPC, EIO), as a page cache reports a writeback
   * error; the data is kept until it is stored, so freeing space lets it through.
   */
  private writeEarly(fh: number, buf: Buffer, length: number, guestOffset: number, cb: (code: number) => void): boolean {
    const handle = this.handles.get(fh)
    if (!handle?.writable) return false
    const { file } = handle
    const { disk } = file
    if (!disk.writeAtOnce || disk.readOnly || file.unsettled.length > 0 || guestOffset + length > disk.virtualSize) return false
    const data = this.scratch(length)
    buf.copy(data, 0, 0, length)
    handle.dirty = true
    file.times.mtime = new Date()
    this.inFlight++
    cb(length)
    process.nextTick(() => {
      let stored = false
      try {
        stored = disk.writeAtOnce!(data, guestOffset)
        if (!stored) this.settleLater(file, Buffer.from(data), guestOffset)
      } catch (err) {
        log.fuse('write of %d bytes at %d answered, not stored yet: %s', length, guestOffset, err instanceof Error ? err.message : String(err))
        file.unsettled.push({ data: Buffer.from(data), guestOffset, pending: undefined, error: err })
      }
      this.requestDone()
    })
    return true
  }

  /** A write that must wait for the disk: stored in the background, unsettled until then. */
  private settleLater(file: RawFile, data: Buffer, guestOffset: number): void {
    const write: UnsettledWrite = { data, guestOffset, pending: undefined, error: undefined }
    write.pending = file.disk.write(data, guestOffset).then(
      () => {
        file.unsettled.splice(file.unsettled.indexOf(write), 1)
      },
      (err: unknown) => {
        write.pending = undefined
        write.error = err
      },
    )
    file.unsettled.push(write)
  }

  /** Stores the file's unsettled writes, oldest first; throws the first error still there. */
  private async settle(file: RawFile): Promise<void> {
    while (file.unsettled.length > 0) {
      const write = file.unsettled[0]!
      if (write.pending) {
        await write.pending
        continue
      }
      try {
        await file.disk.write(write.data, write.guestOffset)
      } catch (err) {
        write.error = err
        throw err
      }
      file.unsettled.shift()
    }
  }

  /** Stores every unsettled write (before the disks close); returns the errors left. */
  async settleAll(): Promise<unknown[]> {
    const errors: unknown[] = []
    for (const file of this.files) {
      try {
        await this.settle(file)
      } catch (err) {
        errors.push(err)
      }
    }
    return errors
  }

  /** A buffer for the bytes of one early write, reused: the disk no longer holds it after. */
  private scratch(length: number): Buffer {
    if (this.scratchBuffer.length < length) this.scratchBuffer = Buffer.allocUnsafe(Math.max(length, PREFERRED_IO_BYTES))
    return this.scratchBuffer.subarray(0, length)
  }

  private async write(fh: number, buf: Buffer, length: number, guestOffset: number): Promise<number> {
    const handle = this.handle(fh)
    const { file } = handle
    const { disk } = file
    if (disk.readOnly || !handle.writable) throw disk.readOnly ? EROFS : EBADF
    await this.settle(file)
    let byteCount = length
    if (guestOffset + length > disk.virtualSize) {
      if (this.fixedSize) {
        // A fixed-size disk ends where it ends: a short write up to the end, then EPERM.
        if (guestOffset >= disk.virtualSize) throw EPERM
        byteCount = disk.virtualSize - guestOffset
      } else {
        await this.changeSize(file, (currentSize) => (guestOffset + length > currentSize ? guestOffset + length : undefined))
      }
    }
    await disk.write(buf.subarray(0, byteCount), guestOffset)
    handle.dirty = true
    file.times.mtime = new Date()
    return byteCount
  }

  /** close(2) of a descriptor that wrote: make the data durable before close returns. */
  private async flush(fh: number): Promise<number> {
    const handle = this.handles.get(fh)
    if (!handle?.dirty) return 0
    handle.dirty = false
    await this.settle(handle.file)
    await handle.file.disk.flush()
    return 0
  }

  private async fsync(fh: number): Promise<number> {
    const handle = this.handle(fh)
    if (handle.file.disk.readOnly) return 0
    handle.dirty = false
    await this.settle(handle.file)
    await handle.file.disk.flush()
    return 0
  }

  /** truncate/ftruncate: resizes the disk (see the top of this file). */
  private async truncate(file: RawFile, sizeBytes: number): Promise<number> {
    if (file.disk.readOnly) throw EROFS
    await this.resize(file, sizeBytes)
    return 0
  }

  private utimens(path: string, atimeMs: number, mtimeMs: number): void {
    const file = this.lookup(path)
    if (file.disk.readOnly) throw EROFS
    file.times.atime = new Date(atimeMs)
    file.times.mtime = new Date(mtimeMs)
  }

  private statfs(): FuseStatfs {
    const totalBytes = this.files.reduce((sum, file) => sum + file.disk.virtualSize, 0)
    // fuse-native passes 32-bit fields: grow the fragment size until the block count fits.
    let fragmentBytes = 4096
    while (Math.ceil(totalBytes / fragmentBytes) > 0xffffffff) fragmentBytes *= 2
    return {
      bsize: PREFERRED_IO_BYTES,
      frsize: fragmentBytes,
      blocks: Math.ceil(totalBytes / fragmentBytes),
      bfree: 0,
      bavail: 0,
      files: this.files.length + 1,
      ffree: 0,
      favail: 0,
      fsid: 0,
      flag: this.readOnly ? ST_RDONLY : 0,
      namemax: 255,
    }
  }
}

export interface MountRawFilesOptions extends AdapterOptions {
  allowOther?: boolean
  /** Overrides of DEFAULT_KERNEL_TUNING (measurements only). */
  tuning?: Partial<KernelTuning>
  pollIntervalMs?: number
}

export interface MountedRawFiles {
  adapter: RawFilesAdapter
  session: FuseSession
  /** Absolute paths of the raw files, in source order. */
  paths: string[]
}

/** Mounts `sources` at `mountpoint` (an existing directory); resolves once the mount is live. */
export async function mountRawFiles(mountpoint: string, sources: readonly RawFileSource[], opts: MountRawFilesOptions = {}): Promise<MountedRawFiles> {
  const adapter = new RawFilesAdapter(sources, { fixedSize: opts.fixedSize })
  const { readAheadKb, ...kernelTuning } = { ...DEFAULT_KERNEL_TUNING, ...opts.tuning }
  const session = await FuseSession.mount({
    // The mount table lists resolved paths; so must the session.
    mountpoint: await realpath(mountpoint),
    ops: adapter.operations(),
    timeouts: OPERATION_TIMEOUTS,
    kernel: {
      name: 'qcow2fs',
      readOnly: adapter.readOnly,
      allowOther: opts.allowOther ?? false,
      ...kernelTuning,
    },
    pollIntervalMs: opts.pollIntervalMs,
  })
  if (readAheadKb !== undefined) await session.setReadAheadKb(readAheadKb)
  return { adapter, session, paths: adapter.files.map((file) => join(session.mountpoint, file.name)) }
}

/** Copies the part of `write` that falls in [guestOffset, guestOffset + byteCount) into buf. */
function overlay(buf: Buffer, byteCount: number, guestOffset: number, write: UnsettledWrite): void {
  const start = Math.max(guestOffset, write.guestOffset)
  const end = Math.min(guestOffset + byteCount, write.guestOffset + write.data.length)
  if (start >= end) return
  write.data.copy(buf, start - guestOffset, start - write.guestOffset, end - write.guestOffset)
}

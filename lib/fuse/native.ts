/*
 * The one place that touches fuse-native 2.2.6 (and through it libfuse 2.9). Everything the rest
 * of the project needs from it is here: the errno constants, the mount option string, mounting,
 * unmounting, and noticing that the kernel session ended.
 *
 * fuse-native facts this file relies on (read in node_modules/fuse-native/index.js and
 * fuse-native.c):
 *  - `_fuseOptions()` builds the single '-o...' string handed to fuse_mount()/fuse_new(); it
 *    knows no flag for big_writes, atomic_o_trunc, ro, nonempty or max_readahead, so
 *    NativeFuse overrides it.
 *  - `_open()` calls the native mount synchronously and reports success only when FUSE_INIT
 *    reaches JS. NativeFuse overrides it to record which /dev/fuse descriptor the new session
 *    uses, and to clean up after a half-made mount (fuse_mount() worked, fuse_new() did not).
 *  - `_close()` runs `fusermount -uz` and gives up when that fails, which leaves a referenced
 *    libuv handle behind after an external unmount; NativeFuse does its own unmount and always
 *    releases the native state.
 *  - There is no destroy callback: when the kernel ends the session (umount, fusermount -u,
 *    lazy unmount after the last close) the fuse thread leaves fuse_loop_mt(), and
 *    fuse_kern_unmount() closes the /dev/fuse descriptor. That descriptor going away is the
 *    one reliable "session ended" signal, so FuseSession polls for it (and for the mount
 *    table entry, to tell an external unmount early).
 *  - Callbacks take a number: 0 or a negative errno; read and write callbacks take the byte
 *    count instead of 0. The read/write buffer is libfuse memory that is freed or reused as
 *    soon as the reply is signalled.
 *  - A callback does not answer at once: fuse-native signals the answer to the waiting libfuse
 *    thread from process.nextTick. So a process.nextTick queued right after a callback runs
 *    once the answer is on its way, and before the event loop takes another request (the
 *    adapter's early write answers rely on this).
 *
 * Two deadlocks to keep out of any process that serves a mount (measured here, both hang the
 * process for good):
 *  - The /dev/fuse descriptor is not close-on-exec, so children inherit it; a child still
 *    running when the server dies keeps the connection alive with nobody answering.
 *  - Spawning a child while this process has a file of its own mount open: exec closes the
 *    inherited descriptor, which sends FUSE_FLUSH, which only this process can answer, while
 *    libuv's spawn blocks the event loop until the exec is done. The mount server never opens
 *    its own files; tests that do must let another process hold them.
 */
import { execFile } from 'node:child_process'
import { readdirSync, readlinkSync } from 'node:fs'
import { writeFile } from 'node:fs/promises'
import { createRequire } from 'node:module'
import { dirname } from 'node:path'
import { log } from '../log.js'
import { findMount, readMountTable, readMountTableSync } from './mountinfo.js'

const require = createRequire(import.meta.url)

/** The node-style callback fuse-native hands to every operation. */
export type FuseCallback = (code: number, ...values: unknown[]) => void

export interface FuseStat {
  mode: number
  uid: number
  gid: number
  size: number
  nlink: number
  ino: number
  blksize: number
  blocks: number
  atime: Date
  mtime: Date
  ctime: Date
}

export interface FuseStatfs {
  bsize: number
  frsize: number
  blocks: number
  bfree: number
  bavail: number
  files: number
  ffree: number
  favail: number
  fsid: number
  flag: number
  namemax: number
}

/** The operations fuse-native calls, with its argument order. */
export interface FuseOperations {
  init(cb: (code: number) => void): void
  getattr(path: string, cb: (code: number, stat?: FuseStat) => void): void
  readdir(path: string, cb: (code: number, names?: string[]) => void): void
  open(path: string, flags: number, cb: (code: number, fh?: number) => void): void
  read(path: string, fh: number, buf: Buffer, length: number, position: number, cb: (bytesOrError: number) => void): void
  write(path: string, fh: number, buf: Buffer, length: number, position: number, cb: (bytesOrError: number) => void): void
  release(path: string, fh: number, cb: (code: number) => void): void
  flush(path: string, fh: number, cb: (code: number) => void): void
  fsync(path: string, datasync: number, fh: number, cb: (code: number) => void): void
  truncate(path: string, size: number, cb: (code: number) => void): void
  ftruncate(path: string, fh: number, size: number, cb: (code: number) => void): void
  utimens(path: string, atime: number, mtime: number, cb: (code: number) => void): void
  statfs(path: string, cb: (code: number, statfs?: FuseStatfs) => void): void
}

/** Per-operation reply deadlines in ms, or false for none (fuse-native's `timeout` option). */
export type OperationTimeouts = { default: number } & Partial<Record<keyof FuseOperations, number | false>>

interface FuseBaseInstance {
  mnt: string
  _thread: Buffer | null
  _openCallback: ((err: Error | null) => void) | null
  _handlers: unknown[]
  _malloc(size: number): Buffer
  _getImplementedArray(): Uint32Array
  mount(cb: (err: Error | null) => void): void
  unmount(cb: (err: Error | null) => void): void
}

interface FuseBaseConstructor {
  new (mountpoint: string, ops: FuseOperations, opts: { timeout: OperationTimeouts }): FuseBaseInstance
  readonly [errnoName: string]: unknown
}

interface FuseBinding {
  sizeof_fuse_thread_t: number
  fuse_native_mount(
    mountpoint: string,
    options: string,
    thread: Buffer,
    self: object,
    malloc: (size: number) => Buffer,
    handlers: unknown[],
    implemented: Uint32Array,
  ): void
  fuse_native_unmount(mountpoint: string, thread: Buffer): void
}

const fuseMain = require.resolve('fuse-native')
const FuseBase = require('fuse-native') as FuseBaseConstructor
// The same addon instance fuse-native loaded (node-gyp-build goes through require's cache).
const binding = createRequire(fuseMain)('node-gyp-build')(dirname(fuseMain)) as FuseBinding

/** fuse-native's negative errno constant for a name such as 'EIO', or undefined. */
export function fuseErrnoConstant(name: string): number | undefined {
  const value = FuseBase[name]
  return typeof value === 'number' ? value : undefined
}

/** Everything that goes into the '-o' option string; see buildOptionString. */
export interface KernelOptions {
  /** fsname and subtype: the mount shows up as `NAME on MNT type fuse.NAME`. */
  name: string
  readOnly: boolean
  allowOther: boolean
  maxReadBytes: number
  maxReadaheadBytes: number
  /** Keep page cache across opens (kernel_cache). */
  kernelCache: boolean
  /** Bypass the page cache entirely (direct_io). */
  directIo: boolean
  attrTimeoutSeconds: number
  entryTimeoutSeconds: number
}

export function buildOptionString(opts: KernelOptions): string {
  const list = [
    `fsname=${opts.name}`,
    `subtype=${opts.name}`,
    // The mountpoint checks (empty directory, not a mount) are ours, with one-line messages;
    // libfuse's own emptiness check would print to the daemon's stderr instead.
    'nonempty',
    // Permission checks by the kernel from the modes getattr reports (0444 / 0644).
    'default_permissions',
    `max_read=${opts.maxReadBytes}`,
    `max_readahead=${opts.maxReadaheadBytes}`,
    `attr_timeout=${opts.attrTimeoutSeconds}`,
    `entry_timeout=${opts.entryTimeoutSeconds}`,
    // Writes arrive in 4 KiB pieces without big_writes.
    'big_writes',
    // open(O_TRUNC) reaches the open op instead of a truncate(0) first: `cp` onto a raw file
    // works, and a disk never shrinks.
    'atomic_o_trunc',
  ]
  if (opts.readOnly) list.push('ro')
  if (opts.allowOther) list.push('allow_other')
  if (opts.kernelCache) list.push('kernel_cache')
  if (opts.directIo) list.push('direct_io')
  for (const item of list) {
    if (/[,\\\s]/.test(item)) throw new Error(`FUSE option '${item}' contains a separator`)
  }
  return `-o${list.join(',')}`
}

/** The /dev/fuse descriptors this process has open right now. */
function fuseDeviceFds(): Set<number> {
  const found = new Set<number>()
  for (const name of readdirSync('/proc/self/fd')) {
    try {
      if (readlinkSync(`/proc/self/fd/${name}`) === '/dev/fuse') found.add(Number(name))
    } catch {
      // The descriptor readdir used to list /proc/self/fd, already closed: not ours.
    }
  }
  return found
}

function fdIsFuseDevice(fd: number): boolean {
  try {
    return readlinkSync(`/proc/self/fd/${fd}`) === '/dev/fuse'
  } catch {
    return false
  }
}

function runFusermount(args: string[]): Promise<void> {
  return new Promise((resolve, reject) => {
    execFile('fusermount', args, { timeout: 60_000 }, (err, _stdout, stderr) => {
      if (!err) return resolve()
      const detail = String(stderr).trim().split('\n')[0] || err.message.split('\n')[0]
      reject(new Error(detail))
    })
  })
}

/** Unmounted sessions: see NativeFuse.releaseNative. */
const retired: NativeFuse[] = []

class NativeFuse extends FuseBase {
  constructor(
    mountpoint: string,
    ops: FuseOperations,
    timeouts: OperationTimeouts,
    private readonly optionString: string,
    private readonly onMounted: (fd: number | undefined) => void,
  ) {
    super(mountpoint, ops, { timeout: timeouts })
  }

  _fuseOptions(): string {
    return this.optionString
  }

  _open(cb: (err: Error | null) => void): void {
    const thread = Buffer.alloc(binding.sizeof_fuse_thread_t)
    this._thread = thread
    this._openCallback = cb
    const before = fuseDeviceFds()
    try {
      binding.fuse_native_mount(this.mnt, this.optionString, thread, this, this._malloc, this._handlers, this._getImplementedArray())
    } catch {
      this._openCallback = null
      // fuse_mount() may have succeeded before fuse_new() failed: do not leave that behind.
      const leftover = findMount(readMountTableSync(), this.mnt)
      const cleanup = leftover?.fsType.startsWith('fuse') ? runFusermount(['-uz', this.mnt]).catch(() => undefined) : Promise.resolve()
      void cleanup.then(() => {
        for (const fd of fuseDeviceFds()) if (!before.has(fd)) log.fuse('descriptor %d left by a failed mount', fd)
        binding.fuse_native_unmount(this.mnt, thread)
        retired.push(this)
        cb(new Error('the kernel refused the FUSE mount'))
      })
      return
    }
    const added = [...fuseDeviceFds()].filter((fd) => !before.has(fd))
    this.onMounted(added.length === 1 ? added[0] : undefined)
  }

  /**
   * Drops the libuv handle that keeps the event loop alive while mounted. The memory of that
   * handle (this._thread) and of the per-thread handles (this._threads) stays linked in the
   * event loop's handle queue for good (fuse-native never closes them), so this object is kept
   * reachable forever: freeing it would corrupt the loop.
   */
  releaseNative(): void {
    if (this.released || !this._thread) return
    this.released = true
    binding.fuse_native_unmount(this.mnt, this._thread)
    retired.push(this)
  }

  private released = false
}

export interface FuseSessionOptions {
  mountpoint: string
  ops: FuseOperations
  timeouts: OperationTimeouts
  kernel: KernelOptions
  /** How often to look for an external unmount, in ms. */
  pollIntervalMs?: number
}

/**
 * One live FUSE mount. `ended` resolves once the kernel session is over (our unmount, an
 * external umount/fusermount -u, or a lazy unmount whose last user closed the file).
 */
export class FuseSession {
  readonly mountpoint: string
  /** "major:minor" of the mount, as /proc/self/mountinfo shows it. */
  readonly device: string
  readonly ended: Promise<void>
  private readonly fuse: NativeFuse
  private readonly deviceFd: number | undefined
  private endedResolve!: () => void
  private timer: NodeJS.Timeout | undefined
  private detached = false
  private isEnded = false
  private released = false

  private constructor(mountpoint: string, fuse: NativeFuse, deviceFd: number | undefined, device: string, pollIntervalMs: number) {
    this.mountpoint = mountpoint
    this.fuse = fuse
    this.deviceFd = deviceFd
    this.device = device
    this.ended = new Promise((resolve) => (this.endedResolve = resolve))
    this.timer = setInterval(() => void this.poll(), pollIntervalMs)
    this.timer.unref()
  }

  /** Mounts and resolves once the kernel has completed FUSE_INIT. */
  static mount(opts: FuseSessionOptions): Promise<FuseSession> {
    const optionString = buildOptionString(opts.kernel)
    log.fuse('mounting %s with %s', opts.mountpoint, optionString)
    let deviceFd: number | undefined
    const fuse = new NativeFuse(opts.mountpoint, opts.ops, opts.timeouts, optionString, (fd) => (deviceFd = fd))
    return new Promise((resolve, reject) => {
      fuse.mount((err) => {
        if (err) return reject(err)
        const entry = findMount(readMountTableSync(), fuse.mnt)
        const session = new FuseSession(fuse.mnt, fuse, deviceFd, entry?.device ?? '', opts.pollIntervalMs ?? 200)
        log.fuse('mounted %s (device %s, /dev/fuse fd %s)', fuse.mnt, session.device, deviceFd)
        resolve(session)
      })
    })
  }

  get hasEnded(): boolean {
    return this.isEnded
  }

  /** True while the mount is in this process's mount table (false after a lazy unmount too). */
  async isAttached(): Promise<boolean> {
    if (this.detached) return false
    const entry = findMount(await readMountTable(), this.mountpoint)
    this.detached = !entry || entry.device !== this.device
    return !this.detached
  }

  /**
   * Unmounts. Without lazy, a busy mount (a file still open) rejects with 'busy' in the
   * message and stays mounted. Resolves when the mount is detached; `ended` follows when the
   * kernel session is over (at once, unless lazy left users behind).
   */
  async unmount(lazy: boolean): Promise<void> {
    if (!(await this.isAttached())) return
    try {
      await runFusermount([lazy ? '-uz' : '-u', this.mountpoint])
    } catch (err) {
      if (await this.isAttached()) throw err
    }
    this.detached = true
    await this.poll()
  }

  /**
   * Sets the kernel readahead of this mount (its backing device's read_ahead_kb). Root only;
   * resolves false (and the kernel default stays) when it cannot.
   */
  async setReadAheadKb(readAheadKb: number): Promise<boolean> {
    const knob = `/sys/class/bdi/${this.device}/read_ahead_kb`
    try {
      await writeFile(knob, String(readAheadKb))
      return true
    } catch (err) {
      log.fuse('cannot set %s: %s; keeping the kernel default', knob, (err as Error).message)
      return false
    }
  }

  /** Releases the native state; call after `ended` (or when giving up on it). */
  release(): void {
    if (this.timer) clearInterval(this.timer)
    this.timer = undefined
    if (this.released) return
    this.released = true
    this.fuse.releaseNative()
  }

  private async poll(): Promise<void> {
    if (this.isEnded) return
    let over: boolean
    if (this.deviceFd !== undefined) {
      over = !fdIsFuseDevice(this.deviceFd)
    } else {
      // Without the descriptor (two mounts raced in one process), the mount table entry is
      // the best signal left.
      over = !(await this.isAttached())
    }
    if (!over) return
    this.isEnded = true
    this.detached = true
    log.fuse('session on %s ended', this.mountpoint)
    if (this.timer) clearInterval(this.timer)
    this.timer = undefined
    this.endedResolve()
  }
}

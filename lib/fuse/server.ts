/*
 * The mount server: checks the mountpoint, opens the images, mounts them through the adapter,
 * answers the control socket, and shuts down cleanly on every path:
 *   - `qcow2fs unmount` (control request): unmount (refused while a file is open, unless lazy),
 *     wait for the kernel session to end, let in-flight requests finish, close every image,
 *     answer, exit 0;
 *   - SIGTERM / SIGINT / SIGHUP: the same, falling back to a lazy unmount when busy, and giving
 *     remaining users a grace period before the images are closed under them;
 *   - an external `umount` / `fusermount -u`: noticed when the session ends (see native.ts),
 *     then the same closing steps;
 *   - a crash: a last-moment lazy unmount in the 'exit' handler, so no dead mount stays behind.
 * Opening never modifies an image; when anything fails before the mount is live, everything
 * opened so far is closed again and the error is one line.
 */
import { execFileSync } from 'node:child_process'
import { readdir, realpath, stat, unlink } from 'node:fs/promises'
import { basename, resolve } from 'node:path'
import type { VirtualDisk } from '../disk.js'
import { describeError } from '../errors.js'
import { log } from '../log.js'
import { type FileTimes, type MountedRawFiles, type RawFileSource, assertDistinctNames, mountRawFiles } from './adapter.js'
import {
  type CompressionReport,
  ControlServer,
  type ControlReply,
  type ControlRequest,
  NoServerError,
  controlSocketPath,
  ensureRuntimeDir,
  removeIfEmpty,
  sendControlRequest,
  serverLogPath,
} from './control.js'
import { findMount, readMountTable } from './mountinfo.js'

export interface ServerOptions {
  /** Image paths as the user gave them. */
  imagePaths: string[]
  mountpoint: string
  allowOther: boolean
  /** Raw files keep their size: every size change fails with EPERM. */
  fixedSize?: boolean
  /** Opens one image (as the mount options say); rejects with a one-line error naming the problem. */
  openDisk: (imagePath: string) => Promise<VirtualDisk>
  /** How long signal-triggered shutdowns wait for users of a lazily detached mount, in ms. */
  signalGraceMs?: number
}

/** A failure before the mount is live; the message is one line for `qcow2fs: <message>`. */
export class MountFailure extends Error {
  override name = 'MountFailure'
}

const SIGNALS = ['SIGTERM', 'SIGINT', 'SIGHUP'] as const
const DEFAULT_SIGNAL_GRACE_MS = 5_000
/** An unmount that takes longer than this reports the progress of compressed writes... */
const PROGRESS_DELAY_MS = 1_000
/** ...this often. */
const PROGRESS_INTERVAL_MS = 250

/** The resolved mountpoint, or MountFailure when it cannot take a mount. */
export async function checkMountpoint(mountpoint: string): Promise<string> {
  const absolute = resolve(mountpoint)
  let real: string
  try {
    real = await realpath(absolute)
    const st = await stat(real)
    if (!st.isDirectory()) throw new MountFailure(`mountpoint '${mountpoint}' is not a directory`)
  } catch (err) {
    if (err instanceof MountFailure) throw err
    const code = (err as NodeJS.ErrnoException).code
    if (code === 'ENOENT') throw new MountFailure(`mountpoint '${mountpoint}' does not exist`)
    if (code === 'ENOTDIR') throw new MountFailure(`mountpoint '${mountpoint}' is not a directory`)
    if (code === 'ENOTCONN') {
      throw new MountFailure(`mountpoint '${mountpoint}' is a dead FUSE mount; clear it with 'fusermount -uz ${absolute}'`)
    }
    throw new MountFailure(`mountpoint '${mountpoint}': ${describeError(err)}`)
  }
  const existing = findMount(await readMountTable(), real)
  if (existing) {
    const hint = existing.fsType === 'fuse.qcow2fs' ? `; unmount it with 'qcow2fs unmount ${real}'` : ''
    throw new MountFailure(`mountpoint '${mountpoint}' is already a mount point (${existing.fsType})${hint}`)
  }
  if ((await readdir(real)).length > 0) throw new MountFailure(`mountpoint '${mountpoint}' is not empty`)
  return real
}

/** Claims the control socket path: refuses when a live server answers on it. */
async function claimSocket(socketPath: string, mountpoint: string): Promise<void> {
  try {
    const { reply, hangUp } = await sendControlRequest(socketPath, { op: 'status' }, 5_000)
    hangUp()
    const pid = reply.ok ? ` (pid ${reply.pid})` : ''
    throw new MountFailure(`a qcow2fs server${pid} still serves '${mountpoint}' (lazily unmounted, a file still open); wait for it to exit`)
  } catch (err) {
    if (!(err instanceof NoServerError)) throw err
  }
  await unlink(socketPath).catch((err: NodeJS.ErrnoException) => {
    if (err.code !== 'ENOENT') throw err
  })
}

async function fileTimes(imagePath: string): Promise<FileTimes | undefined> {
  try {
    const st = await stat(imagePath)
    return { atime: st.atime, mtime: st.mtime, ctime: st.ctime }
  } catch {
    return undefined
  }
}

function delay(ms: number): Promise<void> {
  return new Promise((done) => setTimeout(done, ms).unref())
}

export class MountServer {
  readonly mountpoint: string
  /** Absolute paths of the raw files. */
  readonly files: string[]
  /** Resolves with the exit code once the server has shut down (images closed, unmounted). */
  readonly done: Promise<number>
  private readonly mounted: MountedRawFiles
  private readonly disks: VirtualDisk[]
  private readonly control: ControlServer
  private readonly socketPath: string
  private readonly signalGraceMs: number
  private stopping: Promise<number> | undefined
  private finished = false
  private resolveDone!: (code: number) => void
  private readonly onSignal = (signal: NodeJS.Signals) => {
    log.server('received %s', signal)
    void this.stop(`signal ${signal}`)
  }
  private readonly onExit = () => this.lastResortUnmount()

  private constructor(init: {
    mountpoint: string
    mounted: MountedRawFiles
    disks: VirtualDisk[]
    control: ControlServer
    socketPath: string
    signalGraceMs: number
  }) {
    this.mountpoint = init.mountpoint
    this.mounted = init.mounted
    this.files = init.mounted.paths
    this.disks = init.disks
    this.control = init.control
    this.socketPath = init.socketPath
    this.signalGraceMs = init.signalGraceMs
    this.done = new Promise((done) => (this.resolveDone = done))
    for (const signal of SIGNALS) process.on(signal, this.onSignal)
    process.on('exit', this.onExit)
    void this.mounted.session.ended.then(() => {
      if (!this.stopping) log.server('%s was unmounted from outside', this.mountpoint)
      void this.stop('session ended')
    })
  }

  /** Starts a server; rejects with a one-line MountFailure, leaving nothing mounted or open. */
  static async start(opts: ServerOptions): Promise<MountServer> {
    const imagePaths = opts.imagePaths.map((p) => resolve(p))
    try {
      assertDistinctNames(imagePaths)
    } catch (err) {
      throw new MountFailure(describeError(err))
    }
    const mountpoint = await checkMountpoint(opts.mountpoint)
    let socketPath: string
    try {
      await ensureRuntimeDir()
      socketPath = controlSocketPath(mountpoint)
      await claimSocket(socketPath, mountpoint)
    } catch (err) {
      throw err instanceof MountFailure ? err : new MountFailure(`control socket: ${describeError(err)}`)
    }

    const disks: VirtualDisk[] = []
    const closeDisks = async () => {
      for (const disk of disks.splice(0).reverse()) await disk.close().catch(() => undefined)
    }
    let server: MountServer | undefined
    let control: ControlServer | undefined
    let mounted: MountedRawFiles | undefined
    try {
      const sources: RawFileSource[] = []
      for (const imagePath of imagePaths) {
        let disk: VirtualDisk
        try {
          disk = await opts.openDisk(imagePath)
        } catch (err) {
          const message = describeError(err)
          throw new MountFailure(message.includes(imagePath) || message.includes(basename(imagePath)) ? message : `'${imagePath}': ${message}`)
        }
        disks.push(disk)
        sources.push({ imagePath, disk, times: await fileTimes(imagePath) })
      }
      // Requests arriving before the server object exists are answered once it does.
      let ready: (s: MountServer) => void
      const serverReady = new Promise<MountServer>((done) => (ready = done))
      control = await ControlServer.listen(socketPath, async (request, progress) => (await serverReady).handle(request, progress))
      try {
        mounted = await mountRawFiles(mountpoint, sources, { allowOther: opts.allowOther, fixedSize: opts.fixedSize })
      } catch (err) {
        const hint = opts.allowOther && process.getuid?.() !== 0 ? " (allow_other needs 'user_allow_other' in /etc/fuse.conf)" : ''
        throw new MountFailure(`cannot mount on '${mountpoint}': ${describeError(err)}${hint}`)
      }
      server = new MountServer({
        mountpoint,
        mounted,
        disks,
        control,
        socketPath,
        signalGraceMs: opts.signalGraceMs ?? DEFAULT_SIGNAL_GRACE_MS,
      })
      ready!(server)
      log.server('serving %s: %o', mountpoint, server.files)
      return server
    } catch (err) {
      if (mounted && !server) {
        await mounted.session.unmount(true).catch(() => undefined)
        mounted.session.release()
      }
      await control?.close()
      await closeDisks()
      throw err
    }
  }

  private async handle(request: ControlRequest, progress: (report: CompressionReport[]) => void): Promise<ControlReply> {
    if (request.op === 'status') {
      return { ok: true, pid: process.pid, mountpoint: this.mountpoint, files: this.files }
    }
    if (!this.stopping) {
      try {
        await this.mounted.session.unmount(request.lazy)
      } catch (err) {
        const reason = describeError(err)
        if (/busy/i.test(reason)) {
          throw new Error(`'${this.mountpoint}' is busy (a file on it is open); close it, or use 'qcow2fs unmount --lazy'`)
        }
        throw new Error(`cannot unmount '${this.mountpoint}': ${reason}`)
      }
    }
    const stopReporting = this.reportProgress(progress)
    let code: number
    try {
      code = await this.stop('unmount request', { graceMs: request.lazy ? Infinity : this.signalGraceMs })
    } finally {
      stopReporting()
    }
    if (code !== 0) throw new Error(`'${this.mountpoint}' is unmounted, but closing an image failed (see the server log)`)
    const compression = this.compressionReport()
    return compression.length > 0 ? { ok: true, pid: process.pid, compression } : { ok: true, pid: process.pid }
  }

  /** Compressed-write counters of every image that has them. */
  private compressionReport(): CompressionReport[] {
    const report: CompressionReport[] = []
    for (const file of this.mounted.adapter.files) {
      const counters = file.disk.compressionProgress?.()
      if (counters) report.push({ image: basename(file.imagePath), ...counters })
    }
    return report
  }

  /**
   * While the images are being finished, sends the compressed-write counters after the first
   * second, then every PROGRESS_INTERVAL_MS. Returns the function that stops it.
   */
  private reportProgress(send: (report: CompressionReport[]) => void): () => void {
    let interval: NodeJS.Timeout | undefined
    const tick = () => {
      const report = this.compressionReport()
      if (report.length > 0) send(report)
    }
    const first = setTimeout(() => {
      tick()
      interval = setInterval(tick, PROGRESS_INTERVAL_MS)
    }, PROGRESS_DELAY_MS)
    return () => {
      clearTimeout(first)
      clearInterval(interval)
    }
  }

  /** Shuts down (once); resolves with the exit code. */
  stop(reason: string, opts: { graceMs?: number } = {}): Promise<number> {
    this.stopping ??= this.shutdown(reason, opts.graceMs ?? this.signalGraceMs)
    return this.stopping
  }

  private async shutdown(reason: string, graceMs: number): Promise<number> {
    log.server('stopping (%s)', reason)
    const { session, adapter } = this.mounted
    try {
      await session.unmount(false)
    } catch (err) {
      log.server('unmount refused (%s); detaching lazily', describeError(err))
      await session.unmount(true).catch((lazyErr: unknown) => log.server('lazy unmount failed: %s', describeError(lazyErr)))
    }
    // A lazily detached mount lives on until its last user closes the file.
    if (!session.hasEnded) {
      await (Number.isFinite(graceMs) ? Promise.race([session.ended, delay(graceMs)]) : session.ended)
      if (!session.hasEnded) log.server('users still hold files after %d ms; closing the images under them', graceMs)
    }
    await adapter.idle()
    let code = 0
    // Writes answered before they were stored, and not stored yet (a full disk): last try.
    for (const err of await adapter.settleAll()) {
      code = 1
      log.server('a write answered earlier could not be stored: %s', describeError(err))
    }
    for (const disk of this.disks) {
      try {
        await disk.close()
      } catch (err) {
        code = 1
        log.server('closing an image failed: %s', describeError(err))
      }
    }
    log.server('images closed')
    await removeIfEmpty(serverLogPath(this.mountpoint))
    session.release()
    this.finished = true
    for (const signal of SIGNALS) process.off(signal, this.onSignal)
    process.off('exit', this.onExit)
    // The unmount request that started this gets its answer before the socket closes.
    setImmediate(() => {
      void this.control.close().then(() => this.resolveDone(code))
    })
    return code
  }

  /** 'exit' without a finished shutdown (a crash): detach the mount so it is not left dead. */
  private lastResortUnmount(): void {
    if (this.finished) return
    try {
      execFileSync('fusermount', ['-uz', this.mountpoint], { stdio: 'ignore', timeout: 10_000 })
    } catch {
      // Nothing else can be done while exiting.
    }
  }
}

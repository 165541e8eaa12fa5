/*
 * BlockFile: positioned I/O on a host file. With image-lock.ts (QEMU's image locks, taken when
 * a file is opened) this is the only code of the engine that touches node:fs. Calls are
 * synchronous on purpose: measured on our target machine, synchronous reads through the FUSE
 * binding beat the thread-pool round trip of async fs calls for sequential I/O, and the
 * engine's read path is CPU-light between I/Os.
 */
import * as fs from 'node:fs'
import { NotFoundError } from '../errors.js'
import { log } from '../log.js'
import { type FileExtent, fileExtentAt } from './file-extents.js'
import { type LockMode, lockImageFile } from './image-lock.js'
import { ReadAhead, type ReadAheadFileIo, type ReadAheadStats, openReadAheadIo, readAheadCalls } from './read-ahead.js'
import { EarlyWriteback, writebackCalls } from './writeback.js'

export type { LockMode } from './image-lock.js'

/**
 * What a write is for. Recording and fault-injecting file layers in the tests use it to check
 * the metadata write ordering (the counterpart of QEMU's blkdebug events).
 */
export type WriteTag = 'data' | 'cow' | 'l2' | 'l1' | 'refblock' | 'reftable' | 'header' | 'compressed'

export interface BlockFile {
  /** The path the file was opened with (for messages). */
  readonly path: string
  /** Size of the file in bytes, as of open (kept current by this process's own writes). */
  readonly size: number
  /** False when opened read-only: pwrite/truncate/sync throw. */
  readonly writable: boolean
  /** Reads up to buf.length bytes at hostOffset; returns the bytes read (short only at EOF). */
  pread(buf: Uint8Array, hostOffset: number): number
  /** Writes all of buf at hostOffset, growing the file if needed. */
  pwrite(buf: Uint8Array, hostOffset: number, tag: WriteTag): void
  /** Makes every completed write durable (fdatasync). */
  sync(): void
  /** Sets the file length. */
  truncate(size: number): void
  /** Bytes the file occupies on the host (allocated blocks), for `info`. */
  allocatedBytes(): number
  /**
   * Whether the file holds data or a hole at hostOffset, and up to where (lib/io/file-extents.ts);
   * undefined (or absent) when that cannot be asked. For `map`.
   */
  extentAt?(hostOffset: number): FileExtent | undefined
  /**
   * A promise that settles once bytes of [hostOffset, hostOffset + length) that are being read
   * ahead (lib/io/read-ahead.ts) have arrived; undefined (or absent) when there is nothing to
   * wait for. A reader that can wait does so before pread, which then copies those bytes
   * instead of reading them from the disk again.
   */
  whenReadable?(hostOffset: number, length: number): Promise<void> | undefined
  close(): void
}


export interface OpenFileOptions {
  readOnly: boolean
  /**
   * QEMU's image lock taken with the file (lib/io/image-lock.ts), released by close: 'write'
   * for an image written, 'read' for one only read. Default: 'write' unless readOnly.
   */
  lock?: LockMode
  /**
   * Read ahead when reads run sequentially (lib/io/read-ahead.ts). Only a read-only open
   * does: nothing may write the file while chunks of it are held.
   */
  readAhead?: boolean
}

export class NodeBlockFile implements BlockFile {
  readonly path: string
  readonly writable: boolean
  #fd: number
  #size: number
  #syncFailure: unknown
  /** Starts writeback of long sequential writes early (writeback.ts); writable files only. */
  #writeback: EarlyWriteback | undefined
  /** Reads ahead of sequential reads (read-ahead.ts); read-only files only. */
  #readAhead: ReadAhead | undefined
  /** How the read-ahead reads (its own descriptors, closed once its last read has ended). */
  #readAheadIo: ReadAheadFileIo | undefined
  readonly #preadDirect = (buf: Uint8Array, hostOffset: number): number => this.#preadFd(buf, hostOffset)

  private constructor(path: string, fd: number, size: number, writable: boolean) {
    this.path = path
    this.#fd = fd
    this.#size = size
    this.writable = writable
    const calls = writable ? writebackCalls() : null
    if (calls) this.#writeback = new EarlyWriteback(fd, calls)
  }

  /**
   * Opens path and takes its lock; a missing file becomes NotFoundError naming it, a file in
   * use BusyError. Never creates or truncates; a failed open leaves no descriptor or lock.
   */
  static open(path: string, options: OpenFileOptions): NodeBlockFile {
    let fd: number
    try {
      fd = fs.openSync(path, options.readOnly ? 'r' : 'r+')
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code
      if (code === 'ENOENT') throw new NotFoundError(`'${path}': no such file`, { cause: err })
      throw err
    }
    try {
      const stat = fs.fstatSync(fd)
      if (stat.isDirectory()) throw new NotFoundError(`'${path}' is a directory, not an image file`)
      lockImageFile(fd, path, options.lock ?? (options.readOnly ? 'read' : 'write'))
      const file = new NodeBlockFile(path, fd, stat.size, !options.readOnly)
      if (options.readOnly && options.readAhead) file.#startReadAhead()
      return file
    } catch (err) {
      // Closing the descriptor also drops any lock byte taken before the failure.
      fs.closeSync(fd)
      throw err
    }
  }

  get size(): number {
    return this.#size
  }

  pread(buf: Uint8Array, hostOffset: number): number {
    if (this.#readAhead) return this.#readAhead.read(buf, hostOffset, this.#preadDirect)
    return this.#preadFd(buf, hostOffset)
  }

  whenReadable(hostOffset: number, length: number): Promise<void> | undefined {
    return this.#readAhead?.whenReadable(hostOffset, length)
  }

  /** Whether this file reads ahead (for tests and logs). */
  get readsAhead(): boolean {
    return this.#readAhead !== undefined
  }

  /** What the read-ahead did so far; undefined without one. */
  readAheadStats(): ReadAheadStats | undefined {
    return this.#readAhead?.stats()
  }

  /** Gives the file a read-ahead, where the addon is built and the file takes O_DIRECT. */
  #startReadAhead(): void {
    const calls = readAheadCalls()
    const io = calls ? openReadAheadIo(this.#fd, this.path, calls) : undefined
    if (io === undefined) return
    this.#readAhead = new ReadAhead(io, this.#size)
    this.#readAheadIo = io
  }

  #preadFd(buf: Uint8Array, hostOffset: number): number {
    let done = 0
    while (done < buf.length) {
      const n = fs.readSync(this.#fd, buf, done, buf.length - done, hostOffset + done)
      if (n === 0) break
      done += n
    }
    return done
  }

  pwrite(buf: Uint8Array, hostOffset: number, _tag: WriteTag): void {
    let done = 0
    while (done < buf.length) {
      done += fs.writeSync(this.#fd, buf, done, buf.length - done, hostOffset + done)
    }
    if (hostOffset + buf.length > this.#size) this.#size = hostOffset + buf.length
    this.#writeback?.wrote(hostOffset, buf.length)
  }

  sync(): void {
    if (this.#syncFailure) throw this.#syncFailure
    try {
      fs.fdatasyncSync(this.#fd)
    } catch (err) {
      this.recordSyncFailure(err)
    }
  }

  /**
   * Remembers a failed fdatasync and throws it; every later sync() throws it again. After a
   * writeback error the kernel may have dropped the dirty pages it could not write, and a later
   * fdatasync can succeed without them: only a sticky failure keeps fsync from ever reporting
   * lost data as durable. Reopening the image is the way out.
   */
  recordSyncFailure(err: unknown): never {
    this.#syncFailure = err
    throw err
  }

  truncate(size: number): void {
    fs.ftruncateSync(this.#fd, size)
    this.#size = size
  }

  allocatedBytes(): number {
    return fs.fstatSync(this.#fd).blocks * 512
  }

  extentAt(hostOffset: number): FileExtent | undefined {
    return fileExtentAt(this.#fd, hostOffset)
  }

  close(): void {
    if (this.#fd >= 0) {
      this.#writeback?.close()
      if (this.#readAhead !== undefined) {
        const io = this.#readAheadIo!
        const stats = this.#readAhead.stats()
        log.io(
          '%s: read ahead %d chunks, served %d bytes from them (%d reads waited), dropped %d unserved, left %d to the page cache',
          this.path,
          stats.chunksRead,
          stats.bytesServed,
          stats.waits,
          stats.chunksDropped,
          stats.chunksCached,
        )
        this.#readAhead.close(() => io.close())
        this.#readAhead = undefined
      }
      fs.closeSync(this.#fd)
      this.#fd = -1
    }
  }
}

/** Real path of a file, or the path itself if it cannot be resolved (for loop detection). */
export function realPathOf(path: string): string {
  try {
    return fs.realpathSync(path)
  } catch {
    return path
  }
}

/** True if the file exists (any type). */
export function fileExists(path: string): boolean {
  return fs.existsSync(path)
}

/*
 * Read-ahead of a host file that nothing writes: the image file, data file and backing files
 * of an image opened read-only (OpenOptions.readAhead; the mount asks for it).
 *
 * Why: the engine reads the image file synchronously, one FUSE request (at most 128 KiB) at a
 * time, on the thread that answers FUSE. Reading a cold image, that thread waits for the disk
 * on every request, and the page cache work of each buffered read is done there too. Measured
 * on a 2-CPU virtual machine with fio after dropping caches, the same commands alternated:
 * buffered 128 KiB reads of a 1 GiB image ran at 870-1010 MB/s, O_DIRECT 1 MiB reads with 4 in
 * flight at 1060-1520 MB/s, with almost no CPU time since the device writes into the buffer.
 *
 * How: once reads of the file run sequentially, it is read in READ_AHEAD_CHUNK_BYTES pieces
 * (aligned on their size) up to READ_AHEAD_CHUNKS_AHEAD chunks past the latest read, with
 * O_DIRECT on libuv's thread pool (lib/io/native/read_ahead.c), into buffers kept for reuse. A
 * read whose bytes a chunk holds is served by copying them from it; a chunk goes once every
 * byte of it has been served. A read that finds its bytes still on their way can wait for them
 * (whenReadable) instead of reading them a second time. Ranges the page cache already holds
 * are not read ahead: there the file's own reads cost one copy and a chunk two, and O_DIRECT
 * would fetch from the disk what memory has.
 *
 * FUSE hands requests over partly out of order (10-22% of the 128 KiB requests of a
 * sequential dd do not start where the previous one ended: docs/PERFORMANCE.md), so "runs
 * sequentially" is loose on purpose: a read continues a stream when it starts within a chunk's
 * length of where one of the last RECENT_READS reads ended, or is served from a chunk. Chunks
 * are never read twice because of that disorder: a chunk served whole is remembered for a
 * while and not read again, and chunks are dropped before being served whole only when more
 * than twice READ_AHEAD_CHUNKS_AHEAD would be held, and then only those behind the latest
 * read. Random reads never continue a stream, so they cost a few comparisons.
 *
 * Nothing here is needed for correctness: a read that finds no chunk reads the file itself,
 * and a chunk whose read failed is dropped (the read that wanted it then reads the file and
 * meets the error itself).
 */
import * as fs from 'node:fs'
import { getSystemErrorName } from 'node:util'
import { log } from '../log.js'
import { optionalIoAddon } from './native-addon.js'

/** Bytes read ahead at a time (and the alignment of every read-ahead read). */
export const READ_AHEAD_CHUNK_BYTES = 1024 * 1024
/** Chunks kept read, or being read, past the latest read of a stream. */
export const READ_AHEAD_CHUNKS_AHEAD = 4
/** How many of the latest reads a read may continue. */
const RECENT_READS = 4
/** Reads in a row that must continue a recent one before chunks are read ahead. */
const MIN_SEQUENTIAL_READS = 2
/** How many chunks served whole or found cached are remembered (and not read ahead again). */
const REMEMBERED_CHUNKS = 4 * READ_AHEAD_CHUNKS_AHEAD

/** How the read-ahead reads the file. */
export interface ReadAheadIo {
  /** Reads up to buf.length bytes at hostOffset; resolves with the count (short only at EOF). */
  read(buf: Uint8Array, hostOffset: number): Promise<number>
  /** A buffer of `bytes` bytes that read() accepts (aligned, for O_DIRECT). */
  allocate(bytes: number): Uint8Array
  /**
   * Whether the page cache holds all of the range: then the file's own reads are cheaper than
   * a read ahead (one copy instead of two), and nothing is read ahead there.
   */
  cached?(hostOffset: number, length: number): boolean
}

export interface ReadAheadOptions {
  chunkBytes?: number
  chunksAhead?: number
}

interface Chunk {
  readonly index: number
  readonly buf: Uint8Array
  /** Bytes the read returned; meaningful once ready. */
  length: number
  ready: boolean
  /** Resolves when the read has settled, either way. */
  readonly settled: Promise<void>
  /** Bytes copied out so far; the chunk goes once they cover its length. */
  servedBytes: number
}

export interface ReadAheadStats {
  /** Chunks read ahead, and bytes of reads served from them. */
  chunksRead: number
  bytesServed: number
  /** Chunks dropped before every byte was served. */
  chunksDropped: number
  /** Chunks not read ahead because the page cache held them. */
  chunksCached: number
  /** Reads that had to wait for a chunk on its way (whenReadable answered a promise). */
  waits: number
}

export class ReadAhead {
  readonly #io: ReadAheadIo
  readonly #fileSize: number
  readonly #chunkBytes: number
  readonly #chunksAhead: number
  readonly #maxChunks: number
  readonly #chunks = new Map<number, Chunk>()
  readonly #spareBuffers: Uint8Array[] = []
  /** Ends of the latest reads, newest last. */
  readonly #recentEnds: number[] = []
  /** Indexes of chunks not to read ahead again: lately served whole, or found cached. Oldest first. */
  readonly #leaveAlone: number[] = []
  #sequentialReads = 0
  #inFlight = 0
  #closed = false
  #onIdle: (() => void) | undefined
  #stats: ReadAheadStats = { chunksRead: 0, bytesServed: 0, chunksDropped: 0, chunksCached: 0, waits: 0 }

  /** fileSize: the file's length, which must not change while this reads it. */
  constructor(io: ReadAheadIo, fileSize: number, options: ReadAheadOptions = {}) {
    this.#io = io
    this.#fileSize = fileSize
    this.#chunkBytes = options.chunkBytes ?? READ_AHEAD_CHUNK_BYTES
    this.#chunksAhead = options.chunksAhead ?? READ_AHEAD_CHUNKS_AHEAD
    // Chunks held at most, for all streams of the file together (their memory is kept for reuse).
    this.#maxChunks = 2 * this.#chunksAhead
    if (!(this.#chunkBytes > 0 && this.#chunksAhead > 0)) throw new RangeError('read-ahead needs a chunk size and a depth')
  }

  /**
   * Fills buf with the file's bytes at hostOffset: from chunks read ahead where they hold
   * them, the rest through readDirect (the file's own synchronous read). Returns the bytes
   * read, short only at the end of the file, and reads further ahead when reads run
   * sequentially.
   */
  read(buf: Uint8Array, hostOffset: number, readDirect: (buf: Uint8Array, hostOffset: number) => number): number {
    let done = 0
    let hit = false
    while (done < buf.length) {
      const position = hostOffset + done
      const index = Math.floor(position / this.#chunkBytes)
      const inChunk = position - index * this.#chunkBytes
      const wanted = Math.min(buf.length - done, this.#chunkBytes - inChunk)
      const chunk = this.#chunks.get(index)
      if (chunk !== undefined && chunk.ready && inChunk < chunk.length) {
        const n = Math.min(wanted, chunk.length - inChunk)
        buf.set(chunk.buf.subarray(inChunk, inChunk + n), done)
        this.#served(chunk, n)
        hit = true
        done += n
        continue
      }
      const n = readDirect(buf.subarray(done, done + wanted), position)
      done += n
      if (n < wanted) break
    }
    if (!this.#closed) this.#follow(hostOffset, hostOffset + done, hit)
    return done
  }

  /**
   * A promise that settles once no chunk holding part of [hostOffset, hostOffset + length) is
   * still being read; undefined when none is. Waiting for it before read() takes those bytes
   * from the chunks instead of reading them twice.
   */
  whenReadable(hostOffset: number, length: number): Promise<void> | undefined {
    if (this.#inFlight === 0 || length <= 0) return undefined
    const first = Math.floor(hostOffset / this.#chunkBytes)
    const last = Math.floor((hostOffset + length - 1) / this.#chunkBytes)
    let pending: Promise<void>[] | undefined
    for (let index = first; index <= last; index++) {
      const chunk = this.#chunks.get(index)
      if (chunk !== undefined && !chunk.ready) (pending ??= []).push(chunk.settled)
    }
    if (pending === undefined) return undefined
    this.#stats.waits++
    return pending.length === 1 ? pending[0] : Promise.all(pending).then(() => undefined)
  }

  /** Counters for tests and logs. */
  stats(): ReadAheadStats {
    return { ...this.#stats }
  }

  /** Chunks held or being read (for tests). */
  chunkIndexes(): number[] {
    return [...this.#chunks.keys()].sort((a, b) => a - b)
  }

  /**
   * Stops reading ahead and drops every chunk. onIdle runs once no read-ahead read is running
   * any more (at once when none is): the file must stay open until then.
   */
  close(onIdle: () => void): void {
    this.#closed = true
    for (const chunk of this.#chunks.values()) if (chunk.ready) this.#chunks.delete(chunk.index)
    this.#spareBuffers.length = 0
    if (this.#inFlight === 0) onIdle()
    else this.#onIdle = onIdle
  }

  /** Updates what is known of the streams after a read of [start, end); may read ahead. */
  #follow(start: number, end: number, hit: boolean): void {
    const continues = hit || this.#recentEnds.some((e) => start >= e - this.#chunkBytes && start <= e + this.#chunkBytes)
    this.#recentEnds.push(end)
    if (this.#recentEnds.length > RECENT_READS) this.#recentEnds.shift()
    this.#sequentialReads = continues ? this.#sequentialReads + 1 : 0
    if (this.#sequentialReads < MIN_SEQUENTIAL_READS) return
    const first = Math.floor(end / this.#chunkBytes)
    const chunkCount = Math.ceil(this.#fileSize / this.#chunkBytes)
    const until = Math.min(first + this.#chunksAhead, chunkCount)
    for (let index = first; index < until; index++) {
      if (this.#chunks.has(index) || this.#leaveAlone.includes(index)) continue
      if (this.#io.cached?.(index * this.#chunkBytes, this.#chunkBytes)) {
        this.#stats.chunksCached++
        this.#remember(index)
        continue
      }
      if (this.#chunks.size >= this.#maxChunks && !this.#dropOneBehind(first)) return
      this.#start(index)
    }
  }

  /** Drops the ready chunk with the lowest index below `first`; false when there is none. */
  #dropOneBehind(first: number): boolean {
    let lowest: Chunk | undefined
    for (const chunk of this.#chunks.values()) {
      if (chunk.ready && chunk.index < first && (lowest === undefined || chunk.index < lowest.index)) lowest = chunk
    }
    if (lowest === undefined) return false
    this.#stats.chunksDropped++
    this.#release(lowest)
    return true
  }

  #start(index: number): void {
    const buf = this.#spareBuffers.pop() ?? this.#io.allocate(this.#chunkBytes)
    const hostOffset = index * this.#chunkBytes
    let chunk!: Chunk
    const settled = this.#io.read(buf, hostOffset).then(
      (n) => {
        chunk.length = n
        chunk.ready = true
        if (this.#closed) this.#chunks.delete(index)
      },
      (err: unknown) => {
        log.io('read-ahead of %d bytes at %d failed: %s', buf.length, hostOffset, (err as Error).message)
        this.#chunks.delete(index)
      },
    )
    chunk = { index, buf, length: 0, ready: false, settled: settled.finally(() => this.#settle()), servedBytes: 0 }
    this.#chunks.set(index, chunk)
    this.#inFlight++
    this.#stats.chunksRead++
  }

  #settle(): void {
    this.#inFlight--
    if (this.#inFlight === 0 && this.#onIdle !== undefined) {
      const onIdle = this.#onIdle
      this.#onIdle = undefined
      onIdle()
    }
  }

  #served(chunk: Chunk, bytes: number): void {
    this.#stats.bytesServed += bytes
    chunk.servedBytes += bytes
    if (chunk.servedBytes < chunk.length) return
    this.#remember(chunk.index)
    this.#release(chunk)
  }

  #remember(index: number): void {
    this.#leaveAlone.push(index)
    if (this.#leaveAlone.length > REMEMBERED_CHUNKS) this.#leaveAlone.shift()
  }

  #release(chunk: Chunk): void {
    this.#chunks.delete(chunk.index)
    if (this.#spareBuffers.length < this.#maxChunks) this.#spareBuffers.push(chunk.buf)
  }
}

/** The addon's calls (lib/io/native/read_ahead.c). */
export interface ReadAheadCalls {
  /** A buffer whose memory is aligned for O_DIRECT. */
  alloc(bytes: number): Uint8Array
  /** Whether the page cache holds all of [hostOffset, hostOffset + length) of fd. */
  cached(fd: number, hostOffset: number, length: number): boolean
  /** Reads buf.length bytes at hostOffset of fd (O_DIRECT) on the thread pool; done(errno, bytes) runs afterwards. */
  read(fd: number, buf: Uint8Array, hostOffset: number, done: (errno: number, bytes: number) => void): void
}

/** The addon, or null when it is not built (files then do not read ahead). */
export const readAheadCalls = optionalIoAddon<ReadAheadCalls>('read_ahead', 'no read-ahead')

/** A ReadAheadIo on a descriptor of its own, which close() closes. */
export interface ReadAheadFileIo extends ReadAheadIo {
  close(): void
}

/**
 * How a read-ahead reads the file open as `fd`: with O_DIRECT, through a descriptor of its
 * own on the same file, and asking `fd` what the page cache holds. Its own because a read may
 * still be running on the thread pool when the file is closed: it is closed once that read
 * has ended (ReadAhead.close), while `fd`, which holds the image lock, closes at once.
 * Undefined when the file system refuses O_DIRECT (tmpfs, say): a file it keeps in memory
 * gains nothing from reading ahead.
 */
export function openReadAheadIo(fd: number, path: string, calls: ReadAheadCalls): ReadAheadFileIo | undefined {
  let directFd: number
  try {
    // /proc/self/fd/N opens the very file `fd` has open, even if its path has changed since.
    directFd = fs.openSync(`/proc/self/fd/${fd}`, fs.constants.O_RDONLY | fs.constants.O_DIRECT)
  } catch (err) {
    log.io('%s: no read-ahead without O_DIRECT: %s', path, (err as Error).message)
    return undefined
  }
  return {
    read: (buf, hostOffset) =>
      new Promise((resolve, reject) => {
        calls.read(directFd, buf, hostOffset, (errno, bytes) => {
          if (errno === 0) resolve(bytes)
          else reject(new Error(`read-ahead read failed: ${getSystemErrorName(-errno)}`))
        })
      }),
    cached: (hostOffset, length) => calls.cached(fd, hostOffset, length),
    allocate: (bytes) => calls.alloc(bytes),
    close: () => fs.closeSync(directFd),
  }
}

/*
 * Compressed writes (the `compress` mount option; docs/COMPRESSION.md). The write path offers
 * every piece of a write to route() (lib/engine/write-path.ts, WriteRouter) before handling it
 * itself. Per guest cluster:
 *
 *  - Routing (CW-1 to CW-5). A write covering a whole fresh cluster (no host offset) is
 *    copied and queued for compression. A write to an allocated or compressed cluster is left
 *    to the normal path (CW-2: it succeeds, never EIO; a compressed cluster is rewritten by
 *    decompress-merge-rewrite, CW-9). A whole-cluster write of zeros is left to the normal path
 *    too, which keeps zero clusters zero clusters (CW-5).
 *  - Staging. A partial write to a fresh cluster (dd bs=4k, a file system's small writes) goes
 *    into a cluster-sized staging buffer (staging.ts) until the written ranges cover the
 *    cluster; then the cluster is queued. At the staging bound (the oldest staged cluster), on
 *    fsync and at unmount, an incomplete cluster is completed with what a read returns there
 *    (backing data or zeros; zeros past the end of the disk, CW-6) and queued. Zero writes from
 *    the engine itself (a resize making a range read as zeros) over ranges of a staged cluster
 *    that already read as zeros change nothing, so appending writes (each grows the disk) do not
 *    complete a cluster early. A write to a cluster whose compression is under way puts the
 *    cluster back into staging, complete (it is compressed again at the bound or on fsync).
 *  - Compression runs on worker threads, one per core (compressor.ts), several clusters
 *    at once. Results are committed in queue order, each in one synchronous section under the
 *    image lock: host bytes from the packer (packer.ts, PK-1 to PK-5), the compressed bytes into
 *    the compressed-write cache (compressed-cache.ts, WC-1 to WC-22), the L2 entry (CW-10:
 *    allocation and cache insertion together, in host-offset order). Data that does not shrink
 *    is written as a normal cluster (CW-4); an all-zero cluster takes the zero path. Finished
 *    host clusters are flushed right after the commit that finished them (WC-6).
 *  - Reads see everything: staged bytes and queued clusters are laid over what the image
 *    returns (overlay()), and the read path lays cached compressed bytes over the file's
 *    (CompressedBytesOverlay, WC-13).
 *  - A write returns once its data is staged or queued; at most `maxJobs` clusters wait for
 *    compression, then writes wait for room (admit()). drain() (fsync, unmount) completes
 *    every staged cluster and waits until everything queued so far is committed; the image
 *    then flushes the cache (flushCache()) and the metadata, in that order.
 *  - Errors are sticky (WC-12): once a commit or a cache flush failed, data the writes were
 *    promised is lost, so every later write, fsync and the unmount fail with that error.
 */
import { availableParallelism } from 'node:os'
import { describeError } from '../../errors.js'
import type { Geometry } from '../../format/geometry.js'
import { log } from '../../log.js'
import type { Refcounts } from '../../meta/refcounts.js'
import type { RoutedChunk, WritePath, WriteRouter } from '../write-path.js'
import { isAllZero } from '../write-path.js'
import { type CacheStats, CompressedWriteCache } from './compressed-cache.js'
import { type ClusterCompressor, type DeflateChoice, makeCompressor } from './compressor.js'
import { Packer } from './packer.js'
import { Staging } from './staging.js'
import { SharedBufferPool } from './worker-pool.js'

/** Default bound of the staging memory: 64 MiB (`compress-staging=BYTES`). */
export const DEFAULT_STAGING_BYTES = 64 * 1024 * 1024
/** Clusters waiting for compression per core before writes wait. */
const JOBS_PER_CORE = 4

export interface CompressOptions {
  /** Bound of the staging memory in bytes; 0: partial writes to fresh clusters are not staged. */
  stagingBytes?: number
  /** Clusters queued for compression at most before a write waits (default 4 per core). */
  maxJobs?: number
  /** The compressor (default: the image's compression type, on every core). */
  compressor?: ClusterCompressor
  /** Which deflate the default compressor uses for zlib images (compressor.ts). */
  deflate?: DeflateChoice
}

/** What the pipeline needs from the image. */
export interface PipelineHost {
  geometry: Geometry
  compressionType: number
  refcounts: Refcounts
  virtualSize(): number
  /** What a read of the image returns now, leaving staged and queued data out. */
  readCommitted(buf: Uint8Array, guestOffset: number): void
  /** Runs a synchronous section under the image lock, with the write path. */
  mutate(section: (writePath: WritePath) => void): Promise<void>
  /**
   * Runs the section at once and returns true when the image lock is free; returns false and
   * does nothing when it is held. Throws what the section throws.
   */
  mutateNow(section: (writePath: WritePath) => void): boolean
  /** Writes compressed bytes into the image file (synchronously; through the overlap check). */
  writeCompressed(buf: Uint8Array, hostOffset: number): void
}

export interface CompressStats {
  /** Clusters stored compressed, stored as normal clusters (did not shrink), as zeros. */
  compressedClusters: number
  uncompressedClusters: number
  zeroClusters: number
  /** Guest bytes of the compressed and uncompressed clusters, and the host bytes they take. */
  guestBytes: number
  storedBytes: number
  /** Clusters staged, and queued for compression, now. */
  stagedClusters: number
  queuedClusters: number
  cache: CacheStats
}

interface Job {
  index: number
  data: Uint8Array
  /** All zeros: no compression, the zero path. */
  zero: boolean
  done: boolean
  /** Superseded (written again while compressing) or discarded: not committed. */
  cancelled: boolean
  result?: Uint8Array | undefined
  failure?: unknown
  settled: Promise<void>
  settle: () => void
}


export class CompressedWrites implements WriteRouter {
  readonly cache: CompressedWriteCache
  readonly packer: Packer
  readonly staging: Staging
  #host: PipelineHost
  #g: Geometry
  #compressor: ClusterCompressor
  #maxJobs: number
  #queue: Job[] = []
  /** The latest queued, not cancelled job of each guest cluster. */
  #pending = new Map<number, Job>()
  #pumping = false
  /** The commit section in progress (its jobs have left the queue). */
  #committing: Promise<void> = Promise.resolve()
  #roomWaiters: (() => void)[] = []
  #error: unknown
  /**
   * The cluster buffers of staged and queued clusters: shared memory, which the compression
   * workers read in place (worker-pool.ts), recycled once a job is committed.
   */
  #buffers: SharedBufferPool
  #stats = { compressedClusters: 0, uncompressedClusters: 0, zeroClusters: 0, guestBytes: 0, storedBytes: 0 }

  constructor(host: PipelineHost, options: CompressOptions = {}) {
    this.#host = host
    this.#g = host.geometry
    this.#compressor = options.compressor ?? makeCompressor(host.compressionType, undefined, options.deflate)
    this.#maxJobs = Math.max(1, options.maxJobs ?? JOBS_PER_CORE * availableParallelism())
    this.#buffers = new SharedBufferPool(this.#g.clusterSize, 2 * this.#maxJobs)
    this.staging = new Staging(this.#g.clusterSize, options.stagingBytes ?? DEFAULT_STAGING_BYTES, () => this.#buffers.takeZeroed())
    this.cache = new CompressedWriteCache(this.#g.clusterSize, (buf, hostOffset) => host.writeCompressed(buf, hostOffset))
    this.packer = new Packer(this.#g, host.refcounts)
    host.refcounts.onFreed = (cluster) => this.#hostClusterFreed(cluster)
  }

  /** The first error that lost data, once there is one (sticky). */
  get error(): unknown {
    return this.#error
  }

  /** True when nothing is staged, queued or cached. */
  get idle(): boolean {
    return this.staging.count === 0 && this.#queue.length === 0 && this.cache.size === 0
  }

  stats(): CompressStats {
    return { ...this.#stats, stagedClusters: this.staging.count, queuedClusters: this.#queue.length, cache: this.cache.stats() }
  }

  // ---- routing (synchronous, inside the write path's section) ----

  route(piece: RoutedChunk): boolean {
    const cs = this.#g.clusterSize
    const index = piece.clusterGuestOffset / cs
    const start = piece.offsetInCluster
    const end = start + piece.chunk.length
    const job = this.#pending.get(index)
    if (job) {
      // Written again while compressing: that result is stale; the cluster, complete, goes back.
      this.#cancel(job)
      const data = this.#copyOf(job.data)
      if (piece.zeroing) data.fill(0, start, end)
      else data.set(piece.chunk, start)
      if (this.staging.maxClusters === 0) {
        this.#submit(index, data)
      } else {
        this.#makeRoom()
        this.staging.add(index, data)
      }
      return true
    }
    const staged = this.staging.get(index)
    if (staged) {
      const wasComplete = staged.complete
      if (piece.zeroing) {
        // The engine's own zeroing of a range that already reads as zeros changes nothing.
        if (staged.unfilled(start, end) && piece.readsZero()) return true
        staged.fillZeros(start, end)
      } else {
        staged.fill(start, piece.chunk)
      }
      if (staged.complete && !wasComplete) {
        this.staging.remove(index)
        this.#submit(index, staged.data)
      }
      return true
    }
    if (!piece.fresh || piece.zeroing) return false
    if (start === 0 && end === cs) {
      if (isAllZero(piece.chunk)) {
        // The normal path keeps it a zero (or unallocated) cluster (CW-5); counted as one.
        this.#stats.zeroClusters++
        return false
      }
      this.#submit(index, this.#copyOf(piece.chunk), false)
      return true
    }
    if (this.staging.maxClusters === 0) return false
    this.#makeRoom()
    this.staging.add(index).fill(start, piece.chunk)
    return true
  }

  discard(firstCluster: number, endCluster: number): void {
    for (const index of this.staging.indexes()) if (index >= firstCluster && index < endCluster) this.staging.remove(index)
    for (const [index, job] of [...this.#pending]) if (index >= firstCluster && index < endCluster) this.#cancel(job)
  }

  /** Lays staged and queued data of [guestOffset, +buf.length) over buf (what the image read). */
  overlay(buf: Uint8Array, guestOffset: number): void {
    if (this.#pending.size === 0 && this.staging.count === 0) return
    const cs = this.#g.clusterSize
    const end = guestOffset + buf.length
    for (let cluster = guestOffset - (guestOffset % cs); cluster < end; cluster += cs) {
      const from = Math.max(guestOffset, cluster)
      const to = Math.min(end, cluster + cs)
      const out = buf.subarray(from - guestOffset, to - guestOffset)
      const job = this.#pending.get(cluster / cs)
      if (job) {
        out.set(job.data.subarray(from - cluster, to - cluster))
        continue
      }
      this.staging.get(cluster / cs)?.overlay(out, from - cluster)
    }
  }

  // ---- the queue ----

  /**
   * True when a write may go on at once: room in the queue and no sticky error (a write that
   * finds false waits in admit(), which also reports the error).
   */
  get admitsNow(): boolean {
    return this.#error === undefined && this.#queue.length < this.#maxJobs
  }

  /** Resolves when a write may go on (room in the queue); rejects with the sticky error. */
  async admit(): Promise<void> {
    for (;;) {
      this.#throwIfFailed()
      if (this.#queue.length < this.#maxJobs) return
      await new Promise<void>((wake) => this.#roomWaiters.push(wake))
    }
  }

  /**
   * Completes every staged cluster and waits until everything queued until then is committed
   * (fsync, unmount). Rejects with the sticky error.
   */
  async drain(): Promise<void> {
    this.#throwIfFailed()
    if (this.staging.count > 0) {
      await this.#host.mutate(() => {
        for (const index of this.staging.indexes()) this.#completeAndSubmit(index)
      })
    }
    const last = this.#queue[this.#queue.length - 1]
    if (last) await last.settled
    else await this.#committing
    this.#throwIfFailed()
  }

  /**
   * Writes every cached compressed byte (finished host clusters padded, the unfinished one
   * exactly): the first step of a metadata flush, so no L2 entry reaches the disk before its
   * data (O1). Synchronous; throws the sticky error.
   */
  flushCache(): void {
    this.#throwIfFailed()
    try {
      void this.cache.flush(true)
    } catch (err) {
      this.#fail(err)
      throw err
    }
  }

  /** Stops the compressor's threads. The caller drained first. */
  async close(): Promise<void> {
    for (const job of this.#queue) job.cancelled = true
    await this.#compressor.close()
  }

  #makeRoom(): void {
    while (this.staging.full) {
      const oldest = this.staging.oldest()
      if (!oldest) return
      this.#completeAndSubmit(oldest.index)
    }
  }

  /** Fills what was not written with what a read returns there (zeros past the disk's end). */
  #completeAndSubmit(index: number): void {
    const staged = this.staging.remove(index)
    if (!staged) return
    const cs = this.#g.clusterSize
    const guest = index * cs
    const inside = Math.max(0, Math.min(cs, this.#host.virtualSize() - guest))
    for (const [start, end] of staged.gaps()) {
      const readEnd = Math.min(end, Math.max(start, inside))
      if (readEnd > start) this.#host.readCommitted(staged.data.subarray(start, readEnd), guest + start)
      if (end > readEnd) staged.data.fill(0, readEnd, end)
    }
    this.#submit(index, staged.data)
  }

  /** Queues the cluster; `zero` when the caller already knows whether it is all zeros. */
  #submit(index: number, data: Uint8Array, zero = isAllZero(data)): void {
    let settle!: () => void
    const settled = new Promise<void>((done) => (settle = done))
    const job: Job = { index, data, zero, done: false, cancelled: false, settled, settle }
    this.#queue.push(job)
    this.#pending.set(index, job)
    if (job.zero) {
      job.done = true
      queueMicrotask(() => this.#pump())
      return
    }
    this.#compressor.compress(data).then(
      (result) => {
        job.result = result
        job.done = true
        this.#pump()
      },
      (err: unknown) => {
        job.failure = err
        job.done = true
        this.#pump()
      },
    )
  }

  /**
   * A copy of a whole cluster in a buffer of its own (from the pool). (Not `slice()`: on a Node
   * Buffer, such as the FUSE request buffer that is reused once the write is answered, slice()
   * is a view.)
   */
  #copyOf(cluster: Uint8Array): Uint8Array {
    const out = this.#buffers.take()
    out.set(cluster)
    return out
  }

  #cancel(job: Job): void {
    job.cancelled = true
    if (this.#pending.get(job.index) === job) this.#pending.delete(job.index)
  }

  /** Commits the finished jobs at the head of the queue, in queue order, in one section. */
  #pump(): void {
    if (this.#pumping) return
    const ready: Job[] = []
    while (this.#queue.length > 0 && this.#queue[0]!.done) ready.push(this.#queue.shift()!)
    if (ready.length === 0) return
    this.#pumping = true
    const finish = () => {
      this.#pumping = false
      for (const job of ready) {
        job.settle()
        // Committed or dropped, and its worker is done with it: nothing refers to it any more.
        this.#buffers.give(job.data)
      }
      for (const wake of this.#roomWaiters.splice(0)) wake()
      this.#pump()
    }
    if (this.#error !== undefined) {
      // Nothing is committed after data was lost; the jobs still settle.
      queueMicrotask(finish)
      return
    }
    const section = (writePath: WritePath): void => {
      for (const job of ready) this.#commit(writePath, job)
      // Finished host clusters go to the file at once (WC-6).
      void this.cache.flush(false)
    }
    // At once when the lock is free (no promise round trips: this runs for every result).
    let committed: boolean
    try {
      committed = this.#host.mutateNow(section)
    } catch (err) {
      this.#fail(err)
      committed = true
    }
    if (committed) {
      finish()
      return
    }
    this.#committing = this.#host
      .mutate(section)
      .catch((err: unknown) => this.#fail(err))
      .finally(finish)
  }

  #commit(writePath: WritePath, job: Job): void {
    if (job.cancelled) return
    if (job.failure !== undefined) throw job.failure
    const cs = this.#g.clusterSize
    const guest = job.index * cs
    const inside = Math.min(cs, this.#host.virtualSize() - guest)
    if (inside > 0) {
      if (job.zero) {
        writePath.writeZeroesDirect(guest, inside)
        this.#stats.zeroClusters++
      } else if (job.result === undefined) {
        writePath.writeDirect(job.data.subarray(0, inside), guest)
        this.#stats.uncompressedClusters++
        this.#stats.guestBytes += cs
        this.#stats.storedBytes += cs
      } else {
        const compressed = job.result
        const hostOffset = writePath.installCompressed(guest, compressed.length, (bytes) => this.packer.allocate(bytes))
        this.cache.write(hostOffset, compressed)
        this.#stats.compressedClusters++
        this.#stats.guestBytes += cs
        this.#stats.storedBytes += compressed.length
      }
    }
    if (this.#pending.get(job.index) === job) this.#pending.delete(job.index)
  }

  #hostClusterFreed(cluster: number): void {
    const hostOffset = cluster * this.#g.clusterSize
    // The image's cache writer is synchronous: nothing is ever in flight here.
    void this.cache.drop(hostOffset)
    this.packer.forget(hostOffset)
  }

  #fail(err: unknown): void {
    if (this.#error !== undefined) return
    this.#error = err
    log.compress('compressed writes failed, data lost: %s', describeError(err))
    for (const wake of this.#roomWaiters.splice(0)) wake()
  }

  #throwIfFailed(): void {
    if (this.#error !== undefined) throw this.#error
  }
}

/*
 * The sequential compressed-write cache (docs/COMPRESSION.md; the WC-* rules of the design
 * notes): compressed clusters are packed byte after byte into host clusters (packer.ts), so
 * their writes are small, unaligned and strictly sequential. This cache turns them into about
 * one write per host cluster.
 *
 *  - The unit is one aligned host cluster; at most one entry per host cluster and at most one
 *    "unfinished" entry (WC-1). A write that starts exactly where the unfinished entry ends
 *    appends to it (WC-2). The unfinished entry becomes "finished" when its bytes reach the end
 *    of its host cluster, or when a write for another host cluster arrives (WC-3); that new
 *    entry may start anywhere in its cluster. Any other write (not sequential, into a finished
 *    entry, over cached bytes) is an internal error, never silently accepted (WC-4). A write
 *    that crosses a host-cluster boundary is split, each piece in its own entry (WC-5).
 *  - Finished entries are flushed in write order (FIFO) by flush(false), which the caller runs
 *    right after the write that finished them (WC-6), as [start, alignUp(end, A)) with the
 *    padding zero (the buffer is zero-filled) and the start not aligned down (WC-7): the tail of
 *    a finished host cluster is never used, so the padding overwrites nothing, and an aligned
 *    end spares the host a read-modify-write. A = min(cluster size, max(request alignment,
 *    4 KiB)).
 *  - The unfinished entry is flushed only by flush(true) (fsync, unmount), as exactly its bytes
 *    (WC-8): more compressed data may still be appended after them, and it does not finalize
 *    the host cluster (WC-9). Flushed entries leave the cache; a later append into the same
 *    host cluster starts a new entry at the unaligned offset, so flushed bytes are never
 *    rewritten.
 *  - flush(true) writes the entries present when it starts, finished ones first, then the
 *    unfinished one (WC-10), so it ends even while writes keep arriving.
 *  - Errors (WC-12, the sticky policy): a failed flush drops the entry (its data is lost) and
 *    the first error sticks: it is thrown to the flush that failed (so to the write or fsync
 *    that ran it) and by every later flush and write, so fsync never reports lost data durable.
 *  - Reads (WC-13, WC-14): overlay() copies every cached byte of a host range over what was
 *    read from the file, entry by entry, including entries being flushed; bytes that no entry
 *    holds are left as read (never uninitialised memory).
 *  - drop(cluster) (WC-15): a freed host cluster's entry goes without being written. If a
 *    flush of it is in flight, the drop completes when that flush has (WC-16), and busy()
 *    reports the cluster until then, so it is not allocated again meanwhile.
 *  - The writer may be synchronous (the image file: then every flush is complete when the call
 *    returns, and nothing is ever in flight) or asynchronous (tests; the in-flight rules above
 *    then matter). An entry being flushed stays readable; appends to the unfinished entry
 *    during its flush land after the captured prefix, and only that prefix leaves the cache
 *    when the flush ends (WC-18). Waiters are resolved only after the flusher has updated the
 *    entry, so no one sees a half-updated entry (WC-17).
 *  - No size limit (WC-19): finished entries are flushed right after the write that finished
 *    them, so the cache holds one unfinished entry plus the finished ones of the insertion in
 *    progress.
 *  - The writer of the image goes through the metadata overlap check, at flush time (WC-21).
 */
import { CorruptImageError } from '../../errors.js'
import { hex } from '../../format/int64.js'

/** Writes `buf` at hostOffset; synchronous (returns nothing) or asynchronous (a promise). */
export type CacheWriter = (buf: Uint8Array, hostOffset: number) => void | Promise<void>

/** The flush alignment floor (WC-7): 4 KiB, a page and the common physical block size. */
export const MIN_FLUSH_ALIGNMENT = 4096

interface Entry {
  /** Host offset of the aligned host cluster. */
  cluster: number
  /** Host offset of the first cached byte. */
  start: number
  /** Cached bytes from start. */
  bytes: number
  /** The host cluster's bytes (zero-filled); the cached ones at [start - cluster, +bytes). */
  buf: Uint8Array
  finished: boolean
  /** The flush in flight, and how many bytes from start it writes. */
  flushing?: { done: Promise<void>; bytes: number }
  /** Freed while being flushed: leaves the cache when the flush ends. */
  dropped: boolean
  /** Left the cache; its buffer went back to the free list. */
  recycled?: boolean
}

/**
 * Host-cluster buffers kept for reuse: a compressed copy finishes a host cluster every two or
 * three compressed clusters, and a fresh cluster-sized buffer each time made the event loop
 * fault in and collect half a gigabyte per GiB copied.
 */
const MAX_FREE_BUFFERS = 4

export interface CacheStats {
  /** Writes handed to the writer. */
  flushes: number
  /** Bytes handed to the writer (padding included). */
  bytesFlushed: number
}

export class CompressedWriteCache {
  readonly clusterSize: number
  readonly alignment: number
  #writer: CacheWriter
  /** Entries in write order: finished ones first, the unfinished one (if any) last. */
  #order: Entry[] = []
  #byCluster = new Map<number, Entry>()
  /** Host clusters whose flush is in flight (dropped entries included). */
  #inFlight = new Map<number, Promise<void>>()
  #freeBuffers: Uint8Array[] = []
  #error: unknown
  #stats: CacheStats = { flushes: 0, bytesFlushed: 0 }

  /**
   * `requestAlignment`: the host file's write alignment (1 for a file in the page cache; the
   * logical block size with O_DIRECT).
   */
  constructor(clusterSize: number, writer: CacheWriter, requestAlignment = 1) {
    this.clusterSize = clusterSize
    this.alignment = Math.min(clusterSize, Math.max(requestAlignment, MIN_FLUSH_ALIGNMENT))
    this.#writer = writer
  }

  /** Number of entries (finished, unfinished and in flight). */
  get size(): number {
    return this.#order.length
  }

  /** True when nothing is cached and nothing is in flight. */
  get empty(): boolean {
    return this.#order.length === 0 && this.#inFlight.size === 0
  }

  /** The first error of a flush, once one failed (sticky). */
  get error(): unknown {
    return this.#error
  }

  stats(): CacheStats {
    return { ...this.#stats }
  }

  /** End of the highest cached byte (0 when empty). */
  end(): number {
    let end = 0
    for (const e of this.#order) end = Math.max(end, e.start + e.bytes)
    return end
  }

  /** The entries as (start, bytes, finished), in write order: for tests and logs. */
  entries(): { start: number; bytes: number; finished: boolean; flushing: boolean }[] {
    return this.#order.map((e) => ({ start: e.start, bytes: e.bytes, finished: e.finished, flushing: e.flushing !== undefined }))
  }

  /** True while a flush to the host cluster at clusterOffset is in flight (WC-16). */
  busy(clusterOffset: number): boolean {
    return this.#inFlight.has(clusterOffset)
  }

  /** Caches data for [hostOffset, hostOffset + data.length); see the rules above. */
  write(hostOffset: number, data: Uint8Array): void {
    if (this.#error !== undefined) throw this.#error
    const cs = this.clusterSize
    let done = 0
    while (done < data.length) {
      const pos = hostOffset + done
      const cluster = pos - (pos % cs)
      const n = Math.min(cluster + cs - pos, data.length - done)
      this.#writeInCluster(cluster, pos, data.subarray(done, done + n))
      done += n
    }
  }

  #writeInCluster(cluster: number, pos: number, piece: Uint8Array): void {
    const unfinished = this.#unfinished()
    let entry = this.#byCluster.get(cluster)
    if (entry) {
      if (entry !== unfinished || entry.dropped) {
        throw new CorruptImageError(`compressed-write cache: write at ${hex(pos)} into a finished host cluster ${hex(cluster)}`)
      }
      if (pos !== entry.start + entry.bytes) {
        throw new CorruptImageError(
          `compressed-write cache: write at ${hex(pos)} is not sequential (cached up to ${hex(entry.start + entry.bytes)})`,
        )
      }
    } else {
      if (this.#inFlight.has(cluster)) {
        throw new CorruptImageError(`compressed-write cache: write at ${hex(pos)} into host cluster ${hex(cluster)} while a flush of it is in flight`)
      }
      if (unfinished) unfinished.finished = true
      const buf = this.#freeBuffers.pop()?.fill(0) ?? new Uint8Array(this.clusterSize)
      entry = { cluster, start: pos, bytes: 0, buf, finished: false, dropped: false }
      this.#order.push(entry)
      this.#byCluster.set(cluster, entry)
    }
    entry.buf.set(piece, pos - cluster)
    entry.bytes += piece.length
    if (entry.start + entry.bytes === cluster + this.clusterSize) entry.finished = true
  }

  #unfinished(): Entry | undefined {
    const last = this.#order[this.#order.length - 1]
    return last && !last.finished ? last : undefined
  }

  /**
   * Flushes the finished entries (FIFO), and with `includeUnfinished` then the unfinished one,
   * as they are when the call starts (WC-10); with `includeUnfinished` it also waits for the
   * flushes in flight and then writes what their entries gained meanwhile. With a synchronous
   * writer everything is written when the call returns (an error is thrown); otherwise the
   * promise settles when the writes have.
   */
  flush(includeUnfinished: boolean): void | Promise<void> {
    if (this.#error !== undefined) throw this.#error
    const atStart = new Set(this.#order)
    const inFlightAtStart = includeUnfinished ? [...this.#inFlight.values()] : []
    const pending = this.#flushBatch((e) => e.finished || includeUnfinished)
    if (inFlightAtStart.length > 0) {
      pending.push(
        Promise.allSettled(inFlightAtStart).then(async () => {
          if (this.#error !== undefined) return
          await Promise.allSettled(this.#flushBatch((e) => atStart.has(e)))
        }),
      )
    }
    if (pending.length === 0) {
      if (this.#error !== undefined) throw this.#error
      return
    }
    return Promise.allSettled(pending).then(() => {
      if (this.#error !== undefined) throw this.#error
    })
  }

  /** Starts flushes of the entries `pick` selects (write order); returns the asynchronous ones. */
  #flushBatch(pick: (e: Entry) => boolean): Promise<void>[] {
    const batch = this.#order.filter((e) => !e.flushing && !e.dropped && pick(e))
    const pending: Promise<void>[] = []
    for (const entry of batch) {
      if (this.#error !== undefined) break
      const result = this.#flushEntry(entry)
      if (result) pending.push(result)
    }
    return pending
  }

  /** Waits for every flush in flight (errors stay in `error`). */
  async idle(): Promise<void> {
    while (this.#inFlight.size > 0) await Promise.allSettled([...this.#inFlight.values()])
  }

  #flushEntry(entry: Entry): void | Promise<void> {
    const offsetInCluster = entry.start - entry.cluster
    let end = offsetInCluster + entry.bytes
    // Finished: the tail of the host cluster is never used, so round the end up (WC-7).
    if (entry.finished) end = Math.min(this.clusterSize, Math.ceil(end / this.alignment) * this.alignment)
    const bytes = entry.bytes
    const out = entry.buf.subarray(offsetInCluster, end)
    let result: void | Promise<void>
    try {
      result = this.#writer(out, entry.start)
    } catch (err) {
      this.#fail(err)
      this.#finishFlush(entry, bytes)
      return
    }
    this.#stats.flushes++
    this.#stats.bytesFlushed += out.length
    if (!(result instanceof Promise)) {
      this.#finishFlush(entry, bytes)
      return
    }
    const cluster = entry.cluster
    const done: Promise<void> = result
      .then(
        () => this.#finishFlush(entry, bytes),
        (err: unknown) => {
          this.#fail(err)
          this.#finishFlush(entry, bytes)
        },
      )
      .then(() => {
        // Only now, with the entry updated, may waiters go on (WC-17).
        if (this.#inFlight.get(cluster) === done) this.#inFlight.delete(cluster)
      })
    entry.flushing = { done, bytes }
    this.#inFlight.set(cluster, done)
    return done
  }

  /**
   * The flush of `bytes` bytes from entry.start ended (well or not): that prefix leaves the
   * cache; bytes appended meanwhile stay, as the entry now starting after it (WC-18).
   */
  #finishFlush(entry: Entry, bytes: number): void {
    entry.flushing = undefined
    if (entry.dropped || entry.bytes === bytes || this.#error !== undefined) {
      this.#remove(entry)
    } else {
      entry.start += bytes
      entry.bytes -= bytes
    }
  }

  #remove(entry: Entry): void {
    const at = this.#order.indexOf(entry)
    if (at >= 0) this.#order.splice(at, 1)
    if (this.#byCluster.get(entry.cluster) === entry) this.#byCluster.delete(entry.cluster)
    // Not while a flush still writes from it (a dropped entry comes back here when it ends).
    if (!entry.flushing && !entry.recycled) {
      entry.recycled = true
      if (this.#freeBuffers.length < MAX_FREE_BUFFERS) this.#freeBuffers.push(entry.buf)
    }
  }

  #fail(err: unknown): void {
    if (this.#error === undefined) this.#error = err
  }

  /**
   * The host cluster at clusterOffset was freed: its entry goes without being written (WC-15).
   * When a flush of it is in flight, returns a promise that settles when that flush has ended
   * (WC-16); until then busy() reports the cluster.
   */
  drop(clusterOffset: number): void | Promise<void> {
    const entry = this.#byCluster.get(clusterOffset)
    if (entry) {
      if (entry.flushing) {
        entry.dropped = true
        // Not readable or appendable any more; the in-flight mark stays until the flush ends.
        this.#byCluster.delete(clusterOffset)
        const at = this.#order.indexOf(entry)
        if (at >= 0) this.#order.splice(at, 1)
      } else {
        this.#remove(entry)
      }
    }
    return this.#inFlight.get(clusterOffset)
  }

  /** Copies every cached byte of [hostOffset, hostOffset + buf.length) into buf (WC-13). */
  overlay(buf: Uint8Array, hostOffset: number): void {
    if (this.#order.length === 0 || buf.length === 0) return
    const cs = this.clusterSize
    const end = hostOffset + buf.length
    for (let cluster = hostOffset - (hostOffset % cs); cluster < end; cluster += cs) {
      const entry = this.#byCluster.get(cluster)
      if (!entry) continue
      const from = Math.max(hostOffset, entry.start)
      const to = Math.min(end, entry.start + entry.bytes)
      if (from >= to) continue
      buf.set(entry.buf.subarray(from - cluster, to - cluster), from - hostOffset)
    }
  }
}

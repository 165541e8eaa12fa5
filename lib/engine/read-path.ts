/*
 * The read path: guest bytes from the mapping runs of ClusterMapper.
 *
 * Design notes:
 *  - DATA runs are read with one pread each (runs already merge host-contiguous clusters).
 *    A run whose last (sub)cluster starts at or past the end of the data file is damage (EIO);
 *    a run that only ends past EOF reads zeros there, as QEMU does: a partly written last
 *    cluster is normal (subcluster writes, COW skipped over zeros).
 *  - COMPRESSED runs inflate the whole cluster once and keep it in a small LRU keyed by the
 *    host offset of the compressed data, so sequential small reads (4 KiB at a time) of one
 *    compressed cluster inflate it once.
 *  - BACKING runs read from the backing file, or zeros without one. Reads stay synchronous
 *    down the chain.
 *  - Inflating is synchronous: measured here, zlib's asynchronous (thread pool) inflate of a
 *    64 KiB cluster costs about three times the synchronous one, more than two cores win back.
 *  - Sequential host reads (of data or of compressed data) start a read-ahead of the host file
 *    a few MiB ahead, so a cold sequential guest read does not wait on the disk request by
 *    request.
 *  - Reads past virtualSize are the caller's job to avoid (the FUSE adapter clamps); here they
 *    read as unallocated.
 */
import { LRUCache } from 'lru-cache'
import { CorruptImageError } from '../errors.js'
import type { Geometry } from '../format/geometry.js'
import { alignDown, hex } from '../format/int64.js'
import type { BlockFile } from '../io/block-file.js'
import type { ReadSource } from './backing.js'
import { type ClusterMapper, RunKind } from './cluster-map.js'
import { decompressCluster } from './codec.js'

/** Decompressed clusters kept for sequential small reads: at most 8 MiB, at least 2. */
const DECOMPRESSED_CACHE_BYTES = 8 * 1024 * 1024
const MIN_DECOMPRESSED_CLUSTERS = 2

/** How far ahead of a sequential reader the host file is read ahead, and in what pieces. */
const READ_AHEAD_BYTES = 8 * 1024 * 1024
const READ_AHEAD_CHUNK_BYTES = 1024 * 1024

/** Starts host read-ahead when reads of one file are sequential. */
class SequentialReadAhead {
  #file: BlockFile
  #expected = -1
  #aheadTo = 0

  constructor(file: BlockFile) {
    this.#file = file
  }

  /** Notes a read of [hostOffset, end); reads ahead if it continues the previous one. */
  note(hostOffset: number, end: number): void {
    // Compressed clusters overlap by up to a sector (sizes are rounded to 512 bytes).
    const sequential = this.#expected >= 0 && hostOffset > this.#expected - 4096 && hostOffset < this.#expected + READ_AHEAD_CHUNK_BYTES
    this.#expected = end
    if (!sequential || this.#file.prefetch === undefined) {
      this.#aheadTo = 0
      return
    }
    if (this.#aheadTo < end) this.#aheadTo = end
    while (this.#aheadTo < end + READ_AHEAD_BYTES) {
      this.#file.prefetch(this.#aheadTo, READ_AHEAD_CHUNK_BYTES)
      this.#aheadTo += READ_AHEAD_CHUNK_BYTES
    }
  }
}

export interface ReadPathOptions {
  geometry: Geometry
  mapper: ClusterMapper
  /** The qcow2 file itself (compressed data always lives here). */
  imageFile: BlockFile
  /** Where DATA runs live: the image file, or the external data file. */
  dataFile: BlockFile
  backing?: ReadSource
  compressionType: number
}

export class ReadPath {
  #g: Geometry
  #mapper: ClusterMapper
  #imageFile: BlockFile
  #dataFile: BlockFile
  #backing: ReadSource | undefined
  #compressionType: number
  #decompressed: LRUCache<number, Uint8Array>
  #compressedInput: Uint8Array
  #clustersInflated = 0
  #dataReadAhead: SequentialReadAhead
  #compressedReadAhead: SequentialReadAhead

  constructor(options: ReadPathOptions) {
    this.#g = options.geometry
    this.#mapper = options.mapper
    this.#imageFile = options.imageFile
    this.#dataFile = options.dataFile
    this.#backing = options.backing
    this.#compressionType = options.compressionType
    const maxClusters = Math.max(MIN_DECOMPRESSED_CLUSTERS, Math.floor(DECOMPRESSED_CACHE_BYTES / this.#g.clusterSize))
    this.#decompressed = new LRUCache<number, Uint8Array>({ max: maxClusters })
    // A descriptor can name at most 2^(cluster_bits - 8) sectors: two clusters of input.
    this.#compressedInput = new Uint8Array(2 * this.#g.clusterSize)
    this.#dataReadAhead = new SequentialReadAhead(this.#dataFile)
    this.#compressedReadAhead = new SequentialReadAhead(this.#imageFile)
  }

  readSync(buf: Uint8Array, guestOffset: number): void {
    let done = 0
    while (done < buf.length) {
      const run = this.#mapper.map(guestOffset + done, buf.length - done)
      const out = buf.subarray(done, done + run.bytes)
      if (run.kind === RunKind.COMPRESSED) {
        const cluster = this.#decompress(run.descriptor!.hostOffset, run.descriptor!.compressedSize)
        out.set(cluster.subarray(run.offsetInCluster, run.offsetInCluster + run.bytes))
      } else {
        this.#readRun(run.kind, out, guestOffset + done, run.hostOffset)
      }
      done += run.bytes
    }
  }

  /** A DATA, ZERO or BACKING run. */
  #readRun(kind: RunKind, out: Uint8Array, guestOffset: number, hostOffset: number): void {
    switch (kind) {
      case RunKind.DATA:
        this.#readData(out, hostOffset)
        break
      case RunKind.ZERO:
        out.fill(0)
        break
      case RunKind.BACKING:
        this.#readBacking(out, guestOffset)
        break
    }
  }

  /** Drops the cached inflated cluster whose compressed data starts at hostOffset (freed). */
  forgetCompressed(hostOffset: number): void {
    this.#decompressed.delete(hostOffset)
  }

  /** Counters for tests and logs. */
  stats(): { clustersInflated: number } {
    return { clustersInflated: this.#clustersInflated }
  }

  #readData(out: Uint8Array, hostOffset: number): void {
    const file = this.#dataFile
    const lastUnitStart = alignDown(hostOffset + out.length - 1, this.#g.subclusterSize)
    if (lastUnitStart >= file.size) {
      throw new CorruptImageError(`data at host offset ${hex(lastUnitStart)} lies past the end of '${file.path}'`)
    }
    this.#dataReadAhead.note(hostOffset, hostOffset + out.length)
    const n = file.pread(out, hostOffset)
    if (n < out.length) out.fill(0, n)
  }

  #readBacking(out: Uint8Array, guestOffset: number): void {
    const backing = this.#backing
    if (backing === undefined || guestOffset >= backing.virtualSize) {
      out.fill(0)
      return
    }
    const inside = Math.min(out.length, backing.virtualSize - guestOffset)
    backing.readSync(out.subarray(0, inside), guestOffset)
    if (inside < out.length) out.fill(0, inside)
  }

  #decompress(hostOffset: number, compressedSize: number): Uint8Array {
    const cached = this.#decompressed.get(hostOffset)
    if (cached) return cached
    const input = this.#readCompressed(hostOffset, compressedSize, this.#compressedInput)
    const cluster = new Uint8Array(this.#g.clusterSize)
    try {
      decompressCluster(this.#compressionType, input, cluster)
    } catch (err) {
      throw this.#located(err, hostOffset)
    }
    this.#clustersInflated++
    this.#decompressed.set(hostOffset, cluster)
    return cluster
  }

  /** The compressed bytes of a cluster (the sector-rounded size may run past EOF). */
  #readCompressed(hostOffset: number, compressedSize: number, scratch: Uint8Array): Uint8Array {
    const file = this.#imageFile
    if (hostOffset >= file.size) {
      throw new CorruptImageError(`compressed cluster at host offset ${hex(hostOffset)} lies past the end of the image file`)
    }
    const input = scratch.subarray(0, Math.min(compressedSize, file.size - hostOffset))
    this.#compressedReadAhead.note(hostOffset, hostOffset + input.length)
    const n = file.pread(input, hostOffset)
    return input.subarray(0, n)
  }

  #located(err: unknown, hostOffset: number): unknown {
    if (err instanceof CorruptImageError) {
      return new CorruptImageError(`compressed cluster at host offset ${hex(hostOffset)}: ${err.message}`, { cause: err })
    }
    return err
  }

}

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
 *  - BACKING runs read from the backing file, or zeros without one.
 *  - Inflating is synchronous: measured here, zlib's asynchronous (thread pool) inflate of a
 *    64 KiB cluster costs about three times the synchronous one, more than two cores win back.
 *  - readSync reads synchronously all the way down. read() is the same but, where a file reads
 *    ahead (lib/io/read-ahead.ts: files of read-only images), it first waits for bytes of a
 *    run still on their way (BlockFile.whenReadable), then reads the run synchronously, which
 *    copies them from the read-ahead; a run is waited for once and mapped again afterwards.
 *    Reads of the same image may interleave at those waits: only images that nothing writes
 *    have files that read ahead, so a mapping cannot change meanwhile (a backing file of a
 *    writable image does; a write racing with a read of the same bytes may then leave the
 *    read with the older bytes, which a concurrent read may always get).
 *  - Reads past virtualSize are the caller's job to avoid (the FUSE adapter clamps); here they
 *    read as unallocated.
 */
import { LRUCache } from 'lru-cache'
import { CorruptImageError } from '../errors.js'
import type { Geometry } from '../format/geometry.js'
import { alignDown, hex } from '../format/int64.js'
import type { BlockFile } from '../io/block-file.js'
import type { ReadSource } from './backing.js'
import { type ClusterMapper, type MappedRun, RunKind } from './cluster-map.js'
import { decompressCluster } from './codec.js'

/** Decompressed clusters kept for sequential small reads: at most 8 MiB, at least 2. */
const DECOMPRESSED_CACHE_BYTES = 8 * 1024 * 1024
const MIN_DECOMPRESSED_CLUSTERS = 2

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

/**
 * Compressed bytes not yet in the image file (the compressed-write cache of the `compress`
 * mount option): laid over what the file holds whenever compressed data is read.
 */
export interface CompressedBytesOverlay {
  /** End of the highest byte it holds (0: none). */
  end(): number
  /** Copies the bytes it holds of [hostOffset, hostOffset + buf.length) into buf. */
  apply(buf: Uint8Array, hostOffset: number): void
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
  #overlay: CompressedBytesOverlay | undefined

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
  }

  readSync(buf: Uint8Array, guestOffset: number): void {
    let done = 0
    while (done < buf.length) {
      const run = this.#mapper.map(guestOffset + done, buf.length - done)
      this.#readRun(run, buf.subarray(done, done + run.bytes), guestOffset + done)
      done += run.bytes
    }
  }

  /** readSync, waiting for bytes that are being read ahead instead of reading them again. */
  async read(buf: Uint8Array, guestOffset: number): Promise<void> {
    let done = 0
    let waited = false
    while (done < buf.length) {
      const run = this.#mapper.map(guestOffset + done, buf.length - done)
      const pending = waited ? undefined : this.#arriving(run)
      if (pending !== undefined) {
        await pending
        waited = true
        continue
      }
      waited = false
      const out = buf.subarray(done, done + run.bytes)
      if (run.kind === RunKind.BACKING && this.#backing?.read !== undefined) await this.#readBackingSoon(out, guestOffset + done)
      else this.#readRun(run, out, guestOffset + done)
      done += run.bytes
    }
  }

  /** What to wait for before the run's bytes can be read without reading them twice. */
  #arriving(run: MappedRun): Promise<void> | undefined {
    switch (run.kind) {
      case RunKind.DATA:
        return this.#dataFile.whenReadable?.(run.hostOffset, run.bytes)
      case RunKind.COMPRESSED: {
        const { hostOffset, compressedSize } = run.descriptor!
        if (this.#decompressed.has(hostOffset)) return undefined
        return this.#imageFile.whenReadable?.(hostOffset, compressedSize)
      }
      default:
        return undefined
    }
  }

  #readRun(run: MappedRun, out: Uint8Array, guestOffset: number): void {
    switch (run.kind) {
      case RunKind.COMPRESSED: {
        const cluster = this.#decompress(run.descriptor!.hostOffset, run.descriptor!.compressedSize)
        out.set(cluster.subarray(run.offsetInCluster, run.offsetInCluster + run.bytes))
        break
      }
      case RunKind.DATA:
        this.#readData(out, run.hostOffset)
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

  /** Lays `overlay` over every compressed read from now on. */
  setCompressedOverlay(overlay: CompressedBytesOverlay | undefined): void {
    this.#overlay = overlay
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

  async #readBackingSoon(out: Uint8Array, guestOffset: number): Promise<void> {
    const backing = this.#backing!
    if (guestOffset >= backing.virtualSize) {
      out.fill(0)
      return
    }
    const inside = Math.min(out.length, backing.virtualSize - guestOffset)
    await backing.read!(out.subarray(0, inside), guestOffset)
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
    const overlay = this.#overlay
    const end = overlay ? Math.max(file.size, overlay.end()) : file.size
    if (hostOffset >= end) {
      throw new CorruptImageError(`compressed cluster at host offset ${hex(hostOffset)} lies past the end of the image file`)
    }
    const input = scratch.subarray(0, Math.min(compressedSize, end - hostOffset))
    const n = file.pread(input, hostOffset)
    if (!overlay) return input.subarray(0, n)
    // Cached bytes may lie past the end of the file, or over older bytes in it.
    input.fill(0, n)
    overlay.apply(input, hostOffset)
    return input
  }

  #located(err: unknown, hostOffset: number): unknown {
    if (err instanceof CorruptImageError) {
      return new CorruptImageError(`compressed cluster at host offset ${hex(hostOffset)}: ${err.message}`, { cause: err })
    }
    return err
  }

}

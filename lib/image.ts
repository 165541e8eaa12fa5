/*
 * Qcow2Image: the engine's facade. Opens an image (and its backing chain and data file),
 * validates everything that can be validated up front, and serves guest reads.
 *
 * Design notes:
 *  - Opening never writes: every file is opened O_RDONLY in this version, so a failed (or
 *    successful) open cannot modify the image.
 *  - Open-time checks refuse what cannot be read safely: bad magic or version, header fields
 *    out of range, unknown incompatible features (named from the feature name table), encryption,
 *    tables misaligned or past EOF, an L1 table too small for the virtual size or too large,
 *    a backing chain that loops or is too deep, a missing backing or data file. Damage found
 *    later, per region (an L2 table past EOF, a damaged compressed cluster, an invalid subcluster
 *    bitmap) fails only the read that touches it, with CorruptImageError (EIO).
 *  - Reads are synchronous underneath (see lib/io/block-file.ts); `read` is async to keep the
 *    VirtualDisk contract open for the write path, which needs an async metadata lock.
 *  - This version is read-only. The write path (allocation, refcounts, COW, metadata write
 *    ordering) comes with its own design notes when it lands.
 */
import * as path from 'node:path'
import type { CompressionProgress, VirtualDisk } from './disk.js'
import { Mutex } from 'async-mutex'
import { ClosedError, CorruptImageError, InvalidRequestError, NotFoundError, ReadOnlyError, UnsupportedFeatureError } from './errors.js'
import type { ImageInfo, SnapshotInfo } from './image-info.js'
import {
  COMPRESSION_TYPE_ZLIB,
  COMPRESSION_TYPE_ZSTD,
  INCOMPAT_CORRUPT_BIT,
  INCOMPAT_DIRTY_BIT,
  MAX_BACKING_CHAIN_DEPTH,
  MAX_L1_TABLE_BYTES,
  MAX_REFCOUNT_TABLE_BYTES,
  MAX_SNAPSHOTS,
  MAX_SNAPSHOT_TABLE_BYTES,
  QCOW_VERSION_3,
  SECTOR_SIZE,
  TABLE_ENTRY_SIZE,
} from './format/constants.js'
import { type Geometry, l1EntriesFor, makeGeometry } from './format/geometry.js'
import {
  type FeatureBits,
  HEADER_PROBE_SIZE,
  type HeaderExtensions,
  type Qcow2Header,
  checkIncompatibleFeatures,
  headerFlags,
  parseBackingFileName,
  parseHeader,
  parseHeaderExtensions,
} from './format/header.js'
import { alignUp, hex } from './format/int64.js'
import { type SnapshotEntry, parseSnapshotTableWithSize } from './format/snapshot.js'
import { type BlockFile, type LockMode, NodeBlockFile } from './io/block-file.js'
import { log } from './log.js'
import { L1Table } from './meta/l1-table.js'
import { type MetadataLayout, MetadataOverlapGuard } from './meta/overlap-guard.js'
import { DEFAULT_L2_CACHE_BYTES, L2SliceCache } from './meta/l2-cache.js'
import {
  type ChainContext,
  RawSource,
  type ReadSource,
  checkBackingFormat,
  enterChain,
  openBackingFile,
  probeFormat,
  resolveBackingPath,
} from './engine/backing.js'
import { ClusterMapper } from './engine/cluster-map.js'
import { type MetadataState, type MutableHeader, flushMetadata, writeHeaderField } from './engine/metadata.js'
import { ReadPath } from './engine/read-path.js'
import { WritePath } from './engine/write-path.js'
import { type CompressOptions, type CompressStats, CompressedWrites } from './engine/compress/pipeline.js'
import { Refcounts } from './meta/refcounts.js'
import { repairDirtyImage } from './check/dirty.js'

export interface OpenOptions {
  /** Open read-only (the default). Read-write opens refuse images they cannot keep valid. */
  readOnly?: boolean
  /** Present this internal snapshot (by ID or name) instead of the active image; read-only. */
  snapshot?: string
  /** Bound of the L2 table cache in bytes (the `cache-size` mount option). */
  l2CacheBytes?: number
  /**
   * Receives one line for each thing the open did that the user should hear of: a read-write
   * open of a dirty image repairs it first (lib/check/dirty.ts) and says so here.
   */
  notes?: string[]
  /**
   * Take QEMU's image locks (the default): the image, its backing files and data file are
   * locked as QEMU locks them (lib/io/image-lock.ts) and an image in use is refused with
   * BusyError. false: no lock and no check, like QEMU's locking=off.
   */
  lock?: boolean
  /**
   * Compressed writes (the `compress` mount option, docs/COMPRESSION.md): writes to fresh
   * clusters are stored compressed. Read-write opens only.
   */
  compress?: CompressOptions
  /**
   * Read ahead of sequential reads (lib/io/read-ahead.ts) in every file of the image that is
   * only read: the image file of a read-only open, its data file and its backing chain. The
   * mount asks for it; one-shot commands (info, check, map) do not need it.
   */
  readAhead?: boolean
}

/** Everything openOnFile validated and opened, handed to the constructor. */
interface ImageParts {
  path: string
  file: BlockFile
  dataFile: BlockFile | undefined
  header: Qcow2Header
  extensions: HeaderExtensions
  geometry: Geometry
  virtualSize: number
  backingFileName: string | undefined
  backingFormat: 'qcow2' | 'raw' | undefined
  backing: ReadSource | undefined
  snapshots: SnapshotEntry[]
  /** Length in bytes of the snapshot table (0 without snapshots). */
  snapshotTableBytes: number
  snapshot: SnapshotEntry | undefined
  l1: L1Table
  l2Cache: L2SliceCache
  readPath: ReadPath
  readOnly: boolean
  compress: CompressOptions | undefined
}

/** State that exists only while an image is open read-write. */
interface Writer {
  meta: MetadataState
  writePath: WritePath
  /** The first write prepared the header (autoclear bits cleared, dirty bit for lazy refcounts). */
  prepared: boolean
  /** We set the dirty bit (lazy refcounts) and must clear it on a clean close. */
  setDirtyBit: boolean
  /** Compressed writes, with the `compress` option. */
  compressed: CompressedWrites | undefined
}

/** Dirty L2 slices that force a metadata flush (4096 slices: 16 MiB of table data). */
const MAX_DIRTY_L2_SLICES = 4096

export class Qcow2Image implements VirtualDisk, ReadSource {
  readonly path: string
  readonly header: Qcow2Header
  readonly extensions: HeaderExtensions
  readonly geometry: Geometry
  readonly backingFileName: string | undefined
  readonly backingFormat: 'qcow2' | 'raw' | undefined
  readonly snapshots: SnapshotEntry[]
  /** The snapshot presented, when opened with `snapshot`. */
  readonly snapshot: SnapshotEntry | undefined
  #virtualSize: number
  #readOnly: boolean
  #file: BlockFile
  #dataFile: BlockFile | undefined
  #backing: ReadSource | undefined
  #readPath: ReadPath
  #writer: Writer | undefined
  /** Serializes everything that changes metadata (writes, resizes, flushes, close). */
  #lock = new Mutex()
  #closed = false

  private constructor(init: ImageParts) {
    this.path = init.path
    this.#file = init.file
    this.#dataFile = init.dataFile
    this.header = init.header
    this.extensions = init.extensions
    this.geometry = init.geometry
    this.#virtualSize = init.virtualSize
    this.backingFileName = init.backingFileName
    this.backingFormat = init.backingFormat
    this.#backing = init.backing
    this.snapshots = init.snapshots
    this.snapshot = init.snapshot
    this.#readPath = init.readPath
    this.#readOnly = init.readOnly
    if (!init.readOnly) {
      const h = init.header
      const mutable: MutableHeader = {
        virtualSize: h.virtualSize,
        l1Size: h.l1Size,
        l1TableOffset: h.l1TableOffset,
        refcountTableOffset: h.refcountTableOffset,
        refcountTableClusters: h.refcountTableClusters,
        incompatibleFeatures: { ...h.incompatibleFeatures },
        autoclearFeatures: { ...h.autoclearFeatures },
      }
      const refcounts = new Refcounts(init.file, init.geometry, {
        tableOffset: h.refcountTableOffset,
        tableClusters: h.refcountTableClusters,
        refcountOrder: h.refcountOrder,
      })
      const meta: MetadataState = {
        file: init.file,
        dataFile: init.file,
        refcounts,
        l2Cache: init.l2Cache,
        l1: init.l1,
        onDisk: mutable,
        wanted: { ...mutable, incompatibleFeatures: { ...mutable.incompatibleFeatures }, autoclearFeatures: { ...mutable.autoclearFeatures } },
      }
      const backing = init.backing
      const writePath = new WritePath({
        geometry: init.geometry,
        version: h.version,
        file: init.file,
        l1: init.l1,
        l2Cache: init.l2Cache,
        refcounts,
        readPath: init.readPath,
        backingSize: () => backing?.virtualSize ?? 0,
      })
      this.#writer = { meta, writePath, prepared: false, setDirtyBit: false, compressed: undefined }
      if (init.compress) this.#startCompressedWrites(this.#writer, init, refcounts, init.compress)
      if (init.file instanceof MetadataOverlapGuard) {
        init.file.attach(metadataLayout(h, init.l1, refcounts, meta.wanted, init.snapshots, init.snapshotTableBytes, init.geometry.clusterSize))
      }
    }
  }

  /** Routes writes through the compressed-write pipeline (lib/engine/compress/pipeline.ts). */
  #startCompressedWrites(writer: Writer, init: ImageParts, refcounts: Refcounts, options: CompressOptions): void {
    const { writePath } = writer
    const compressed = new CompressedWrites(
      {
        geometry: init.geometry,
        compressionType: init.header.compressionType,
        refcounts,
        virtualSize: () => this.#virtualSize,
        readCommitted: (buf, guestOffset) => init.readPath.readSync(buf, guestOffset),
        mutate: (section) => this.#mutate((w) => section(w.writePath)),
        mutateNow: (section) => {
          if (this.#lock.isLocked()) return false
          this.#mutateStep((w) => section(w.writePath))
          return true
        },
        writeCompressed: (buf, hostOffset) => {
          init.file.pwrite(buf, hostOffset, 'compressed')
          writePath.dataWritten = true
        },
      },
      options,
    )
    writePath.router = compressed
    init.readPath.setCompressedOverlay({ end: () => compressed.cache.end(), apply: (buf, hostOffset) => compressed.cache.overlay(buf, hostOffset) })
    writer.compressed = compressed
  }

  /** Opens a qcow2 image; rejects with a Qcow2Error whose message names the problem. */
  static async open(imagePath: string, options: OpenOptions = {}): Promise<Qcow2Image> {
    return Qcow2Image.openSync(imagePath, options)
  }

  static openSync(imagePath: string, options: OpenOptions = {}, chain?: ChainContext): Qcow2Image {
    const readOnly = options.readOnly !== false
    const context = enterChain(chain, imagePath, MAX_BACKING_CHAIN_DEPTH)
    const file = NodeBlockFile.open(imagePath, { readOnly, lock: lockMode(options, readOnly), readAhead: options.readAhead === true })
    return Qcow2Image.openFile(file, imagePath, options, context)
  }

  /**
   * Opens an image on an already open BlockFile (tests use recording or fault-injecting ones).
   * The file is closed if the open fails.
   */
  static openFile(file: BlockFile, imagePath: string, options: OpenOptions = {}, context?: ChainContext): Qcow2Image {
    const opened: { close(): void }[] = [file]
    try {
      return openOnFile(imagePath, file, options, context ?? enterChain(undefined, imagePath, MAX_BACKING_CHAIN_DEPTH), opened)
    } catch (err) {
      for (const f of opened.reverse()) f.close()
      throw err
    }
  }

  /** Wraps an already validated state; used by openOnFile. */
  static fromParts(init: ImageParts): Qcow2Image {
    return new Qcow2Image(init)
  }

  get virtualSize(): number {
    return this.#virtualSize
  }

  get readOnly(): boolean {
    return this.#readOnly
  }

  readSync(buf: Uint8Array, guestOffset: number): void {
    if (this.#closed) throw new ClosedError()
    // Damage found by a read fails the read (EIO) and changes nothing: only writes set the
    // corrupt bit.
    this.#readPath.readSync(buf, guestOffset)
    // Staged and queued compressed writes are not in the image yet.
    this.#writer?.compressed?.overlay(buf, guestOffset)
  }

  /** readSync, waiting for bytes being read ahead (OpenOptions.readAhead) rather than reading them again. */
  async read(buf: Uint8Array, guestOffset: number): Promise<void> {
    if (this.#closed) throw new ClosedError()
    await this.#readPath.read(buf, guestOffset)
    if (this.#closed) throw new ClosedError()
    this.#writer?.compressed?.overlay(buf, guestOffset)
  }

  /** Compressed-write counters (with the `compress` option). */
  compressionStats(): CompressStats | undefined {
    return this.#writer?.compressed?.stats()
  }

  compressionProgress(): CompressionProgress | undefined {
    const stats = this.compressionStats()
    if (!stats) return undefined
    const { compressedClusters, uncompressedClusters, zeroClusters, guestBytes, storedBytes } = stats
    return { compressedClusters, uncompressedClusters, zeroClusters, guestBytes, storedBytes, pendingClusters: stats.stagedClusters + stats.queuedClusters }
  }

  /** Read-path counters (clusters inflated so far). */
  readStats(): { clustersInflated: number } {
    return this.#readPath.stats()
  }

  /** Writes buf at guestOffset; the range must lie inside the disk (see resize). */
  async write(buf: Uint8Array, guestOffset: number): Promise<void> {
    // Compressed writes return once their data is queued: wait for room in the queue first.
    const compressed = this.#writer?.compressed
    if (compressed && !this.#closed && !compressed.admitsNow) await compressed.admit()
    return this.#mutate((writer) => this.#writeStep(writer, buf, guestOffset))
  }

  /**
   * Writes `buf` synchronously and returns true, when nothing stands in the way: the lock is
   * free and, with compressed writes, their queue has room (a full queue makes a writer wait).
   * Otherwise returns false and does nothing. Throws what write() would reject with. Once it
   * returns, `buf` is no longer referenced. The FUSE adapter uses it to answer a write before
   * storing it.
   */
  writeAtOnce(buf: Uint8Array, guestOffset: number): boolean {
    if (this.#closed || this.#readOnly || !this.#writer || this.#lock.isLocked()) return false
    const compressed = this.#writer.compressed
    if (compressed && !compressed.admitsNow) return false
    this.#mutateStep((writer) => this.#writeStep(writer, buf, guestOffset))
    return true
  }

  #writeStep(writer: Writer, buf: Uint8Array, guestOffset: number): void {
    if (guestOffset < 0 || guestOffset + buf.length > this.#virtualSize) {
      throw new InvalidRequestError(`write of ${buf.length} bytes at ${guestOffset} goes past the end of the disk (${this.#virtualSize} bytes)`)
    }
    writer.writePath.write(buf, guestOffset)
    this.#flushIfTooDirty(writer)
  }

  /** Makes a range read as zeros, with zero clusters where the format allows. */
  async writeZeroes(guestOffset: number, bytes: number): Promise<void> {
    await this.#mutate((writer) => {
      if (guestOffset < 0 || guestOffset + bytes > this.#virtualSize) {
        throw new InvalidRequestError(`zero write of ${bytes} bytes at ${guestOffset} goes past the end of the disk`)
      }
      writer.writePath.writeZeroes(guestOffset, bytes)
      this.#flushIfTooDirty(writer)
    })
  }

  /**
   * Changes the virtual size to `requestedSize` rounded up to a multiple of 512 bytes (QEMU
   * only handles whole sectors: it would read a header size of 1000 as 512). Growing makes the
   * new range read as zeros (even over a larger backing file); shrinking frees what lies past
   * the new end. Images with internal snapshots cannot be resized (as in QEMU).
   */
  async resize(requestedSize: number): Promise<void> {
    await this.#mutate((writer) => {
      if (!Number.isSafeInteger(requestedSize) || requestedSize < 0) throw new InvalidRequestError(`invalid size ${requestedSize}`)
      const newSize = alignUp(requestedSize, SECTOR_SIZE)
      if (this.snapshots.length > 0) {
        throw new UnsupportedFeatureError(`'${this.path}' has internal snapshots and cannot be resized`)
      }
      const oldSize = this.#virtualSize
      if (newSize === oldSize) return
      if (newSize > oldSize) {
        // Whatever a crash left mapped past the old end (a shrink is durable before its
        // mappings go) is dropped, and the new range reads as zeros even over a larger backing
        // file. None of it is visible until the new size reaches the header, which is last.
        writer.writePath.ensureL1Covers(newSize)
        writer.writePath.discardRange(oldSize, newSize)
        this.#virtualSize = newSize
        const backingSize = this.#backing?.virtualSize ?? 0
        if (backingSize > oldSize) writer.writePath.writeZeroes(oldSize, Math.min(newSize, backingSize) - oldSize)
      } else {
        // The smaller size first, durable, then the mappings past it go: dropped clusters
        // below a larger backing file's end would otherwise show its data after a crash.
        writer.meta.wanted.virtualSize = newSize
        this.#flushLocked(writer)
        writer.writePath.discardRange(newSize, oldSize)
        this.#virtualSize = newSize
      }
      writer.meta.wanted.virtualSize = newSize
      this.#flushIfTooDirty(writer)
    })
  }

  /** Makes everything written so far durable (data, then metadata in the documented order). */
  async flush(): Promise<void> {
    if (this.#closed) throw new ClosedError()
    const writer = this.#writer
    if (!writer) return
    // Staged and queued compressed clusters first: then the cache, then the metadata.
    if (writer.compressed && !this.#readOnly) await writer.compressed.drain()
    await this.#exclusive(() => this.#flushLocked(writer))
  }

  async close(): Promise<void> {
    if (this.#closed) return
    const writer = this.#writer
    try {
      if (writer && !this.#readOnly) {
        if (writer.compressed) await writer.compressed.drain()
        await this.#exclusive(() => {
          this.#flushLocked(writer)
          if (writer.setDirtyBit) {
            writer.meta.wanted.incompatibleFeatures = clearBit(writer.meta.wanted.incompatibleFeatures, INCOMPAT_DIRTY_BIT)
            this.#flushLocked(writer)
          }
        })
      }
    } finally {
      const compressed = writer?.compressed
      if (compressed) {
        await compressed.close()
        // Data was lost (a sticky error): nothing can be made durable any more; let the file go.
        if (compressed.error !== undefined) this.closeSync()
      }
    }
    this.closeSync()
  }

  /** Releases the image, its data file and its backing chain (no flush). Idempotent. */
  closeSync(): void {
    if (this.#closed) return
    this.#closed = true
    this.#backing?.close()
    this.#dataFile?.close()
    this.#file.close()
  }

  #flushLocked(writer: Writer): void {
    if (this.#readOnly) return
    this.#guardCorruption(() => {
      // Compressed bytes still cached go first, so no L2 entry is durable before its data (O1).
      writer.compressed?.flushCache()
      flushMetadata(writer.meta, writer.writePath.dataWritten)
      writer.writePath.dataWritten = false
    })
  }

  #flushIfTooDirty(writer: Writer): void {
    if (writer.meta.l2Cache.dirtyCount > MAX_DIRTY_L2_SLICES) this.#flushLocked(writer)
  }

  /**
   * Runs a synchronous critical section under the lock. When nobody holds the lock it runs at
   * once: a synchronous section cannot be interleaved, and going through the mutex costs about
   * 15 us per call (measured: 12% of the server's CPU in 4 KiB random writes). Only a holder
   * that awaits inside its section (none today) makes later callers queue.
   */
  #exclusive<T>(section: () => T): Promise<T> {
    if (this.#lock.isLocked()) return this.#lock.runExclusive(section)
    try {
      return Promise.resolve(section())
    } catch (err) {
      return Promise.reject(err)
    }
  }

  /** Runs a metadata-changing step under the lock, preparing the header on the first one. */
  #mutate(step: (writer: Writer) => void): Promise<void> {
    return this.#exclusive(() => this.#mutateStep(step))
  }

  /** The body of #mutate, for a caller that holds the lock or knows it is free. */
  #mutateStep(step: (writer: Writer) => void): void {
    if (this.#closed) throw new ClosedError()
    const writer = this.#writer
    if (!writer || this.#readOnly) throw new ReadOnlyError(`'${this.path}' is open read-only`)
    this.#guardCorruption(() => {
      if (!writer.prepared) this.#prepareForWrites(writer)
      step(writer)
    })
  }


  /**
   * Before the first change: clear the autoclear bits of features we do not maintain (the spec
   * requires this before writing), and set the dirty bit if the image uses lazy refcounts.
   * Both reach the disk before anything else is written.
   */
  #prepareForWrites(writer: Writer): void {
    const { meta } = writer
    meta.wanted.autoclearFeatures = { hi: 0, lo: 0 }
    if (headerFlags.lazyRefcounts(this.header)) {
      meta.wanted.incompatibleFeatures = setBit(meta.wanted.incompatibleFeatures, INCOMPAT_DIRTY_BIT)
      writer.setDirtyBit = true
    }
    flushMetadata(meta, false)
    writer.prepared = true
  }

  /**
   * Metadata found corrupt while changing the image: set the corrupt bit (best effort), turn
   * read-only, and let the error through (EIO).
   */
  #guardCorruption(step: () => void): void {
    try {
      step()
    } catch (err) {
      if (err instanceof CorruptImageError && this.#writer) {
        this.#readOnly = true
        log.open('%s: corrupt metadata found while writing (%s); image marked corrupt, now read-only', this.path, err.message)
        try {
          const corruptBits = setBit(this.#writer.meta.onDisk.incompatibleFeatures, INCOMPAT_CORRUPT_BIT)
          writeHeaderField(this.#file, 'incompatibleFeatures', { ...this.#writer.meta.onDisk, incompatibleFeatures: corruptBits })
          this.#file.sync()
        } catch {
          // The image is already damaged; the read-only switch is what matters now.
        }
      }
      throw err
    }
  }

  info(): ImageInfo {
    const h = this.header
    const data: ImageInfo['format-specific']['data'] = {
      compat: h.version === QCOW_VERSION_3 ? '1.1' : '0.10',
      'compression-type': h.compressionType === COMPRESSION_TYPE_ZSTD ? 'zstd' : 'zlib',
      'refcount-bits': 2 ** h.refcountOrder,
    }
    if (h.version === QCOW_VERSION_3) {
      data['lazy-refcounts'] = headerFlags.lazyRefcounts(h)
      if (this.extensions.dataFile !== undefined) {
        data['data-file'] = this.extensions.dataFile
        data['data-file-raw'] = headerFlags.dataFileRaw(h)
      }
      data.corrupt = headerFlags.corrupt(h)
      data['extended-l2'] = headerFlags.extendedL2(h)
    }
    const info: ImageInfo = {
      filename: this.path,
      format: 'qcow2',
      'virtual-size': this.header.virtualSize,
      'cluster-size': this.geometry.clusterSize,
      'actual-size': this.#file.allocatedBytes(),
      'dirty-flag': headerFlags.dirty(h),
      'format-specific': { type: 'qcow2', data },
    }
    if (this.backingFileName !== undefined) {
      info['backing-filename'] = this.backingFileName
      info['full-backing-filename'] = resolveBackingPath(this.path, this.backingFileName)
      if (this.extensions.backingFormat !== undefined) info['backing-filename-format'] = this.extensions.backingFormat
    }
    if (this.snapshots.length > 0) {
      info.snapshots = this.snapshots.map((s): SnapshotInfo => {
        const out: SnapshotInfo = {
          id: s.id,
          name: s.name,
          'vm-state-size': s.vmStateSize,
          'date-sec': s.dateSeconds,
          'date-nsec': s.dateNanoseconds,
          'vm-clock-sec': Math.floor(s.vmClockNanoseconds / 1e9),
          'vm-clock-nsec': s.vmClockNanoseconds % 1e9,
        }
        if (s.icount !== undefined) out.icount = s.icount
        return out
      })
    }
    return info
  }
}

function setBit(bits: FeatureBits, bit: number): FeatureBits {
  return bit < 32 ? { hi: bits.hi, lo: (bits.lo | (1 << bit)) >>> 0 } : { hi: (bits.hi | (1 << (bit - 32))) >>> 0, lo: bits.lo }
}

function clearBit(bits: FeatureBits, bit: number): FeatureBits {
  return bit < 32 ? { hi: bits.hi, lo: (bits.lo & ~(1 << bit)) >>> 0 } : { hi: (bits.hi & ~(1 << (bit - 32))) >>> 0, lo: bits.lo }
}

/** The lock a file of an image takes: backing and data files are only read. */
function lockMode(options: OpenOptions, readOnly: boolean): LockMode {
  if (options.lock === false) return 'none'
  return readOnly ? 'read' : 'write'
}

function corrupt(imagePath: string, message: string): CorruptImageError {
  return new CorruptImageError(`'${imagePath}': ${message}`)
}

/** Checks that [offset, offset + bytes) is cluster aligned and inside the file. */
function checkTable(imagePath: string, what: string, offset: number, bytes: number, clusterSize: number, fileSize: number): void {
  if (offset % clusterSize !== 0) throw corrupt(imagePath, `${what} offset ${hex(offset)} is not cluster aligned`)
  if (offset === 0) throw corrupt(imagePath, `${what} overlaps the header`)
  if (offset + bytes > fileSize) throw corrupt(imagePath, `${what} at ${hex(offset)} lies past the end of the file`)
}

function readExact(file: BlockFile, bytes: number, hostOffset: number, imagePath: string, what: string): Uint8Array {
  const buf = new Uint8Array(bytes)
  if (file.pread(buf, hostOffset) !== bytes) throw corrupt(imagePath, `${what} lies past the end of the file`)
  return buf
}

function openOnFile(imagePath: string, file: BlockFile, options: OpenOptions, context: ChainContext, opened: { close(): void }[]): Qcow2Image {
  if (options.readOnly === false) {
    // A dirty image (lazy refcounts, writer crashed) is repaired before anything is read.
    const note = repairDirtyImage(file, imagePath, options)
    if (note !== undefined) options.notes?.push(note)
  }
  const probe = new Uint8Array(Math.min(HEADER_PROBE_SIZE, file.size))
  file.pread(probe, 0)
  let header: Qcow2Header
  try {
    header = parseHeader(probe)
  } catch (err) {
    if (err instanceof Error && 'code' in err) {
      ;(err as Error).message = `'${imagePath}': ${(err as Error).message}`
    }
    throw err
  }
  const geometry = makeGeometry(header.clusterBits, headerFlags.extendedL2(header))
  const clusterSize = geometry.clusterSize
  const headerCluster = new Uint8Array(Math.min(clusterSize, file.size))
  file.pread(headerCluster, 0)
  let extensions: HeaderExtensions
  let backingFileName: string | undefined
  try {
    extensions = parseHeaderExtensions(header, headerCluster)
    checkIncompatibleFeatures(header, extensions)
    backingFileName = parseBackingFileName(header, headerCluster)
  } catch (err) {
    if (err instanceof Error) err.message = `'${imagePath}': ${err.message}`
    throw err
  }

  // Tables.
  const l1Bytes = header.l1Size * TABLE_ENTRY_SIZE
  if (l1Bytes > MAX_L1_TABLE_BYTES) throw corrupt(imagePath, `L1 table is too large (${header.l1Size} entries)`)
  if (header.l1Size < l1EntriesFor(geometry, header.virtualSize)) {
    throw corrupt(imagePath, `L1 table is too small for the virtual size (${header.l1Size} entries)`)
  }
  if (header.l1Size > 0) checkTable(imagePath, 'L1 table', header.l1TableOffset, l1Bytes, clusterSize, file.size)
  const refcountTableBytes = header.refcountTableClusters * clusterSize
  if (refcountTableBytes > MAX_REFCOUNT_TABLE_BYTES) {
    throw corrupt(imagePath, `refcount table is too large (${header.refcountTableClusters} clusters)`)
  }
  if (header.refcountTableClusters === 0) throw corrupt(imagePath, 'image has no refcount table')
  checkTable(imagePath, 'refcount table', header.refcountTableOffset, refcountTableBytes, clusterSize, file.size)
  if (header.snapshotCount > MAX_SNAPSHOTS) throw corrupt(imagePath, `too many snapshots (${header.snapshotCount})`)
  const { entries: snapshots, tableBytes: snapshotTableBytes } =
    header.snapshotCount > 0 ? readSnapshots(imagePath, file, header, clusterSize) : { entries: [], tableBytes: 0 }

  // Which L1 table and size to present.
  let l1TableOffset = header.l1TableOffset
  let l1Size = header.l1Size
  let virtualSize = header.virtualSize
  let snapshot: SnapshotEntry | undefined
  if (options.snapshot !== undefined) {
    snapshot = snapshots.find((s) => s.id === options.snapshot) ?? snapshots.find((s) => s.name === options.snapshot)
    if (snapshot === undefined) throw new NotFoundError(`'${imagePath}': snapshot '${options.snapshot}' not found`)
    l1TableOffset = snapshot.l1TableOffset
    l1Size = snapshot.l1Size
    virtualSize = snapshot.diskSize ?? header.virtualSize
    if (l1Size * TABLE_ENTRY_SIZE > MAX_L1_TABLE_BYTES) throw corrupt(imagePath, `snapshot '${snapshot.name}' L1 table is too large`)
    if (l1Size > 0) checkTable(imagePath, `snapshot '${snapshot.name}' L1 table`, l1TableOffset, l1Size * TABLE_ENTRY_SIZE, clusterSize, file.size)
    if (l1Size < l1EntriesFor(geometry, virtualSize)) throw corrupt(imagePath, `snapshot '${snapshot.name}' L1 table is too small`)
  }
  const l1Table = l1Size > 0 ? readExact(file, l1Size * TABLE_ENTRY_SIZE, l1TableOffset, imagePath, 'L1 table') : new Uint8Array(0)

  // External data file.
  let dataFile: BlockFile | undefined
  const externalDataFile = headerFlags.externalDataFile(header)
  if (externalDataFile) {
    if (extensions.dataFile === undefined) throw corrupt(imagePath, 'image needs an external data file but names none')
    const dataPath = resolveBackingPath(imagePath, extensions.dataFile)
    try {
      dataFile = NodeBlockFile.open(dataPath, { readOnly: true, lock: lockMode(options, true), readAhead: options.readAhead === true })
    } catch (err) {
      if (err instanceof NotFoundError) throw new NotFoundError(`'${imagePath}': data file '${extensions.dataFile}' not found (looked for '${dataPath}')`)
      throw err
    }
    opened.push(dataFile)
  }

  // Backing chain.
  let backing: ReadSource | undefined
  let backingFormat: 'qcow2' | 'raw' | undefined
  if (backingFileName !== undefined) {
    const backingFile = openBackingFile(imagePath, backingFileName, lockMode(options, true), options.readAhead === true)
    const backingPath = resolveBackingPath(imagePath, backingFileName)
    backingFormat = extensions.backingFormat !== undefined ? checkBackingFormat(extensions.backingFormat, backingFileName) : probeFormat(backingFile)
    if (backingFormat === 'raw') {
      backing = new RawSource(backingFile)
      opened.push(backing)
    } else {
      backingFile.close()
      const backingOptions: OpenOptions = { readOnly: true, readAhead: options.readAhead === true }
      if (options.lock !== undefined) backingOptions.lock = options.lock
      const image = Qcow2Image.openSync(backingPath, backingOptions, context)
      backing = {
        virtualSize: image.virtualSize,
        readSync: (b, o) => image.readSync(b, o),
        read: (b, o) => image.read(b, o),
        close: () => image.closeSync(),
      }
      opened.push(backing)
    }
    log.backing('%s: backing file %s (%s)', imagePath, backingPath, backingFormat)
  }

  const readOnly = options.readOnly !== false
  if (!readOnly) {
    checkWritable(imagePath, header, options)
    // Every write of a read-write open goes through the metadata overlap check.
    file = new MetadataOverlapGuard(file, clusterSize)
  }
  const l2Cache = new L2SliceCache(file, geometry, options.l2CacheBytes ?? DEFAULT_L2_CACHE_BYTES)
  const l1 = new L1Table(l1Table, l1Size, l1TableOffset, clusterSize)
  const mapper = new ClusterMapper(geometry, l1, l2Cache, { externalDataFile })
  const readPathOptions: ConstructorParameters<typeof ReadPath>[0] = {
    geometry,
    mapper,
    imageFile: file,
    dataFile: dataFile ?? file,
    compressionType: header.compressionType,
  }
  if (backing) readPathOptions.backing = backing
  const readPath = new ReadPath(readPathOptions)
  log.open('%s: v%d, %d-byte clusters, virtual size %d%s', imagePath, header.version, clusterSize, virtualSize, snapshot ? `, snapshot ${snapshot.id}` : '')
  return Qcow2Image.fromParts({
    path: path.resolve(imagePath),
    file,
    dataFile,
    header,
    extensions,
    geometry,
    virtualSize,
    backingFileName,
    backingFormat,
    backing,
    snapshots,
    snapshotTableBytes,
    snapshot,
    l1,
    l2Cache,
    readPath,
    readOnly,
    compress: options.compress,
  })
}

/** Refuses a read-write open of an image this version cannot keep valid, saying what to do. */
function checkWritable(imagePath: string, header: Qcow2Header, options: OpenOptions): void {
  if (options.snapshot !== undefined) {
    throw new InvalidRequestError(`'${imagePath}': snapshot '${options.snapshot}' can only be opened read-only`)
  }
  if (options.compress && header.compressionType !== COMPRESSION_TYPE_ZLIB && header.compressionType !== COMPRESSION_TYPE_ZSTD) {
    throw new UnsupportedFeatureError(`'${imagePath}': compression type ${header.compressionType} cannot be written`)
  }
  if (headerFlags.corrupt(header)) {
    throw new CorruptImageError(`'${imagePath}' is marked corrupt; open it read-only, or repair it with 'qemu-img check -r all'`)
  }
  if (headerFlags.dirty(header)) {
    // Only left set when the repair of the open could not fix everything.
    throw new UnsupportedFeatureError(
      `'${imagePath}' has the dirty bit set and corruptions its repair could not fix (see 'qcow2fs check'); open it read-only`,
    )
  }
  if (headerFlags.externalDataFile(header)) {
    throw new UnsupportedFeatureError(`'${imagePath}': writing images with an external data file is not supported; open it read-only`)
  }
}

/** Where the metadata of an image open read-write lives now, for the overlap check. */
function metadataLayout(
  header: Qcow2Header,
  l1: L1Table,
  refcounts: Refcounts,
  wanted: MutableHeader,
  snapshots: readonly SnapshotEntry[],
  snapshotTableBytes: number,
  clusterSize: number,
): MetadataLayout {
  return {
    version: () => [l1.layoutVersion, refcounts.layoutVersion, wanted.l1TableOffset, wanted.refcountTableOffset],
    *ranges() {
      yield { kind: 'header', hostOffset: 0, bytes: clusterSize }
      yield { kind: 'l1', hostOffset: l1.offset, bytes: l1.size * 8 }
      // The header still names the old tables until a moved table's header switch.
      if (wanted.l1TableOffset !== l1.offset) yield { kind: 'l1', hostOffset: wanted.l1TableOffset, bytes: wanted.l1Size * 8 }
      yield { kind: 'reftable', hostOffset: refcounts.tableOffset, bytes: refcounts.tableClusters * clusterSize }
      if (wanted.refcountTableOffset !== refcounts.tableOffset) {
        yield { kind: 'reftable', hostOffset: wanted.refcountTableOffset, bytes: wanted.refcountTableClusters * clusterSize }
      }
      for (const l2Offset of l1.l2Offsets()) yield { kind: 'l2', hostOffset: l2Offset, bytes: clusterSize }
      for (const blockOffset of refcounts.blockOffsets()) yield { kind: 'refblock', hostOffset: blockOffset, bytes: clusterSize }
      if (snapshotTableBytes > 0) yield { kind: 'snapshot-table', hostOffset: header.snapshotsOffset, bytes: snapshotTableBytes }
      for (const snapshot of snapshots) yield { kind: 'snapshot-l1', hostOffset: snapshot.l1TableOffset, bytes: snapshot.l1Size * 8 }
    },
  }
}

/** Reads the snapshot table, growing the read until every entry fits (bounded by QEMU's limit). */
function readSnapshots(imagePath: string, file: BlockFile, header: Qcow2Header, clusterSize: number): { entries: SnapshotEntry[]; tableBytes: number } {
  if (header.snapshotsOffset % clusterSize !== 0) {
    throw corrupt(imagePath, `snapshot table offset ${hex(header.snapshotsOffset)} is not cluster aligned`)
  }
  if (header.snapshotsOffset === 0 || header.snapshotsOffset >= file.size) {
    throw corrupt(imagePath, `snapshot table at ${hex(header.snapshotsOffset)} lies past the end of the file`)
  }
  const available = Math.min(MAX_SNAPSHOT_TABLE_BYTES, file.size - header.snapshotsOffset)
  let bytes = Math.min(available, Math.max(4096, header.snapshotCount * 128))
  for (;;) {
    const table = new Uint8Array(bytes)
    file.pread(table, header.snapshotsOffset)
    try {
      return parseSnapshotTableWithSize(table, header.snapshotCount)
    } catch (err) {
      if (bytes >= available) {
        throw corrupt(imagePath, (err as Error).message)
      }
      bytes = Math.min(available, bytes * 4)
    }
  }
}

/*
 * The allocation map of an image and its backing chain, in the terms of `qemu-img map`:
 * extents of the guest disk, each with the depth in the chain that answers it (0 = the image),
 * whether some layer allocates it (`present`), whether it reads as zeros (`zero`), whether a
 * layer holds data for it (`data`), and where that data lies in which file (`offset`,
 * `filename`). Adjacent extents that agree on all of that (offsets continuing) are merged, as
 * qemu-img merges them.
 *
 * How each layer answers follows QEMU's block status of qcow2 and raw nodes:
 *  - qcow2: runs of subclusters of the same type, within one L2 table (contiguous host
 *    clusters for allocated ones; compressed clusters one at a time). Normal, preallocated
 *    zero and "allocated but unallocated subcluster" entries have an offset; zero entries read
 *    as zero; normal and compressed ones hold data. A range no layer answers reads as zero at
 *    the depth where the chain ends (or where the backing file ends).
 *  - raw (a raw backing file): data, except the file's holes, which read as zero; both with
 *    their file offset. Holes are asked of the file system with lseek(SEEK_DATA/SEEK_HOLE) as
 *    QEMU asks (through lib/io/file-extents.ts); where that cannot be asked (the addon is not
 *    built, a file held in memory), 4 KiB blocks of zeros in a file that has holes at all are
 *    taken as its holes: right for files written sparsely, but written zeros count as holes.
 *  - a qcow2 image whose file holds much less than its refcounts claim (QEMU's test for
 *    preallocated metadata, made on the image file also when the data lies in an external data
 *    file) reports the holes inside its data clusters as zero too, as QEMU does: `"zero": true,
 *    "data": true`, split where a hole starts or ends. The file asked is the one holding the
 *    data: the image file, or the external data file (with or without data_file_raw). Any
 *    other image reports its data clusters as data, whatever the file holds there. An external
 *    data file is asked with lseek only; where that cannot be asked it is all data.
 *
 * Damage that QEMU's block status fails on (an unaligned L2 table or data cluster, an invalid
 * subcluster bitmap, zero clusters in a version 2 image, compressed clusters with an external
 * data file) fails the map with CorruptImageError.
 */
import * as path from 'node:path'
import { CorruptImageError, NotFoundError } from '../errors.js'
import { MAX_BACKING_CHAIN_DEPTH, QCOW_VERSION_3, SECTOR_SIZE, SUBCLUSTERS_PER_CLUSTER, TABLE_ENTRY_SIZE } from '../format/constants.js'
import { parseBackingFileName } from '../format/header.js'
import { hex } from '../format/int64.js'
import { SubclusterType, l2EntryHostOffset, subclusterRangeMask, subclusterTypeOf } from '../format/l2-entry.js'
import { l1EntryL2Offset } from '../format/l1-entry.js'
import { countTrailingZeros32 } from '../format/int64.js'
import { type BlockFile, type LockMode, NodeBlockFile } from '../io/block-file.js'
import { type ChainContext, checkBackingFormat, enterChain, probeFormat, resolveBackingPath } from '../engine/backing.js'
import { type ImageLayout, readImageLayout, readPadded } from './layout.js'
import { OnDiskRefcounts } from './on-disk-refcounts.js'

/** One extent of `qemu-img map --output=json`, plus the file name the human format prints. */
export interface MapEntry {
  start: number
  length: number
  depth: number
  present: boolean
  zero: boolean
  data: boolean
  /** Host offset of the extent in `filename` (absent for unallocated and compressed ranges). */
  offset?: number
  /** The file holding the extent, named as qemu-img names it; present exactly with `offset`. */
  filename?: string
}

/** qemu-img map asks for at most 1 GiB at a time (the merge makes this invisible). */
const MAP_CHUNK_BYTES = 1024 * 1024 * 1024
/** Hole detection granularity in raw files: a common file system block. */
const HOLE_BLOCK_BYTES = 4096
/** Raw file bytes read at once while looking for holes. */
const HOLE_SCAN_CHUNK_BYTES = 1024 * 1024
/** L2 tables kept by the map walk. */
const L2_CACHE_TABLES = 16

/** One layer's answer for the start of a range (QEMU's block status flags). */
interface LayerStatus {
  bytes: number
  data: boolean
  zero: boolean
  allocated: boolean
  offset?: number
  filename?: string
}

interface Layer {
  /** The guest length QEMU gives the layer (whole 512-byte sectors). */
  readonly length: number
  /**
   * How many extents this layer can contribute to a map, at most, when its tables are sound
   * (each L1 entry, each subcluster run of an L2 entry in the file, each 4 KiB block).
   */
  readonly extentBound: number
  readonly backing: Layer | undefined
  status(guestOffset: number, bytes: number): LayerStatus
  close(): void
}

/**
 * Where a file holds data and where it has holes: asked of the file system (lseek SEEK_DATA /
 * SEEK_HOLE, as QEMU does) when the file can be asked. Otherwise guessed from zero blocks (see
 * the header), unless `guess` is false: then the file is all data, QEMU's answer where the file
 * system cannot tell.
 */
export class FileExtents {
  readonly #file: BlockFile
  readonly #guessHoles: boolean
  #hasHoles: boolean | undefined
  #chunkStart = -1
  #chunk: Uint8Array = new Uint8Array(0)

  constructor(file: BlockFile, options: { guess?: boolean } = {}) {
    this.#file = file
    this.#guessHoles = options.guess !== false
  }

  #blockIsZero(block: number): boolean {
    const start = block * HOLE_BLOCK_BYTES
    if (this.#chunkStart < 0 || start < this.#chunkStart || start >= this.#chunkStart + this.#chunk.length) {
      this.#chunkStart = Math.floor(start / HOLE_SCAN_CHUNK_BYTES) * HOLE_SCAN_CHUNK_BYTES
      this.#chunk = readPadded(this.#file, this.#chunkStart, Math.min(HOLE_SCAN_CHUNK_BYTES, Math.max(0, this.#file.size - this.#chunkStart)))
    }
    const from = start - this.#chunkStart
    const to = Math.min(from + HOLE_BLOCK_BYTES, this.#chunk.length)
    for (let i = from; i < to; i++) if (this.#chunk[i] !== 0) return false
    return true
  }

  /**
   * The extent at hostOffset (< file size), up to `limit`: whether it is a hole, and where it
   * ends (a hole that runs to the end of the file is reported as ending at `limit`, like QEMU's
   * trailing hole).
   */
  extentAt(hostOffset: number, limit: number): { hole: boolean; end: number } {
    const asked = this.#file.extentAt?.(hostOffset)
    if (asked !== undefined) return { hole: asked.hole, end: Math.min(asked.end, limit) }
    if (!this.#guessHoles) return { hole: false, end: limit }
    return this.#guess(hostOffset, limit)
  }

  /** Without lseek: 4 KiB blocks of zeros are the holes, in a file that has holes at all. */
  #guess(hostOffset: number, limit: number): { hole: boolean; end: number } {
    const size = this.#file.size
    this.#hasHoles ??= this.#file.allocatedBytes() < Math.ceil(size / HOLE_BLOCK_BYTES) * HOLE_BLOCK_BYTES
    if (!this.#hasHoles) return { hole: false, end: Math.min(size, limit) }
    let block = Math.floor(hostOffset / HOLE_BLOCK_BYTES)
    const hole = this.#blockIsZero(block)
    for (;;) {
      block++
      const end = block * HOLE_BLOCK_BYTES
      if (end >= size) return { hole, end: hole ? limit : Math.min(size, limit) }
      if (end >= limit) return { hole, end: limit }
      if (this.#blockIsZero(block) !== hole) return { hole, end }
    }
  }
}

/**
 * Block status of a file node (QEMU's file-posix with want_zero): data or zero extents of the
 * file, clamped to its length rounded up to whole sectors; past the end, nothing (EOF).
 */
function fileStatus(file: BlockFile, extents: FileExtents, hostOffset: number, bytes: number): { bytes: number; zero: boolean; eof: boolean } {
  const length = Math.ceil(file.size / SECTOR_SIZE) * SECTOR_SIZE
  if (hostOffset >= length) return { bytes: 0, zero: false, eof: true }
  const limit = hostOffset + Math.min(bytes, length - hostOffset)
  let result: { bytes: number; zero: boolean }
  if (hostOffset >= file.size) {
    result = { bytes: limit - hostOffset, zero: true }
  } else {
    const extent = extentAtLimited(extents, hostOffset, limit)
    result = { bytes: extent.end - hostOffset, zero: extent.hole }
  }
  return { ...result, eof: hostOffset + result.bytes === length }
}

function extentAtLimited(extents: FileExtents, hostOffset: number, limit: number): { hole: boolean; end: number } {
  const extent = extents.extentAt(hostOffset, limit)
  return { hole: extent.hole, end: Math.min(extent.end, limit) }
}

/** A raw backing file: its data and holes, with their file offsets. */
class RawLayer implements Layer {
  readonly length: number
  readonly extentBound: number
  readonly backing = undefined
  readonly #file: BlockFile
  readonly #filename: string
  readonly #extents: FileExtents

  constructor(file: BlockFile, filename: string) {
    this.#file = file
    this.#filename = filename
    this.length = Math.ceil(file.size / SECTOR_SIZE) * SECTOR_SIZE
    this.extentBound = Math.ceil(file.size / HOLE_BLOCK_BYTES) + 2
    this.#extents = new FileExtents(file)
  }

  status(guestOffset: number, bytes: number): LayerStatus {
    const s = fileStatus(this.#file, this.#extents, guestOffset, bytes)
    return { bytes: s.bytes, data: !s.zero, zero: s.zero, allocated: true, offset: guestOffset, filename: this.#filename }
  }

  close(): void {
    this.#file.close()
  }
}

/** The qcow2 name of a file next to `base`, as QEMU combines them (path_combine). */
function combinePath(base: string, name: string): string {
  if (path.isAbsolute(name)) return name
  const slash = base.lastIndexOf('/')
  return slash < 0 ? name : base.slice(0, slash + 1) + name
}

class Qcow2Layer implements Layer {
  readonly length: number
  readonly extentBound: number
  readonly backing: Layer | undefined
  readonly #file: BlockFile
  readonly #filename: string
  readonly #layout: ImageLayout
  readonly #l1: Uint8Array
  readonly #dataFile: BlockFile | undefined
  readonly #dataFilename: string | undefined
  readonly #l2Cache = new Map<number, Uint8Array>()
  #metadataPreallocation: boolean | undefined
  #fileExtents: FileExtents | undefined

  constructor(init: {
    file: BlockFile
    filename: string
    layout: ImageLayout
    dataFile: BlockFile | undefined
    dataFilename: string | undefined
    backing: Layer | undefined
  }) {
    this.#file = init.file
    this.#filename = init.filename
    this.#layout = init.layout
    this.#dataFile = init.dataFile
    this.#dataFilename = init.dataFilename
    this.backing = init.backing
    const h = init.layout.header
    this.length = Math.floor(h.virtualSize / SECTOR_SIZE) * SECTOR_SIZE
    this.#l1 = readPadded(init.file, h.l1TableOffset, h.l1Size * TABLE_ENTRY_SIZE)
    const entriesInFile = Math.ceil(init.file.size / init.layout.geometry.l2EntrySize)
    const perEntry = init.layout.geometry.extendedL2 ? SUBCLUSTERS_PER_CLUSTER : 1
    this.extentBound = 2 * h.l1Size + perEntry * entriesInFile + Math.ceil(init.file.size / HOLE_BLOCK_BYTES) + 2
  }

  close(): void {
    this.backing?.close()
    this.#dataFile?.close()
    this.#file.close()
  }

  #corrupt(message: string): CorruptImageError {
    return new CorruptImageError(`'${this.#filename}': ${message}`)
  }

  #l2Table(l2Offset: number): Uint8Array {
    let table = this.#l2Cache.get(l2Offset)
    if (table) return table
    table = readPadded(this.#file, l2Offset, this.#layout.geometry.clusterSize)
    if (this.#l2Cache.size >= L2_CACHE_TABLES) this.#l2Cache.delete(this.#l2Cache.keys().next().value!)
    this.#l2Cache.set(l2Offset, table)
    return table
  }

  /**
   * QEMU's metadata preallocation test: the image's clusters with a refcount clearly
   * outnumber the clusters the file occupies on the host.
   */
  #hasMetadataPreallocation(): boolean {
    if (this.#metadataPreallocation !== undefined) return this.#metadataPreallocation
    const g = this.#layout.geometry
    const realClusters = Math.floor(this.#file.allocatedBytes() / g.clusterSize)
    const threshold = Math.max(Math.floor((realClusters * 10) / 9), realClusters + 2)
    const refcounts = new OnDiskRefcounts(this.#file, g, this.#layout.refcountTable, this.#layout.header.refcountOrder)
    const endCluster = Math.ceil(this.#file.size / g.clusterSize)
    let used = 0
    let readable = true
    for (let cluster = 0; cluster < endCluster && used < threshold; cluster++) {
      const refcount = refcounts.get(cluster)
      if (refcount === undefined) {
        readable = false
        break
      }
      if (refcount !== 0) used++
    }
    this.#metadataPreallocation = readable && used >= threshold
    return this.#metadataPreallocation
  }

  /** Type and length of the subcluster run at guestOffset (QEMU's qcow2_get_host_offset). */
  #run(guestOffset: number, bytes: number): { bytes: number; type: SubclusterType; hostOffset: number } {
    const g = this.#layout.geometry
    const cs = g.clusterSize
    const offsetInCluster = guestOffset % cs
    const l2Index = Math.floor(guestOffset / cs) % g.l2Entries
    const bytesNeeded = Math.min(bytes + offsetInCluster, (g.l2Entries - l2Index) * cs)
    const l1Index = Math.floor(guestOffset / g.l2CoverageBytes)
    const l2Offset =
      l1Index < this.#layout.header.l1Size
        ? l1EntryL2Offset(new DataView(this.#l1.buffer).getUint32(l1Index * 8), new DataView(this.#l1.buffer).getUint32(l1Index * 8 + 4))
        : 0
    if (l2Offset === 0) return { bytes: bytesNeeded - offsetInCluster, type: SubclusterType.UNALLOCATED_PLAIN, hostOffset: 0 }
    if (l2Offset % cs !== 0) throw this.#corrupt(`L2 table offset ${hex(l2Offset)} unaligned (L1 index ${hex(l1Index)})`)
    const view = new DataView(this.#l2Table(l2Offset).buffer)
    const externalDataFile = this.#layout.externalDataFile
    const scIndex = Math.floor(offsetInCluster / g.subclusterSize)
    const entry = (index: number) => {
      const at = index * g.l2EntrySize
      return {
        hi: view.getUint32(at),
        lo: view.getUint32(at + 4),
        zeroBits: g.extendedL2 ? view.getUint32(at + 8) : 0,
        allocBits: g.extendedL2 ? view.getUint32(at + 12) : 0,
      }
    }
    const first = entry(l2Index)
    const type = subclusterTypeOf(first.hi, first.lo, first.zeroBits, first.allocBits, scIndex, g.extendedL2, externalDataFile)
    const where = `L2 offset ${hex(l2Offset)}, L2 index ${hex(l2Index)}`
    if (this.#layout.header.version < QCOW_VERSION_3 && (type === SubclusterType.ZERO_PLAIN || type === SubclusterType.ZERO_ALLOC)) {
      throw this.#corrupt(`zero cluster entry found in a version 2 image (${where})`)
    }
    let hostOffset = 0
    if (type === SubclusterType.COMPRESSED && externalDataFile) {
      throw this.#corrupt(`compressed cluster entry found in an image with an external data file (${where})`)
    }
    if (type === SubclusterType.NORMAL || type === SubclusterType.ZERO_ALLOC || type === SubclusterType.UNALLOCATED_ALLOC) {
      const hostClusterOffset = l2EntryHostOffset(first.hi, first.lo)
      hostOffset = hostClusterOffset + offsetInCluster
      if (hostClusterOffset % cs !== 0) throw this.#corrupt(`cluster allocation offset ${hex(hostClusterOffset)} unaligned (${where})`)
      if (externalDataFile && hostOffset !== guestOffset) {
        throw this.#corrupt(`external data file host cluster offset ${hex(hostClusterOffset)} does not match guest cluster offset ${hex(guestOffset - offsetInCluster)}`)
      }
    }
    // Count subclusters of the same type (and contiguous host clusters) from here on.
    const clusters = Math.ceil(bytesNeeded / cs)
    const perCluster = g.extendedL2 ? SUBCLUSTERS_PER_CLUSTER : 1
    let count = 0
    let expectedType: SubclusterType = type
    let expectedOffset = 0
    let checkOffset = false
    for (let i = 0; i < clusters; i++) {
      const firstSc = i === 0 ? scIndex : 0
      const e = i === 0 ? first : entry(l2Index + i)
      const runType = subclusterTypeOf(e.hi, e.lo, e.zeroBits, e.allocBits, firstSc, g.extendedL2, externalDataFile)
      if (runType === SubclusterType.INVALID) throw this.#corrupt(`invalid cluster entry found (L2 offset ${hex(l2Offset)}, L2 index ${hex(l2Index + i)})`)
      const n = subclustersOfType(runType, e.zeroBits, e.allocBits, firstSc, g.extendedL2, perCluster)
      if (i === 0) {
        if (runType === SubclusterType.COMPRESSED) {
          count = n
          break
        }
        expectedType = runType
        expectedOffset = l2EntryHostOffset(e.hi, e.lo)
        checkOffset = runType === SubclusterType.NORMAL || runType === SubclusterType.ZERO_ALLOC || runType === SubclusterType.UNALLOCATED_ALLOC
      } else if (runType !== expectedType) {
        break
      } else if (checkOffset) {
        expectedOffset += cs
        if (expectedOffset !== l2EntryHostOffset(e.hi, e.lo)) break
      }
      count += n
      if (firstSc + n < perCluster) break
    }
    const available = Math.min((count + scIndex) * g.subclusterSize, bytesNeeded)
    return { bytes: available - offsetInCluster, type, hostOffset }
  }

  status(guestOffset: number, bytes: number): LayerStatus {
    const run = this.#run(guestOffset, Math.min(bytes, this.length - guestOffset))
    const { type } = run
    const offsetValid = type === SubclusterType.NORMAL || type === SubclusterType.ZERO_ALLOC || type === SubclusterType.UNALLOCATED_ALLOC
    let zero = type === SubclusterType.ZERO_PLAIN || type === SubclusterType.ZERO_ALLOC
    const data = !zero && type !== SubclusterType.UNALLOCATED_PLAIN && type !== SubclusterType.UNALLOCATED_ALLOC
    const allocated = data || zero
    let length = run.bytes
    if (!allocated) {
      if (this.backing === undefined || guestOffset >= this.backing.length) zero = true
    }
    const status: LayerStatus = { bytes: length, data, zero, allocated }
    if (offsetValid) {
      status.offset = run.hostOffset
      status.filename = this.#dataFile ? this.#dataFilename! : this.#filename
    }
    if (data && !zero && offsetValid && this.#hasMetadataPreallocation()) {
      // QEMU's BDRV_BLOCK_RECURSE: the data cluster may be a hole of the file holding it (the
      // image file, or the external data file), so that file is asked. An external data file
      // is asked only with lseek, never guessed from zero blocks: written zeros there are data.
      const holder = this.#dataFile ?? this.#file
      this.#fileExtents ??= new FileExtents(holder, { guess: this.#dataFile === undefined })
      const f = fileStatus(holder, this.#fileExtents, run.hostOffset, length)
      if (f.eof && (f.bytes === 0 || f.zero)) {
        status.zero = true
      } else {
        length = f.bytes
        status.bytes = length
        status.zero = f.zero
      }
    }
    return status
  }
}

/** Number of subclusters from `from` on that share the type of subcluster `from`. */
function subclustersOfType(type: SubclusterType, zeroBits: number, allocBits: number, from: number, extendedL2: boolean, perCluster: number): number {
  if (!extendedL2 || type === SubclusterType.COMPRESSED) return perCluster - from
  const below = subclusterRangeMask(0, from)
  switch (type) {
    case SubclusterType.NORMAL:
      return countTrailingZeros32(~(allocBits | below)) - from
    case SubclusterType.ZERO_PLAIN:
    case SubclusterType.ZERO_ALLOC:
      return countTrailingZeros32(~(zeroBits | below)) - from
    default:
      return countTrailingZeros32((zeroBits | allocBits) & ~below) - from
  }
}

/** Opens IMAGE and its backing chain read-only as map layers (QEMU's open checks apply). */
function openLayer(imagePath: string, displayName: string, context: ChainContext | undefined, lock: LockMode): Layer {
  const chain = enterChain(context, imagePath, MAX_BACKING_CHAIN_DEPTH)
  const file = NodeBlockFile.open(imagePath, { readOnly: true, lock })
  const opened: { close(): void }[] = [file]
  try {
    const layout = readImageLayout(file, displayName)
    let dataFile: BlockFile | undefined
    let dataFilename: string | undefined
    if (layout.externalDataFile) {
      const name = layout.extensions.dataFile
      if (name === undefined) throw new CorruptImageError(`'${displayName}': image needs an external data file but names none`)
      const dataPath = resolveBackingPath(imagePath, name)
      try {
        dataFile = NodeBlockFile.open(dataPath, { readOnly: true, lock })
      } catch (err) {
        if (err instanceof NotFoundError) throw new NotFoundError(`'${displayName}': data file '${name}' not found (looked for '${dataPath}')`)
        throw err
      }
      opened.push(dataFile)
      dataFilename = combinePath(displayName, name)
    }
    let backing: Layer | undefined
    const headerCluster = readPadded(file, 0, Math.min(layout.geometry.clusterSize, file.size))
    const backingName = parseBackingFileName(layout.header, headerCluster)
    if (backingName !== undefined) {
      const backingPath = resolveBackingPath(imagePath, backingName)
      const backingDisplay = combinePath(displayName, backingName)
      let backingFile: BlockFile
      try {
        backingFile = NodeBlockFile.open(backingPath, { readOnly: true, lock })
      } catch (err) {
        if (err instanceof NotFoundError) {
          throw new NotFoundError(`backing file '${backingName}' of '${displayName}' not found (looked for '${backingPath}')`)
        }
        throw err
      }
      const format =
        layout.extensions.backingFormat !== undefined ? checkBackingFormat(layout.extensions.backingFormat, backingName) : probeFormat(backingFile)
      if (format === 'raw') {
        backing = new RawLayer(backingFile, backingDisplay)
      } else {
        backingFile.close()
        backing = openLayer(backingPath, backingDisplay, chain, lock)
      }
      opened.push(backing)
    }
    return new Qcow2Layer({ file, filename: displayName, layout, dataFile, dataFilename, backing })
  } catch (err) {
    for (const f of opened.reverse()) f.close()
    throw err
  }
}

/** One extent: the first layer from the top that allocates it, or zero where the chain ends. */
function blockStatus(top: Layer, guestOffset: number, bytes: number): MapEntry {
  let layer = top
  let depth = 0
  for (;;) {
    const s = layer.status(guestOffset, bytes)
    bytes = s.bytes
    if (s.data || s.zero || layer.backing === undefined) {
      const entry: MapEntry = { start: guestOffset, length: bytes, depth, present: s.allocated, zero: s.zero, data: s.data }
      if (s.offset !== undefined) {
        entry.offset = s.offset
        entry.filename = s.filename!
      }
      return entry
    }
    layer = layer.backing
    depth++
  }
}

function mergeable(curr: MapEntry, next: MapEntry): boolean {
  if (curr.length === 0) return false
  if (curr.zero !== next.zero || curr.data !== next.data || curr.depth !== next.depth || curr.present !== next.present) return false
  if ((curr.offset === undefined) !== (next.offset === undefined)) return false
  if (curr.filename !== next.filename) return false
  return curr.offset === undefined || curr.offset + curr.length === next.offset
}

/**
 * The allocation map of the image at `imagePath` (`displayName`: the name as the user gave it,
 * used for file names in the map, as qemu-img uses it). Every file of the chain is opened
 * read-only with QEMU's read lock, unless `lock` is false.
 */
export function mapImage(imagePath: string, displayName = imagePath, options: { lock?: boolean } = {}): MapEntry[] {
  const top = openLayer(imagePath, displayName, undefined, options.lock === false ? 'none' : 'read')
  try {
    // Sound tables give at most this many extents; more means L2 tables shared between L1
    // entries (a damaged or hostile image), which would make the walk run for hours.
    let stepsLeft = 1000
    for (let layer: Layer | undefined = top; layer !== undefined; layer = layer.backing) stepsLeft += 2 * layer.extentBound
    const entries: MapEntry[] = []
    let curr: MapEntry = { start: 0, length: 0, depth: 0, present: false, zero: false, data: false }
    while (curr.start + curr.length < top.length) {
      const guestOffset = curr.start + curr.length
      const next = blockStatus(top, guestOffset, Math.min(MAP_CHUNK_BYTES, top.length - guestOffset))
      if (next.length <= 0) throw new CorruptImageError(`'${displayName}': no progress mapping offset ${guestOffset}`)
      if (--stepsLeft < 0) {
        throw new CorruptImageError(`'${displayName}': its L2 tables are referenced more often than its files can hold; the map stops at offset ${guestOffset}`)
      }
      if (mergeable(curr, next)) {
        curr.length += next.length
        continue
      }
      if (curr.length > 0) entries.push(curr)
      curr = next
    }
    entries.push(curr)
    return entries
  } finally {
    top.close()
  }
}

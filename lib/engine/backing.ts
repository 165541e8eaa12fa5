/*
 * Backing files: raw or qcow2, resolved the way QEMU resolves them.
 *
 * Design notes:
 *  - A relative backing name is resolved against the directory of the image that names it
 *    (not the current directory), so chains keep working when moved together.
 *  - The format comes from the backing format extension when present; otherwise it is probed
 *    (qcow2 magic -> qcow2, anything else -> raw), as QEMU does for old images.
 *  - A chain deeper than MAX_BACKING_CHAIN_DEPTH, or one that names a file already in the
 *    chain, is refused at open.
 *  - Past the end of a backing file (raw: its length; qcow2: its virtual size) reads are zeros.
 *  - Backing files are always opened read-only, with a read lock (shared with other readers).
 */
import * as path from 'node:path'
import { CorruptImageError, NotFoundError, UnsupportedFeatureError } from '../errors.js'
import { QCOW_MAGIC } from '../format/constants.js'
import { type BlockFile, type LockMode, NodeBlockFile, realPathOf } from '../io/block-file.js'

/** Something guest bytes can be read from: a raw file or an opened qcow2 image. */
export interface ReadSource {
  readonly virtualSize: number
  /** Fills buf with bytes from guestOffset; bytes past virtualSize read as zeros. */
  readSync(buf: Uint8Array, guestOffset: number): void
  /** readSync, but waiting for bytes being read ahead rather than reading them again. */
  read?(buf: Uint8Array, guestOffset: number): Promise<void>
  close(): void
}

/** A raw file used as a backing file (or data source): zeros past its end. */
export class RawSource implements ReadSource {
  #file: BlockFile
  constructor(file: BlockFile) {
    this.#file = file
  }
  get virtualSize(): number {
    return this.#file.size
  }
  readSync(buf: Uint8Array, guestOffset: number): void {
    const available = Math.max(0, Math.min(buf.length, this.#file.size - guestOffset))
    let n = 0
    if (available > 0) n = this.#file.pread(buf.subarray(0, available), guestOffset)
    if (n < buf.length) buf.fill(0, n)
  }
  async read(buf: Uint8Array, guestOffset: number): Promise<void> {
    const available = Math.max(0, Math.min(buf.length, this.#file.size - guestOffset))
    const arriving = available > 0 ? this.#file.whenReadable?.(guestOffset, available) : undefined
    if (arriving !== undefined) await arriving
    this.readSync(buf, guestOffset)
  }
  close(): void {
    this.#file.close()
  }
}

/** Where a backing name points, relative names taken from the naming image's directory. */
export function resolveBackingPath(imagePath: string, backingName: string): string {
  if (backingName.includes('\0')) {
    throw new CorruptImageError(`the backing file name of '${imagePath}' contains a NUL byte`)
  }
  if (/^[a-z][a-z0-9+.-]*:/i.test(backingName) && !backingName.startsWith('file:')) {
    throw new UnsupportedFeatureError(`backing file '${backingName}' uses a protocol qcow2fs does not support`)
  }
  const name = backingName.startsWith('file:') ? backingName.slice('file:'.length) : backingName
  return path.isAbsolute(name) ? name : path.resolve(path.dirname(imagePath), name)
}

/**
 * Opens a backing file for reading, checking it exists first (for a clear message), with the
 * read lock every user of a backing file shares ('none': no lock), reading ahead when asked
 * (lib/io/read-ahead.ts).
 */
export function openBackingFile(imagePath: string, backingName: string, lock: LockMode = 'read', readAhead = false): BlockFile {
  const backingPath = resolveBackingPath(imagePath, backingName)
  try {
    return NodeBlockFile.open(backingPath, { readOnly: true, lock, readAhead })
  } catch (err) {
    if (err instanceof NotFoundError) {
      throw new NotFoundError(`backing file '${backingName}' of '${imagePath}' not found (looked for '${backingPath}')`)
    }
    throw err
  }
}

/** 'qcow2' or 'raw' for a file whose format the image does not state. */
export function probeFormat(file: BlockFile): 'qcow2' | 'raw' {
  const magic = new Uint8Array(4)
  if (file.pread(magic, 0) === 4 && new DataView(magic.buffer).getUint32(0) === QCOW_MAGIC) return 'qcow2'
  return 'raw'
}

/** Validates a backing format name; only qcow2 and raw are supported. */
export function checkBackingFormat(format: string, backingName: string): 'qcow2' | 'raw' {
  if (format === 'qcow2' || format === 'raw') return format
  throw new UnsupportedFeatureError(`backing file '${backingName}' has format '${format}'; only qcow2 and raw are supported`)
}

/** Chain state passed down while opening nested backing files. */
export interface ChainContext {
  /** Real paths of the images already open above this one. */
  seen: Set<string>
  depth: number
}

export function enterChain(context: ChainContext | undefined, imagePath: string, maxDepth: number): ChainContext {
  const realPath = realPathOf(imagePath)
  const seen = new Set(context?.seen ?? [])
  if (seen.has(realPath)) {
    throw new CorruptImageError(`backing chain loops: '${imagePath}' is its own backing file`)
  }
  const depth = (context?.depth ?? -1) + 1
  if (depth > maxDepth) throw new CorruptImageError(`backing chain is deeper than ${maxDepth} images`)
  seen.add(realPath)
  return { seen, depth }
}

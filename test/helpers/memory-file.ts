/*
 * MemoryBlockFile: a BlockFile held in memory, for tests that run the engine without touching
 * the host file (the image bytes stay in hand for replay and comparison).
 *
 *   MemoryBlockFile.fromBytes(path, bytes)        a writable copy of bytes
 *   MemoryBlockFile.fromFile(path)                a writable copy of a file's bytes
 *   file.bytes()                                  the current content (a copy)
 *   file.readOnlyView()                           a read-only BlockFile on the same storage:
 *                                                 later writes to `file` show through it
 *   file.syncCount                                how many times sync() was called
 *
 * Semantics follow NodeBlockFile: pread is short only at the end of the file, pwrite grows the
 * file (a gap reads as zeros), truncate sets the length, and nothing works after close().
 */
import * as fs from 'node:fs'
import type { BlockFile, WriteTag } from '../../lib/io/block-file.js'

/** The bytes and the length, shared by a file and its read-only views. */
class Storage {
  bytes: Uint8Array
  length: number

  constructor(bytes: Uint8Array, length: number) {
    this.bytes = bytes
    this.length = length
  }

  /** Makes room for `length` bytes (capacity grows by doubling); bytes past length stay zero. */
  reserve(length: number): void {
    if (length <= this.bytes.length) return
    const next = new Uint8Array(Math.max(length, this.bytes.length * 2, 4096))
    next.set(this.bytes.subarray(0, this.length))
    this.bytes = next
  }

  read(buf: Uint8Array, hostOffset: number): number {
    if (hostOffset >= this.length) return 0
    const n = Math.min(buf.length, this.length - hostOffset)
    buf.set(this.bytes.subarray(hostOffset, hostOffset + n))
    return n
  }

  write(buf: Uint8Array, hostOffset: number): void {
    const end = hostOffset + buf.length
    this.reserve(end)
    this.bytes.set(buf, hostOffset)
    if (end > this.length) this.length = end
  }

  truncate(length: number): void {
    if (length < this.length) {
      // Bytes past the new end must read as zeros if the file grows again.
      this.bytes.fill(0, length, this.length)
    } else {
      this.reserve(length)
    }
    this.length = length
  }
}

function checkOffset(hostOffset: number, what: string): void {
  if (!Number.isSafeInteger(hostOffset) || hostOffset < 0) throw new RangeError(`${what}: invalid host offset ${hostOffset}`)
}

export class MemoryBlockFile implements BlockFile {
  readonly path: string
  readonly writable: boolean
  #storage: Storage
  #closed = false
  #syncs = 0

  private constructor(path: string, storage: Storage, writable: boolean) {
    this.path = path
    this.#storage = storage
    this.writable = writable
  }

  /** A writable (unless readOnly) in-memory file holding a copy of `bytes`. */
  static fromBytes(path: string, bytes: Uint8Array, options: { readOnly?: boolean } = {}): MemoryBlockFile {
    const copy = new Uint8Array(bytes.length)
    copy.set(bytes)
    return new MemoryBlockFile(path, new Storage(copy, bytes.length), options.readOnly !== true)
  }

  /** An in-memory copy of the file at `path`, named after it. */
  static fromFile(path: string, options: { readOnly?: boolean } = {}): MemoryBlockFile {
    return MemoryBlockFile.fromBytes(path, fs.readFileSync(path), options)
  }

  /** A read-only file on the same storage (it sees every later write to this one). */
  readOnlyView(path: string = this.path): MemoryBlockFile {
    return new MemoryBlockFile(path, this.#storage, false)
  }

  get size(): number {
    return this.#storage.length
  }

  /** Calls to sync() so far. */
  get syncCount(): number {
    return this.#syncs
  }

  get closed(): boolean {
    return this.#closed
  }

  /** A copy of the current content. */
  bytes(): Uint8Array {
    return this.#storage.bytes.slice(0, this.#storage.length)
  }

  pread(buf: Uint8Array, hostOffset: number): number {
    this.#checkOpen('pread')
    checkOffset(hostOffset, 'pread')
    return this.#storage.read(buf, hostOffset)
  }

  pwrite(buf: Uint8Array, hostOffset: number, _tag: WriteTag): void {
    this.#checkWritable('pwrite')
    checkOffset(hostOffset, 'pwrite')
    this.#storage.write(buf, hostOffset)
  }

  sync(): void {
    this.#checkWritable('sync')
    this.#syncs++
  }

  truncate(size: number): void {
    this.#checkWritable('truncate')
    checkOffset(size, 'truncate')
    this.#storage.truncate(size)
  }

  /** The length rounded up to 4 KiB blocks, as a file without holes would occupy. */
  allocatedBytes(): number {
    return Math.ceil(this.#storage.length / 4096) * 4096
  }

  close(): void {
    this.#closed = true
  }

  #checkOpen(what: string): void {
    if (this.#closed) throw new Error(`${what} on closed in-memory file '${this.path}'`)
  }

  #checkWritable(what: string): void {
    this.#checkOpen(what)
    if (!this.writable) throw new Error(`${what} on read-only in-memory file '${this.path}'`)
  }
}

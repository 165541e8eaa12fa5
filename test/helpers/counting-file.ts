/*
 * A BlockFile wrapper that counts what is written through it: the bytes per write tag (data,
 * cow, metadata kinds), so tests can see copy-on-write or its absence; every write in order
 * (offset, length, tag); and the syncs. A test can make the writes of one tag fail.
 */
import type { BlockFile, WriteTag } from '../../lib/io/block-file.js'

/** One write that went through a CountingFile: where, how many bytes, with which tag. */
export interface CountedWrite {
  hostOffset: number
  bytes: number
  tag: WriteTag
}

/** A BlockFile that counts the bytes written per tag, lists every write and counts syncs. */
export class CountingFile implements BlockFile {
  /** Bytes written per tag. */
  readonly written = new Map<WriteTag, number>()
  /** Every write, in order. */
  readonly writes: CountedWrite[] = []
  syncs = 0
  /** When set, a write with this tag throws `failure` (and is neither counted nor passed on). */
  failOn: { tag: WriteTag; failure: Error } | undefined
  constructor(private readonly inner: BlockFile) {}
  get path(): string {
    return this.inner.path
  }
  get size(): number {
    return this.inner.size
  }
  get writable(): boolean {
    return this.inner.writable
  }
  pread(buf: Uint8Array, hostOffset: number): number {
    return this.inner.pread(buf, hostOffset)
  }
  pwrite(buf: Uint8Array, hostOffset: number, tag: WriteTag): void {
    if (this.failOn && this.failOn.tag === tag) throw this.failOn.failure
    this.written.set(tag, (this.written.get(tag) ?? 0) + buf.length)
    this.writes.push({ hostOffset, bytes: buf.length, tag })
    this.inner.pwrite(buf, hostOffset, tag)
  }
  sync(): void {
    this.syncs++
    this.inner.sync()
  }
  truncate(size: number): void {
    this.inner.truncate(size)
  }
  allocatedBytes(): number {
    return this.inner.allocatedBytes()
  }
  close(): void {
    this.inner.close()
  }
}

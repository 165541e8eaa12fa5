/*
 * A BlockFile wrapper that counts the bytes written per write tag (data, cow, metadata kinds),
 * so tests can see copy-on-write, or its absence.
 */
import type { BlockFile, WriteTag } from '../../lib/io/block-file.js'

/** A BlockFile that counts the bytes written per tag (to see COW, or its absence). */
export class CountingFile implements BlockFile {
  readonly written = new Map<WriteTag, number>()
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
    this.written.set(tag, (this.written.get(tag) ?? 0) + buf.length)
    this.inner.pwrite(buf, hostOffset, tag)
  }
  sync(): void {
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

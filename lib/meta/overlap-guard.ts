/*
 * The metadata overlap check (QEMU calls its own "overlap-check"): a BlockFile wrapper, put
 * around the image file of a read-write open, that refuses any write which would land on
 * metadata of another kind: guest data over the header, an L1, L2 or refcount table, a refcount
 * block, the snapshot table or a snapshot's L1 table; an L2 table over a refcount block; and so
 * on. A consistent image never asks for such a write; a crafted or damaged one can (an L2 entry
 * or an L1 entry pointing at metadata, a refcount of 0 on a metadata cluster, so that it gets
 * allocated again). The refusal is a CorruptImageError, which makes the image marked corrupt
 * and read-only (lib/image.ts) before anything is overwritten.
 *
 * The map of metadata clusters comes from the in-memory tables (L1 entries, refcount table
 * entries, header offsets, snapshot table): it is rebuilt when their layout key changes, which
 * happens only when an L2 table, a refcount block or a table is allocated or moved, or the
 * header switches to a moved table, so a
 * plain data write costs one map lookup per cluster it touches.
 */
import { CorruptImageError } from '../errors.js'
import { hex } from '../format/int64.js'
import type { BlockFile, WriteTag } from '../io/block-file.js'

export type MetadataKind = 'header' | 'l1' | 'l2' | 'reftable' | 'refblock' | 'snapshot-table' | 'snapshot-l1'

/** Where an image's metadata lives now (host byte ranges), and a key that changes with it. */
export interface MetadataLayout {
  /**
   * Numbers that change whenever a range appears, moves or goes (compared one by one; asked
   * at every write, so it must be cheap).
   */
  version: () => readonly number[]
  ranges: () => Iterable<{ kind: MetadataKind; hostOffset: number; bytes: number }>
}

/** The metadata kind a write of each tag is for; data writes may overlap no metadata at all. */
const TAG_KIND: Partial<Record<WriteTag, MetadataKind>> = {
  header: 'header',
  l1: 'l1',
  l2: 'l2',
  reftable: 'reftable',
  refblock: 'refblock',
}

export class MetadataOverlapGuard implements BlockFile {
  readonly #inner: BlockFile
  readonly #clusterSize: number
  #layout: MetadataLayout | undefined
  /** The layout version the cluster map was built for (empty: not built). */
  #builtVersion: readonly number[] = []
  /** Metadata clusters and every kind each is claimed as (a damaged image may claim two). */
  #clusters = new Map<number, MetadataKind[]>()

  constructor(inner: BlockFile, clusterSize: number) {
    this.#inner = inner
    this.#clusterSize = clusterSize
  }

  /** Starts checking against `layout` (until then, writes pass unchecked). */
  attach(layout: MetadataLayout): void {
    this.#layout = layout
    this.#builtVersion = []
  }

  get path(): string {
    return this.#inner.path
  }
  get size(): number {
    return this.#inner.size
  }
  get writable(): boolean {
    return this.#inner.writable
  }

  pread(buf: Uint8Array, hostOffset: number): number {
    return this.#inner.pread(buf, hostOffset)
  }

  pwrite(buf: Uint8Array, hostOffset: number, tag: WriteTag): void {
    this.#check(hostOffset, buf.length, tag)
    this.#inner.pwrite(buf, hostOffset, tag)
  }

  sync(): void {
    this.#inner.sync()
  }
  truncate(size: number): void {
    this.#inner.truncate(size)
  }
  allocatedBytes(): number {
    return this.#inner.allocatedBytes()
  }
  close(): void {
    this.#inner.close()
  }

  #check(hostOffset: number, bytes: number, tag: WriteTag): void {
    if (!this.#layout || bytes === 0) return
    const version = this.#layout.version()
    if (!sameNumbers(version, this.#builtVersion)) this.#rebuild(this.#layout, version)
    const own = TAG_KIND[tag]
    const first = Math.floor(hostOffset / this.#clusterSize)
    const last = Math.floor((hostOffset + bytes - 1) / this.#clusterSize)
    for (let cluster = first; cluster <= last; cluster++) {
      const kinds = this.#clusters.get(cluster)
      if (kinds === undefined) continue
      const other = kinds.find((kind) => kind !== own)
      if (other !== undefined) {
        throw new CorruptImageError(
          `a ${tag} write at ${hex(hostOffset)} would overwrite the ${other} in cluster ${hex(cluster * this.#clusterSize)}; the image's metadata points into its own metadata`,
        )
      }
    }
  }

  #rebuild(layout: MetadataLayout, version: readonly number[]): void {
    const clusters = new Map<number, MetadataKind[]>()
    for (const range of layout.ranges()) {
      if (!Number.isSafeInteger(range.hostOffset) || range.hostOffset < 0 || range.bytes <= 0) continue
      const first = Math.floor(range.hostOffset / this.#clusterSize)
      const last = Math.floor((range.hostOffset + range.bytes - 1) / this.#clusterSize)
      for (let cluster = first; cluster <= last; cluster++) {
        const kinds = clusters.get(cluster)
        if (kinds === undefined) clusters.set(cluster, [range.kind])
        else if (!kinds.includes(range.kind)) kinds.push(range.kind)
      }
    }
    this.#clusters = clusters
    this.#builtVersion = version
  }
}

function sameNumbers(a: readonly number[], b: readonly number[]): boolean {
  if (a.length !== b.length) return false
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false
  return true
}

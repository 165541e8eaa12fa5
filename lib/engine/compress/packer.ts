/*
 * Host space for compressed clusters, packed as QEMU packs them (its qcow2_alloc_bytes; the
 * PK-* rules of docs/COMPRESSION.md):
 *
 *  PK-1  Each compressed cluster starts at the byte after the previous one (the cursor), with
 *        no sector alignment.
 *  PK-2  When the rest of the cursor's host cluster is too small, a new host cluster is
 *        allocated. If it is the next one (physically adjacent), the data runs on into it;
 *        otherwise the data starts at the new cluster and the old cluster's tail is never used.
 *  PK-3  Every host cluster's refcount counts the compressed clusters whose bytes touch it. A
 *        host cluster whose refcount has reached the refcount maximum takes no more data.
 *  PK-4  Host offset 0 (the header) is never handed out, and an offset must fit the
 *        descriptor's offset field (bits 0 to x-1, x = 62 - (cluster_bits - 8)).
 *  PK-5  The cursor lives in memory only: after a reopen, packing starts in a fresh host
 *        cluster (as in QEMU), never in the tail of a cluster found on disk.
 *
 * A new host cluster comes from Refcounts.allocate (refcount 1: the compressed cluster that
 * made it necessary); every further compressed cluster touching a host cluster increments it.
 */
import { CorruptImageError, NoSpaceError } from '../../errors.js'
import type { Geometry } from '../../format/geometry.js'
import { hex } from '../../format/int64.js'
import { compressedSizeShift } from '../../format/l2-entry.js'
import type { Refcounts } from '../../meta/refcounts.js'

export class Packer {
  #g: Geometry
  #refcounts: Refcounts
  /** Host byte offset where the next compressed cluster may start; 0 = none (PK-5). */
  #cursor = 0
  #maxHostOffset: number

  constructor(geometry: Geometry, refcounts: Refcounts) {
    this.#g = geometry
    this.#refcounts = refcounts
    // The descriptor's offset field has x bits (PK-4).
    this.#maxHostOffset = 2 ** compressedSizeShift(geometry.clusterBits)
  }

  /** The cursor (tests; 0 when the next compressed cluster starts a fresh host cluster). */
  get cursor(): number {
    return this.#cursor
  }

  /** Reserves `bytes` (1 to cluster size - 1) of host space; returns where they start. */
  allocate(bytes: number): number {
    const cs = this.#g.clusterSize
    if (!(bytes > 0 && bytes < cs)) throw new RangeError(`compressed size ${bytes} out of range for ${cs}-byte clusters`)
    let offset = this.#cursor
    // PK-3: a host cluster at the refcount maximum takes nothing more.
    if (offset !== 0 && this.#refcounts.get(Math.floor(offset / cs)) >= this.#refcounts.maxRefcount) offset = 0
    const room = offset === 0 ? 0 : cs - (offset % cs)
    if (offset !== 0 && room >= bytes) {
      this.#refcounts.increment(Math.floor(offset / cs))
    } else {
      const fresh = this.#refcounts.allocate(1)
      if (fresh === 0) throw new CorruptImageError('refusing to place a compressed cluster at host offset 0 (the header)')
      if (offset !== 0 && offset + room === fresh) {
        // PK-2: the next cluster is adjacent, so the data runs on into it.
        this.#refcounts.increment(Math.floor(offset / cs))
      } else {
        offset = fresh
      }
    }
    if (offset + bytes > this.#maxHostOffset) {
      throw new NoSpaceError(`compressed cluster at ${hex(offset)} lies past what a compressed descriptor can address`, 'EFBIG')
    }
    this.#cursor = (offset + bytes) % cs === 0 ? 0 : offset + bytes
    return offset
  }

  /** A host cluster was freed: if the cursor is in it, packing starts afresh. */
  forget(hostClusterOffset: number): void {
    const cs = this.#g.clusterSize
    if (this.#cursor !== 0 && this.#cursor - (this.#cursor % cs) === hostClusterOffset) this.#cursor = 0
  }
}

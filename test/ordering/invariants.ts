/*
 * The metadata write ordering (lib/engine/metadata.ts, O1-O6), checked directly on a recorded
 * log. "Unsynced" means written since the last sync. The log is replayed on the starting image
 * as it is walked, so rules can look at what the file held before each write.
 *
 * Inside a flush (between the 'flush-begin' and 'flush-end' marks the driver puts around
 * flush() and close()):
 *   L2      an 'l2' write finds no unsynced data, cow, compressed, refblock or reftable write
 *           (O1, O2: what L2 entries map, and its refcounts, are durable first)
 *   L1      an 'l1' write finds only unsynced 'l1' writes (O2, O4: L2 tables durable first)
 *   REFTAB  a 'reftable' write finds no unsynced 'refblock' write (O3)
 *   HEADER  a 'header' write finds only unsynced 'header' writes (O3, O4, O6: the tables it
 *           points to, and everything else, durable first); and no other write comes before
 *           a header write is synced (the header is the last step of a flush, and the first
 *           write's header preparation reaches the disk before anything else)
 *   DECR    a 'refblock' write that lowers a refcount finds no unsynced l2, l1, header or
 *           reftable write (O5: the metadata that dropped the reference is durable first)
 *   END     nothing is left unsynced when the flush returns
 * Inside a shrink ('resize-begin' / 'resize-end' marks) the same rules but END apply: a shrink
 * makes the smaller size durable (a whole flush) before it drops the mappings past it.
 * Everywhere:
 *   OUTSIDE between flushes only data, cow, compressed and 'l2' writes happen, and an 'l2'
 *           write there goes to a table the active L1 does not point to (a new table or a
 *           copy): "between flushes metadata is only in memory". The one exception is the
 *           header preparation before the first write (autoclear bits cleared, dirty bit
 *           set): 'header' writes before any other write.
 *   SNAP    nothing is written into a cluster an internal snapshot reaches (its L1 table, L2
 *           tables, data clusters) or into the snapshot table
 */
import type { WriteTag } from '../../lib/io/block-file.js'
import { MemoryBlockFile } from '../helpers/memory-file.js'
import type { RecordedEvent, WriteEvent } from '../helpers/recording-file.js'
import { type HeaderFields, clustersReachedFrom, l2TableOffsets, readHeaderFields, refcountInBlock, snapshotL1Tables } from './layout.js'

export interface OrderingReport {
  violations: string[]
  /** Writes checked per rule (a rule that never applied proves nothing). */
  applied: Record<string, number>
}

const DATA_TAGS: ReadonlySet<WriteTag> = new Set(['data', 'cow', 'compressed'])

function describeWrite(e: WriteEvent): string {
  return `event ${e.seq}: '${e.tag}' write of ${e.bytes.length} bytes at 0x${e.hostOffset.toString(16)}`
}

function tagsOf(writes: readonly WriteEvent[]): string {
  return [...new Set(writes.map((w) => w.tag))].join(', ')
}

/** Snapshot-reachable clusters, and the snapshot table's, in the starting image. */
function snapshotClusters(read: (buf: Uint8Array, at: number) => number, h: HeaderFields): Set<number> {
  const out = new Set<number>()
  if (h.snapshotCount === 0) return out
  for (const l1 of snapshotL1Tables(read, h)) for (const c of clustersReachedFrom(read, h, l1)) out.add(c)
  // The snapshot table itself: at least its first cluster (its exact length is not needed:
  // the engine never writes near it).
  out.add(Math.floor(h.snapshotsOffset / h.clusterSize))
  return out
}

export function checkOrdering(initialBytes: Uint8Array, events: readonly RecordedEvent[], imagePath = 'image'): OrderingReport {
  const file = MemoryBlockFile.fromBytes(imagePath, initialBytes)
  const read = (buf: Uint8Array, at: number): number => {
    buf.fill(0)
    return file.pread(buf, at)
  }
  const violations: string[] = []
  const applied: Record<string, number> = { L2: 0, L1: 0, REFTAB: 0, HEADER: 0, DECR: 0, END: 0, OUTSIDE: 0, PREPARE: 0, SNAP: 0 }
  const start = readHeaderFields(read)
  const protectedClusters = snapshotClusters(read, start)

  let unsynced: WriteEvent[] = []
  let inFlush = false
  /** A write other than 'header' happened (the header preparation is over). */
  let wroteOther = false
  const violate = (rule: string, e: WriteEvent | undefined, what: string): void => {
    violations.push(`${rule}: ${e ? describeWrite(e) + ': ' : ''}${what}`)
  }
  const pendingExcept = (allowed: readonly WriteTag[]): WriteEvent[] => unsynced.filter((w) => !allowed.includes(w.tag))
  const pendingOf = (tags: ReadonlySet<WriteTag> | readonly WriteTag[]): WriteEvent[] => {
    const set = tags instanceof Set ? tags : new Set(tags as readonly WriteTag[])
    return unsynced.filter((w) => set.has(w.tag))
  }

  for (const e of events) {
    if (e.kind === 'mark') {
      if (e.label === 'flush-begin' || e.label === 'resize-begin') inFlush = true
      if (e.label === 'resize-end') inFlush = false
      if (e.label === 'flush-end') {
        inFlush = false
        applied.END!++
        if (unsynced.length > 0) violate('END', undefined, `flush returned at event ${e.seq} with ${unsynced.length} unsynced writes (${tagsOf(unsynced)})`)
      }
      continue
    }
    if (e.kind === 'sync') {
      unsynced = []
      continue
    }
    if (e.kind === 'truncate') {
      file.truncate(e.size)
      continue
    }

    const h = readHeaderFields(read)
    const cs = h.clusterSize
    const firstCluster = Math.floor(e.hostOffset / cs)
    const lastCluster = Math.floor((e.hostOffset + e.bytes.length - 1) / cs)

    if (protectedClusters.size > 0) {
      applied.SNAP!++
      for (let c = firstCluster; c <= lastCluster; c++) {
        if (protectedClusters.has(c)) violate('SNAP', e, `cluster 0x${(c * cs).toString(16)} belongs to an internal snapshot`)
      }
    }

    if (e.tag === 'header') {
      applied.HEADER!++
      const bad = pendingExcept(['header'])
      if (bad.length > 0) violate('HEADER', e, `unsynced ${tagsOf(bad)} writes before it`)
    } else {
      const header = pendingOf(['header'])
      if (header.length > 0) violate('HEADER', e, `written before the header write of event ${header[0]!.seq} was synced`)
    }

    if (!inFlush) {
      applied.OUTSIDE!++
      if (e.tag === 'header' && !wroteOther) {
        applied.PREPARE!++
      } else if (!DATA_TAGS.has(e.tag) && e.tag !== 'l2') {
        violate('OUTSIDE', e, 'metadata written outside flush()')
      } else if (e.tag === 'l2') {
        const live = l2TableOffsets(read, { l1TableOffset: h.l1TableOffset, l1Size: h.l1Size })
        if (live.includes(firstCluster * cs)) violate('OUTSIDE', e, 'an L2 table the active L1 points to, written outside flush()')
      }
    } else {
      switch (e.tag) {
        case 'l2': {
          applied.L2!++
          const bad = pendingExcept(['l2'])
          if (bad.length > 0) violate('L2', e, `unsynced ${tagsOf(bad)} writes before it`)
          break
        }
        case 'l1': {
          applied.L1!++
          const bad = pendingExcept(['l1'])
          if (bad.length > 0) violate('L1', e, `unsynced ${tagsOf(bad)} writes before it`)
          break
        }
        case 'reftable': {
          applied.REFTAB!++
          const bad = pendingOf(['refblock'])
          if (bad.length > 0) violate('REFTAB', e, `${bad.length} unsynced refcount block writes before it`)
          break
        }
        default:
          break
      }
    }

    if (e.tag === 'refblock' && lowersRefcounts(read, h, e)) {
      applied.DECR!++
      const bad = pendingOf(['l2', 'l1', 'header', 'reftable'])
      if (bad.length > 0) violate('DECR', e, `lowers refcounts with unsynced ${tagsOf(bad)} writes before it`)
    }
    file.pwrite(e.bytes, e.hostOffset, e.tag)
    unsynced.push(e)
    if (e.tag !== 'header') wroteOther = true
  }
  return { violations, applied }
}

/** Whether a refcount block write lowers any refcount (compared with the bytes it replaces). */
function lowersRefcounts(read: (buf: Uint8Array, at: number) => number, h: HeaderFields, e: WriteEvent): boolean {
  const bits = 2 ** h.refcountOrder
  // Whole entries only: a write starts and ends on entry boundaries (bits >= 8) or bytes.
  const before = new Uint8Array(e.bytes.length)
  read(before, e.hostOffset)
  const oldView = new DataView(before.buffer)
  const newView = new DataView(e.bytes.buffer, e.bytes.byteOffset, e.bytes.byteLength)
  const entries = (e.bytes.length * 8) / bits
  for (let i = 0; i < entries; i++) {
    if (refcountInBlock(newView, i, h.refcountOrder) < refcountInBlock(oldView, i, h.refcountOrder)) return true
  }
  return false
}

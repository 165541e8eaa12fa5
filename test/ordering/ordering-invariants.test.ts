/*
 * The metadata write ordering asserted directly on the recorded logs of the crash workloads
 * (rules in test/ordering/invariants.ts), and the checker itself shown to catch logs with a
 * sync removed or a write moved.
 */
import * as fs from 'node:fs'
import * as path from 'node:path'
import { afterAll, beforeAll, describe, expect, test } from 'vitest'
import { type QemuTools, makeTempDir, removeTempDir, requireQemu } from '../helpers/qemu.js'
import type { RecordedEvent, WriteEvent } from '../helpers/recording-file.js'
import { checkOrdering } from './invariants.js'
import { snapshotL1Tables } from './layout.js'
import { type Recording, type Workload, recordWorkload, workloads } from './workloads.js'

const qemu = requireQemu('metadata write ordering')
const describeQemu = describe.skipIf(!qemu)

let dir: string
beforeAll(async () => {
  dir = await makeTempDir('ordering')
})
afterAll(async () => {
  await removeTempDir(dir)
})

const recordings = new Map<Workload, Promise<Recording>>()
function recordingOf(w: Workload): Promise<Recording> {
  let rec = recordings.get(w)
  if (!rec) {
    const workDir = path.join(dir, `w${workloads.indexOf(w)}`)
    fs.mkdirSync(workDir)
    rec = recordWorkload(qemu as QemuTools, w, workDir)
    recordings.set(w, rec)
  }
  return rec
}

function byName(fragment: string): Workload {
  const w = workloads.find((x) => x.name.includes(fragment))
  if (!w) throw new Error(`no workload named like '${fragment}'`)
  return w
}

/** Index (in events) of the first write matching `pick`, inside a flush. */
function firstInFlush(events: readonly RecordedEvent[], pick: (e: WriteEvent) => boolean): number {
  let inFlush = false
  for (let i = 0; i < events.length; i++) {
    const e = events[i]!
    if (e.kind === 'mark') inFlush = e.label === 'flush-begin' ? true : e.label === 'flush-end' ? false : inFlush
    if (inFlush && e.kind === 'write' && pick(e)) return i
  }
  throw new Error('no such write in the log')
}

/** The log without the last sync before event `index`. */
function withoutSyncBefore(events: readonly RecordedEvent[], index: number): RecordedEvent[] {
  for (let i = index - 1; i >= 0; i--) {
    if (events[i]!.kind === 'sync') return [...events.slice(0, i), ...events.slice(i + 1)]
  }
  throw new Error(`no sync before event ${index}`)
}

describeQemu('metadata write ordering on the recorded logs', () => {
  test.each(workloads)('$name', async (w) => {
    const rec = await recordingOf(w)
    const report = checkOrdering(rec.initialBytes, rec.events, rec.imagePath)
    expect(report.violations, report.violations.slice(0, 20).join('\n')).toEqual([])
    // Every workload flushes, writes L2 tables inside flushes, and writes between flushes.
    expect(report.applied.END).toBeGreaterThan(1)
    expect(report.applied.L2).toBeGreaterThan(0)
    expect(report.applied.OUTSIDE).toBeGreaterThan(0)
  })

  test('every rule applied to some write of some workload', async () => {
    const totals: Record<string, number> = {}
    for (const w of workloads) {
      const report = checkOrdering((await recordingOf(w)).initialBytes, (await recordingOf(w)).events)
      for (const [rule, n] of Object.entries(report.applied)) totals[rule] = (totals[rule] ?? 0) + n
    }
    for (const rule of ['L2', 'L1', 'REFTAB', 'HEADER', 'DECR', 'END', 'OUTSIDE', 'PREPARE', 'SNAP']) {
      expect(totals[rule], `rule ${rule} was never applied`).toBeGreaterThan(0)
    }
  })

  describe('the checker catches broken logs', () => {
    test('a missing sync between refcount blocks and L2 tables', async () => {
      const rec = await recordingOf(byName('64 KiB clusters'))
      const at = firstInFlush(rec.events, (e) => e.tag === 'l2')
      const report = checkOrdering(rec.initialBytes, withoutSyncBefore(rec.events, at))
      expect(report.violations.some((v) => v.startsWith('L2:'))).toBe(true)
    })

    test('a missing sync before a header switch', async () => {
      const rec = await recordingOf(byName('growing moves the L1'))
      const at = firstInFlush(rec.events, (e) => e.tag === 'header')
      const report = checkOrdering(rec.initialBytes, withoutSyncBefore(rec.events, at))
      expect(report.violations.some((v) => v.startsWith('HEADER:'))).toBe(true)
    })

    test('a missing sync before an L1 update', async () => {
      const rec = await recordingOf(byName('internal snapshot'))
      const at = firstInFlush(rec.events, (e) => e.tag === 'l1')
      const report = checkOrdering(rec.initialBytes, withoutSyncBefore(rec.events, at))
      expect(report.violations.some((v) => v.startsWith('L1:'))).toBe(true)
    })

    test('a refcount decrement moved before the L2 update that drops the reference', async () => {
      const rec = await recordingOf(byName('compressed clusters'))
      const events = [...rec.events]
      // The first flush that ends with a decrement: move that refcount write to just before
      // the flush's first L2 write.
      const report0 = checkOrdering(rec.initialBytes, events)
      expect(report0.applied.DECR).toBeGreaterThan(0)
      let moved = false
      for (let i = 0; i < events.length && !moved; i++) {
        const e = events[i]!
        if (e.kind !== 'mark' || e.label !== 'flush-begin') continue
        let end = i
        while (!(events[end]!.kind === 'mark' && (events[end] as { label: string }).label === 'flush-end')) end++
        const l2 = events.findIndex((x, j) => j > i && j < end && x.kind === 'write' && x.tag === 'l2')
        let lastRefblock = -1
        for (let j = end; j > i; j--) {
          const x = events[j]!
          if (x.kind === 'write' && x.tag === 'refblock') {
            lastRefblock = j
            break
          }
        }
        if (l2 < 0 || lastRefblock < l2) continue
        const [decrement] = events.splice(lastRefblock, 1)
        events.splice(l2, 0, decrement!)
        moved = true
      }
      expect(moved).toBe(true)
      const report = checkOrdering(rec.initialBytes, events)
      expect(report.violations.some((v) => v.startsWith('DECR:') || v.startsWith('L2:'))).toBe(true)
    })

    test('a flush that returns before its last sync', async () => {
      const rec = await recordingOf(byName('512-byte clusters'))
      const end = rec.events.findIndex((e, i) => e.kind === 'mark' && e.label === 'flush-end' && rec.events[i - 1]!.kind === 'sync')
      expect(end).toBeGreaterThan(0)
      const events = [...rec.events.slice(0, end - 1), ...rec.events.slice(end)]
      const report = checkOrdering(rec.initialBytes, events)
      expect(report.violations.some((v) => v.startsWith('END:'))).toBe(true)
    })

    test('a data write before the header preparation is synced', async () => {
      const rec = await recordingOf(byName('header is prepared'))
      const at = rec.events.findIndex((e) => e.kind === 'write' && e.tag !== 'header')
      const report = checkOrdering(rec.initialBytes, withoutSyncBefore(rec.events, at))
      expect(report.violations.some((v) => v.startsWith('HEADER:') && v.includes('was synced'))).toBe(true)
    })

    test('a write into a snapshot cluster', async () => {
      const rec = await recordingOf(byName('internal snapshot'))
      const read = (buf: Uint8Array, at: number): number => {
        buf.set(rec.initialBytes.subarray(at, at + buf.length))
        return buf.length
      }
      const [snapshotL1] = snapshotL1Tables(read, rec.headerBefore)
      expect(snapshotL1).toBeDefined()
      // A data write over the snapshot's L1 table.
      const forged: WriteEvent = { kind: 'write', seq: -1, change: -1, tag: 'data', hostOffset: snapshotL1!.l1TableOffset, bytes: new Uint8Array(512) }
      const report = checkOrdering(rec.initialBytes, [forged, ...rec.events])
      expect(report.violations.some((v) => v.startsWith('SNAP:'))).toBe(true)
    })
  })
})

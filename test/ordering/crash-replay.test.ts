/*
 * Crash consistency by prefix replay. Each workload (test/ordering/workloads.ts) runs through
 * the engine on a RecordingFile; then for EVERY prefix of its change log (0..N writes and
 * truncates applied in order to the starting image bytes, i.e. a crash after each one):
 *
 *  - qemu-img check finds no corruptions and no check errors (leaks are allowed: clusters
 *    allocated, or freed in memory, when the crash came);
 *  - our engine opens the prefix image read-only, its virtual size is one the workload had,
 *    and every byte reads as of the last completed flush, or as a later op (started before the
 *    crash) wrote it;
 *  - where the prefix ends exactly at a completed flush, qemu-img compare says the image
 *    equals the model (so our engine and QEMU read the same thing);
 *  - an internal snapshot still reads exactly as before the workload.
 *
 * A disk may also persist the writes since the last sync in any order, so a second pass takes,
 * for a spread of epochs (runs of writes between two syncs), everything before the epoch plus a
 * random subset of it that is not a prefix, and checks it the same way. Self-tests show that a
 * damaged write order, a lost data write and a missing sync are caught.
 *
 * qemu-img check runs on two slot files (a prefix each, in turn) so two checks overlap while
 * the engine checks the next prefix in memory.
 */
import * as fs from 'node:fs'
import * as path from 'node:path'
import { afterAll, beforeAll, describe, expect, test } from 'vitest'
import { describeError } from '../../lib/errors.js'
import { Qcow2Image } from '../../lib/image.js'
import { MemoryBlockFile } from '../helpers/memory-file.js'
import { type QemuTools, makeTempDir, removeTempDir, requireQemu } from '../helpers/qemu.js'
import { type FileChange, applyChange } from '../helpers/recording-file.js'
import { type AllowedState, ProgramRunner, allowedState, firstDisallowedByte, qemuCheck } from './crash-check.js'
import { type FlushPoint, type Recording, type Workload, makeRandom, recordWorkload, workloads } from './workloads.js'

const qemu = requireQemu('crash replay')
const describeQemu = describe.skipIf(!qemu)

let dir: string
/** Runs qemu-img for every crash image (cheaper than starting it from this large process). */
let runner: ProgramRunner
beforeAll(async () => {
  dir = await makeTempDir('crash-replay')
  runner = new ProgramRunner()
})
afterAll(async () => {
  runner.close()
  await removeTempDir(dir)
})

/** Failures kept per workload before giving up on the remaining prefixes. */
const MAX_FAILURES = 6
const SLOTS = 2

function describeChange(c: FileChange): string {
  if (c.kind === 'truncate') return `truncate to ${c.size}`
  return `'${c.tag}' write of ${c.bytes.length} bytes at 0x${c.hostOffset.toString(16)}`
}

/** Change k-1 and the recorded events just before it (what the crash interrupted). */
function contextBefore(rec: Recording, changes: readonly FileChange[], k: number): string {
  if (k === 0) return 'no changes'
  const last = changes[k - 1]!
  if (last !== rec.changes[k - 1]) return `#${k} ${describeChange(last)} (order changed by the test)`
  const from = Math.max(0, last.seq - 4)
  return rec.events
    .slice(from, last.seq + 1)
    .map((e) => (e.kind === 'mark' ? `[${e.label}]` : e.kind === 'sync' ? 'sync' : `#${e.change + 1} ${describeChange(e)}`))
    .join(', ')
}

function opsText(state: AllowedState): string {
  const later = state.later.map((op) => op.what)
  return `last flush: ${state.flush.label} (after ${state.flush.opCount} ops); later ops: ${later.length > 0 ? later.join('; ') : 'none'}`
}

interface Slot {
  path: string
  fd: number
  applied: number
  pending: Promise<void>
}

/** Brings a slot file from its prefix to prefix k (k only grows). */
function advanceSlot(slot: Slot, changes: readonly FileChange[], k: number): void {
  for (; slot.applied < k; slot.applied++) {
    const c = changes[slot.applied]!
    if (c.kind === 'write') {
      let done = 0
      while (done < c.bytes.length) done += fs.writeSync(slot.fd, c.bytes, done, c.bytes.length - done, c.hostOffset + done)
    } else {
      fs.ftruncateSync(slot.fd, c.size)
    }
  }
}

async function readWhole(img: Qcow2Image): Promise<Buffer> {
  const out = Buffer.alloc(img.virtualSize)
  const chunk = 4 * 1024 * 1024
  for (let at = 0; at < out.length; at += chunk) await img.read(out.subarray(at, Math.min(at + chunk, out.length)), at)
  return out
}

/**
 * L2 cache bound for the checking opens: small, so reads also go through slice eviction, and
 * cheap to set up (lru-cache allocates its index arrays for the whole bound at construction,
 * ~16 ms for the default 32 MiB of 512-byte slices, paid on every one of the thousands of opens).
 */
const CHECK_L2_CACHE_BYTES = 1024 * 1024

/** Opens the prefix in memory with our engine and checks what it reads. Returns a failure or undefined. */
async function engineCheck(rec: Recording, replay: MemoryBlockFile, state: AllowedState): Promise<string | undefined> {
  let img: Qcow2Image
  try {
    img = Qcow2Image.openFile(replay.readOnlyView(), rec.imagePath, { readOnly: true, l2CacheBytes: CHECK_L2_CACHE_BYTES })
  } catch (err) {
    return `our engine cannot open it: ${describeError(err)}`
  }
  try {
    if (!state.sizes.includes(img.virtualSize)) return `virtual size ${img.virtualSize}, expected one of ${state.sizes.join(', ')}`
    let got: Buffer
    try {
      got = await readWhole(img)
    } catch (err) {
      return `our engine fails to read it: ${describeError(err)}`
    }
    const bad = firstDisallowedByte(got, state)
    if (bad) {
      return (
        `guest byte 0x${bad.guestOffset.toString(16)} reads 0x${bad.got.toString(16)}; flushed value 0x${bad.flushed.toString(16)}` +
        (bad.laterValues.length > 0 ? `, later writes: ${bad.laterValues.map((v) => '0x' + v.toString(16)).join(' ')}` : ', no later write there')
      )
    }
  } finally {
    img.closeSync()
  }
  if (rec.snapshot) {
    let snap: Qcow2Image
    try {
      snap = Qcow2Image.openFile(replay.readOnlyView(), rec.imagePath, { readOnly: true, snapshot: rec.snapshot.name, l2CacheBytes: CHECK_L2_CACHE_BYTES })
    } catch (err) {
      return `our engine cannot open snapshot '${rec.snapshot.name}': ${describeError(err)}`
    }
    try {
      const view = await readWhole(snap)
      if (!view.equals(rec.snapshot.view)) return `snapshot '${rec.snapshot.name}' no longer reads as before the workload`
    } catch (err) {
      return `our engine fails to read snapshot '${rec.snapshot.name}': ${describeError(err)}`
    } finally {
      snap.closeSync()
    }
  }
  return undefined
}

interface ReplayResult {
  failures: string[]
  prefixes: number
  leaky: number
  compared: number
}

/**
 * Checks the crash images after changes[0..k) for every k in [from, to] (default: all of them);
 * `changes` defaults to the recorded ones (the self-test passes a damaged order).
 */
async function replayPrefixes(
  tools: QemuTools,
  rec: Recording,
  workDir: string,
  options: { changes?: readonly FileChange[]; from?: number; to?: number } = {},
): Promise<ReplayResult> {
  const changes = options.changes ?? rec.changes
  const total = changes.length
  const from = options.from ?? 0
  const to = options.to ?? total
  let prefixes = 0
  const failures: string[] = []
  let leaky = 0
  let compared = 0
  const fail = (k: number, state: AllowedState, what: string): void => {
    failures.push(`prefix ${k}/${total} (crash after ${contextBefore(rec, changes, k)}; ${opsText(state)}): ${what}`)
  }

  // Slot files sit next to the image: a relative backing file name must resolve.
  const imageDir = path.dirname(rec.imagePath)
  const slots: Slot[] = []
  for (let i = 0; i < SLOTS; i++) {
    const slotPath = path.join(imageDir, `prefix-${i}.qcow2`)
    fs.writeFileSync(slotPath, rec.initialBytes)
    slots.push({ path: slotPath, fd: fs.openSync(slotPath, 'r+'), applied: 0, pending: Promise.resolve() })
  }
  const modelFiles = new Map<FlushPoint, string>()
  const modelFile = (f: FlushPoint): string => {
    let file = modelFiles.get(f)
    if (!file) {
      file = path.join(workDir, `model-${modelFiles.size}.raw`)
      fs.writeFileSync(file, f.model)
      modelFiles.set(f, file)
    }
    return file
  }

  const replay = MemoryBlockFile.fromBytes(rec.imagePath, rec.initialBytes)
  try {
    for (let k = 0; k <= to && failures.length < MAX_FAILURES; k++) {
      if (k > 0) applyChange(replay, changes[k - 1]!)
      if (k < from) continue
      prefixes++
      const state = allowedState(rec.flushPoints, rec.ops, k)

      const slot = slots[k % SLOTS]!
      await slot.pending
      advanceSlot(slot, changes, k)
      // At a completed flush nothing later applies: the image must equal the model exactly.
      const exact = state.later.length === 0 && state.flush.change === k ? modelFile(state.flush) : undefined
      slot.pending = (async () => {
        const report = await qemuCheck(tools.qemuImg, slot.path, runner)
        if (report.corruptions > 0 || report.checkErrors > 0) {
          fail(k, state, `qemu-img check: ${report.corruptions} corruptions, ${report.checkErrors} check errors\n${report.text}`)
          return
        }
        if (report.leaks > 0) leaky++
        if (exact !== undefined) {
          compared++
          const cmp = await runner.run(tools.qemuImg, ['compare', '-f', 'raw', '-F', 'qcow2', exact, slot.path])
          if (cmp.code !== 0) {
            fail(k, state, `qemu-img compare with the model of '${state.flush.label}': exit code ${cmp.code}: ${(cmp.stdout + cmp.stderr).trim()}`)
          }
        }
      })()

      const problem = await engineCheck(rec, replay, state)
      if (problem !== undefined) fail(k, state, problem)
    }
    await Promise.all(slots.map((s) => s.pending))
  } finally {
    for (const s of slots) fs.closeSync(s.fd)
  }
  return { failures, prefixes, leaky, compared }
}

/** Crash states checked per workload with writes since the last sync landing out of order. */
const MAX_REORDERED_STATES = 40

/**
 * Crashes where only some of the writes since the last sync reached the file (the disk may
 * reorder anything not separated by a sync): for up to MAX_REORDERED_STATES epochs (runs of
 * writes between two syncs) with two or more writes, one seeded random subset of the epoch that
 * is not a prefix of it, on top of everything before the epoch.
 */
async function replayReorderedEpochs(tools: QemuTools, rec: Recording, seed: number): Promise<{ failures: string[]; states: number }> {
  const changes = rec.changes
  const random = makeRandom(seed)
  // Epoch boundaries: the change counts at syncs (and the start and the end of the log).
  const bounds = [...new Set([0, ...rec.events.filter((e) => e.kind === 'sync').map((e) => e.change), changes.length])].sort((a, b) => a - b)
  const epochs: { start: number; end: number }[] = []
  for (let i = 0; i + 1 < bounds.length; i++) if (bounds[i + 1]! - bounds[i]! >= 2) epochs.push({ start: bounds[i]!, end: bounds[i + 1]! })
  // A spread of epochs: every n-th one.
  const step = Math.max(1, epochs.length / MAX_REORDERED_STATES)
  const chosen = new Set<number>()
  for (let x = 0; x < epochs.length && chosen.size < MAX_REORDERED_STATES; x += step) chosen.add(Math.floor(x))

  const failures: string[] = []
  const base = MemoryBlockFile.fromBytes(rec.imagePath, rec.initialBytes)
  let applied = 0
  let states = 0
  for (const index of [...chosen].sort((a, b) => a - b)) {
    if (failures.length >= MAX_FAILURES) break
    const { start, end } = epochs[index]!
    for (; applied < start; applied++) applyChange(base, changes[applied]!)
    // A random subset that is not a prefix of the epoch (prefixes are checked elsewhere).
    let subset: number[] = []
    for (let attempt = 0; attempt < 20; attempt++) {
      subset = []
      for (let c = start; c < end; c++) if (random.float() < 0.5) subset.push(c)
      const isPrefix = subset.every((c, i) => c === start + i)
      if (!isPrefix) break
    }
    if (subset.every((c, i) => c === start + i)) subset = [end - 1]
    states++
    const failure = await checkPartialCrash(tools, rec, base, start, subset)
    if (failure !== undefined) failures.push(failure)
  }
  return { failures, states }
}

/**
 * The crash image made of `durable` (the file after changes[0..start)) plus only the changes
 * numbered in `subset` (all at or past start): qemu-img check, then our engine's read check.
 */
async function checkPartialCrash(tools: QemuTools, rec: Recording, durable: MemoryBlockFile, start: number, subset: readonly number[]): Promise<string | undefined> {
  const changes = rec.changes
  const crash = MemoryBlockFile.fromBytes(rec.imagePath, durable.bytes())
  for (const c of subset) applyChange(crash, changes[c]!)
  const state = allowedState(rec.flushPoints, rec.ops, Math.max(start, ...subset.map((c) => c + 1)), start)
  const label = `changes 0..${start - 1} and then only ${subset.join(', ')} (${subset.map((c) => describeChange(changes[c]!)).join('; ')}); ${opsText(state)}`
  const file = path.join(path.dirname(rec.imagePath), 'partial-crash.qcow2')
  fs.writeFileSync(file, crash.bytes())
  const report = await qemuCheck(tools.qemuImg, file, runner)
  if (report.corruptions > 0 || report.checkErrors > 0) {
    return `${label}: qemu-img check: ${report.corruptions} corruptions, ${report.checkErrors} check errors\n${report.text}`
  }
  const problem = await engineCheck(rec, crash, state)
  return problem === undefined ? undefined : `${label}: ${problem}`
}

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

describeQemu('crash after any write: every prefix of the write log', () => {
  test.each(workloads)('$name', async (w) => {
    const tools = qemu as QemuTools
    const rec = await recordingOf(w)
    const workDir = path.dirname(rec.imagePath)
    const flushes = rec.flushPoints.length - 1
    expect(flushes, 'the workload flushes').toBeGreaterThan(1)
    const result = await replayPrefixes(tools, rec, workDir)
    expect(result.failures, `${rec.name}: failing prefixes (of ${result.prefixes}):\n${result.failures.join('\n\n')}`).toEqual([])
    expect(result.compared, 'prefixes compared with qemu-img at flush points').toBeGreaterThanOrEqual(2)
    process.stdout.write(`${w.name}: ${result.prefixes} prefixes, ${rec.ops.length} ops, ${flushes} flushes, ${result.leaky} prefixes with leaks, ${result.compared} compared with qemu-img\n`)
  })
})

describeQemu('crash with the writes since the last sync landing out of order', () => {
  test.each(workloads)('$name', async (w) => {
    const tools = qemu as QemuTools
    const rec = await recordingOf(w)
    const result = await replayReorderedEpochs(tools, rec, w.seed)
    expect(result.failures, `${rec.name}: failing crash states (of ${result.states}):\n${result.failures.join('\n\n')}`).toEqual([])
    expect(result.states, 'epochs with two or more writes').toBeGreaterThan(2)
  })
})

describeQemu('the replay catches a damaged write order', () => {
  test('L2 entries written before the refcounts and data they need', async () => {
    const tools = qemu as QemuTools
    const workDir = path.join(dir, 'damaged')
    fs.mkdirSync(workDir)
    const rec = await recordWorkload(tools, workloads[0]!, workDir)
    // In the first flush that writes refcount blocks and then L2 tables, move the L2 writes
    // in front of everything else the flush writes (the writes stay inside the flush, so the
    // flush points and op boundaries keep their change counts).
    const events = rec.events
    const begin = events.findIndex((e, i) => {
      if (e.kind !== 'mark' || e.label !== 'flush-begin') return false
      const end = events.findIndex((x, j) => j > i && x.kind === 'mark' && x.label === 'flush-end')
      const inFlush = events.slice(i, end)
      const firstL2 = inFlush.findIndex((x) => x.kind === 'write' && x.tag === 'l2')
      return firstL2 > 0 && inFlush.slice(0, firstL2).some((x) => x.kind === 'write' && x.tag === 'refblock')
    })
    expect(begin).toBeGreaterThanOrEqual(0)
    const end = events.findIndex((x, j) => j > begin && x.kind === 'mark' && x.label === 'flush-end')
    const inFlush = events.slice(begin, end).filter((e): e is FileChange => e.kind === 'write' || e.kind === 'truncate')
    const first = inFlush[0]!.change
    const reordered = [...inFlush.filter((c) => c.kind === 'write' && c.tag === 'l2'), ...inFlush.filter((c) => !(c.kind === 'write' && c.tag === 'l2'))]
    const changes = [...rec.changes.slice(0, first), ...reordered, ...rec.changes.slice(first + reordered.length)]
    const result = await replayPrefixes(tools, rec, workDir, { changes, from: first, to: first + reordered.length })
    expect(result.failures.length, 'no prefix of the damaged order was found broken').toBeGreaterThan(0)
    expect(result.failures.join('\n')).toMatch(/qemu-img check: [1-9]\d* corruptions/)
  })
})

describeQemu('the replay catches lost data', () => {
  test('a data write that never reached the file', async () => {
    const tools = qemu as QemuTools
    const workDir = path.join(dir, 'lost-data')
    fs.mkdirSync(workDir)
    const rec = await recordWorkload(tools, workloads[0]!, workDir)
    // The first flush after a data write: blank that write's bytes (same place, same length,
    // so every change count stays), then check the image as that flush left it.
    const flush = rec.flushPoints.find((f) => f.change > 0 && rec.changes.slice(0, f.change).some((c) => c.kind === 'write' && c.tag === 'data'))!
    expect(flush).toBeDefined()
    const lost = rec.changes.findIndex((c) => c.kind === 'write' && c.tag === 'data')
    const original = rec.changes[lost]! as Extract<FileChange, { kind: 'write' }>
    expect(original.bytes.some((b) => b !== 0)).toBe(true)
    const changes = rec.changes.map((c, i) => (i === lost ? { ...original, bytes: new Uint8Array(original.bytes.length) } : c))
    const result = await replayPrefixes(tools, rec, workDir, { changes, from: flush.change, to: flush.change })
    const text = result.failures.join('\n')
    expect(text, 'the engine read check').toMatch(/guest byte 0x[0-9a-f]+ reads/)
    expect(text, 'qemu-img compare at the flush').toMatch(/qemu-img compare with the model/)
  })
})

describeQemu('the out-of-order check catches a missing sync', () => {
  test('L2 entries landing without the refcount block written before them', async () => {
    const tools = qemu as QemuTools
    const workDir = path.join(dir, 'missing-sync')
    fs.mkdirSync(workDir)
    const rec = await recordWorkload(tools, workloads[0]!, workDir)
    // A flush whose refcount block writes precede its L2 writes: were the sync between them
    // missing, the L2 write could land alone.
    const events = rec.events
    const begin = events.findIndex((e, i) => {
      if (e.kind !== 'mark' || e.label !== 'flush-begin') return false
      const end = events.findIndex((x, j) => j > i && x.kind === 'mark' && x.label === 'flush-end')
      const inFlush = events.slice(i, end)
      const firstL2 = inFlush.findIndex((x) => x.kind === 'write' && x.tag === 'l2')
      return firstL2 > 0 && inFlush.slice(0, firstL2).some((x) => x.kind === 'write' && x.tag === 'refblock')
    })
    expect(begin).toBeGreaterThanOrEqual(0)
    const refblock = events.find((e, j) => j > begin && e.kind === 'write' && e.tag === 'refblock')! as FileChange
    const l2 = events.find((e, j) => j > begin && e.kind === 'write' && e.tag === 'l2')! as FileChange
    const durable = MemoryBlockFile.fromBytes(rec.imagePath, rec.initialBytes)
    for (let c = 0; c < refblock.change; c++) applyChange(durable, rec.changes[c]!)
    const failure = await checkPartialCrash(tools, rec, durable, refblock.change, [l2.change])
    expect(failure ?? 'no failure').toMatch(/qemu-img check: [1-9]\d* corruptions/)
  })
})

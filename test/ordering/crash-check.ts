/*
 * Checking a crashed image: what qemu-img check says, and whether the guest bytes are allowed.
 *
 * After a crash the guarantee is: everything written before the last completed flush reads as
 * the workload wrote it, except where a later op (started before the crash) wrote again; such
 * a byte may read as the flushed value or as any value a later op gave it, never as anything
 * else. allowedState() says which flush point and which later ops apply to a crash after a
 * given number of changes; firstDisallowedByte() checks a full read of the disk against that.
 */
import { execFile } from 'node:child_process'
import type { Effect, FlushPoint, OpRecord } from './workloads.js'

export interface CheckReport {
  corruptions: number
  checkErrors: number
  leaks: number
  /** qemu-img check's exit code: 0 clean, 1 check errors, 2 corruptions, 3 leaks. */
  exitCode: number
  /** Its JSON output (or what it printed when there is none). */
  text: string
}

/** `qemu-img check --output=json -f qcow2 IMAGE`; resolves for exit codes 0-3. */
export function qemuCheck(qemuImgPath: string, image: string): Promise<CheckReport> {
  return new Promise((resolve, reject) => {
    execFile(qemuImgPath, ['check', '--output=json', '-f', 'qcow2', image], { encoding: 'utf8', timeout: 60_000, maxBuffer: 16 * 1024 * 1024 }, (err, stdout, stderr) => {
      const exitCode = err ? (typeof err.code === 'number' ? err.code : -1) : 0
      const text = stdout.trim()
      const start = text.indexOf('{')
      if (exitCode < 0 || exitCode > 3 || start < 0) {
        reject(new Error(`qemu-img check ${image}: exit code ${String(err?.code ?? exitCode)} ${err?.signal ?? ''}\n${stderr.trim() || text}`))
        return
      }
      let report: Record<string, unknown>
      try {
        report = JSON.parse(text.slice(start)) as Record<string, unknown>
      } catch {
        reject(new Error(`qemu-img check ${image}: output is not JSON:\n${text}\n${stderr.trim()}`))
        return
      }
      const count = (key: string): number => (typeof report[key] === 'number' ? (report[key] as number) : 0)
      resolve({ corruptions: count('corruptions'), checkErrors: count('check-errors'), leaks: count('leaks'), exitCode, text: text.slice(start) })
    })
  })
}

export interface AllowedState {
  /** The last flush completed within the crash prefix. */
  flush: FlushPoint
  /** Ops after that flush that had started before the crash. */
  later: OpRecord[]
  /** Virtual sizes the image may have. */
  sizes: number[]
}

/**
 * What a crash may show when changes[0..durable) all reached the file and nothing at or past
 * `changes` did (flushPoints ordered by change count). For a crash after a prefix both are the
 * prefix length; when writes since the last sync land in another order, `durable` is where
 * that sync was and `changes` is one past the last write that landed.
 */
export function allowedState(flushPoints: readonly FlushPoint[], ops: readonly OpRecord[], changes: number, durable = changes): AllowedState {
  let flush = flushPoints[0]!
  for (const f of flushPoints) if (f.change <= durable) flush = f
  const later = ops.slice(flush.opCount).filter((op) => op.startChange < changes)
  const sizes = [flush.model.length, ...later.map((op) => op.sizeAfter)]
  return { flush, later, sizes }
}

function effectValueAt(e: Effect, guestOffset: number): number | undefined {
  if (guestOffset < e.guestOffset || guestOffset >= e.guestOffset + e.length) return undefined
  return e.bytes ? e.bytes[guestOffset - e.guestOffset]! : 0
}

/** Compared natively first; only differing chunks are checked byte by byte. */
const CHUNK = 64 * 1024

/**
 * The first byte of `got` (the disk read from guest offset 0) that is neither the flushed
 * value (zeros past the model's end) nor a value a later op wrote there; undefined if none.
 */
export function firstDisallowedByte(got: Uint8Array, state: AllowedState): { guestOffset: number; got: number; flushed: number; laterValues: number[] } | undefined {
  const model = state.flush.model
  const effects = state.later.flatMap((op) => op.effects)
  const zeros = new Uint8Array(CHUNK)
  for (let start = 0; start < got.length; start += CHUNK) {
    const end = Math.min(start + CHUNK, got.length)
    const gotChunk = got.subarray(start, end)
    const modelChunk = start < model.length ? model.subarray(start, Math.min(end, model.length)) : zeros.subarray(0, 0)
    if (modelChunk.length === gotChunk.length && Buffer.compare(gotChunk, modelChunk) === 0) continue
    if (modelChunk.length === 0 && Buffer.compare(gotChunk, zeros.subarray(0, gotChunk.length)) === 0) continue
    for (let at = start; at < end; at++) {
      const flushed = at < model.length ? model[at]! : 0
      const value = got[at]!
      if (value === flushed) continue
      const laterValues: number[] = []
      for (const e of effects) {
        const v = effectValueAt(e, at)
        if (v !== undefined) laterValues.push(v)
      }
      if (!laterValues.includes(value)) return { guestOffset: at, got: value, flushed, laterValues }
    }
  }
  return undefined
}

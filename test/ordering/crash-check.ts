/*
 * Checking a crashed image: what qemu-img check says, and whether the guest bytes are allowed.
 *
 * After a crash the guarantee is: everything written before the last completed flush reads as
 * the workload wrote it, except where a later op (started before the crash) wrote again; such
 * a byte may read as the flushed value or as any value a later op gave it, never as anything
 * else. allowedState() says which flush point and which later ops apply to a crash after a
 * given number of changes; firstDisallowedByte() checks a full read of the disk against that.
 */
import { type ChildProcessWithoutNullStreams, execFile, spawn } from 'node:child_process'
import { createInterface } from 'node:readline'
import { fileURLToPath } from 'node:url'
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

export interface ProgramResult {
  /** Exit code; -1 when killed by a signal or not started. */
  code: number
  signal: string | null
  stdout: string
  stderr: string
}

/**
 * Runs programs through a small co-process (qemu-runner.mjs): starting qemu-img from a test
 * process that holds a large heap costs a fork of that heap each time; from the runner it is
 * cheap. Requests may overlap. close() ends the co-process once it has answered everything.
 */
export class ProgramRunner {
  #child: ChildProcessWithoutNullStreams
  #waiting = new Map<number, { resolve: (r: ProgramResult) => void; reject: (e: Error) => void }>()
  #nextId = 0
  #failure: Error | undefined

  constructor() {
    const script = fileURLToPath(new URL('./qemu-runner.mjs', import.meta.url))
    this.#child = spawn(process.execPath, [script], { stdio: ['pipe', 'pipe', 'pipe'] })
    let stderr = ''
    this.#child.stderr.setEncoding('utf8')
    this.#child.stderr.on('data', (chunk: string) => {
      stderr += chunk
    })
    createInterface({ input: this.#child.stdout }).on('line', (line) => {
      const answer = JSON.parse(line) as ProgramResult & { id: number }
      const waiter = this.#waiting.get(answer.id)
      this.#waiting.delete(answer.id)
      waiter?.resolve({ code: answer.code, signal: answer.signal, stdout: answer.stdout, stderr: answer.stderr })
    })
    const fail = (err: Error): void => {
      this.#failure = err
      for (const w of this.#waiting.values()) w.reject(err)
      this.#waiting.clear()
    }
    this.#child.on('error', fail)
    this.#child.on('exit', (code, signal) => {
      if (this.#waiting.size > 0) fail(new Error(`program runner exited (code ${String(code)}, signal ${String(signal)}) with requests pending\n${stderr.trim()}`))
    })
  }

  run(file: string, args: readonly string[]): Promise<ProgramResult> {
    if (this.#failure) return Promise.reject(this.#failure)
    const id = this.#nextId++
    return new Promise((resolve, reject) => {
      this.#waiting.set(id, { resolve, reject })
      this.#child.stdin.write(JSON.stringify({ id, file, args }) + '\n')
    })
  }

  close(): void {
    this.#child.stdin.end()
  }
}

function runDirect(file: string, args: readonly string[]): Promise<ProgramResult> {
  return new Promise((resolve) => {
    execFile(file, [...args], { encoding: 'utf8', timeout: 120_000, maxBuffer: 64 * 1024 * 1024 }, (err, stdout, stderr) => {
      resolve({ code: err ? (typeof err.code === 'number' ? err.code : -1) : 0, signal: err?.signal ?? null, stdout, stderr })
    })
  })
}

/** `qemu-img check --output=json -f qcow2 IMAGE` (through `runner` if given); resolves for exit codes 0-3. */
export async function qemuCheck(qemuImgPath: string, image: string, runner?: ProgramRunner): Promise<CheckReport> {
  const args = ['check', '--output=json', '-f', 'qcow2', image]
  const result = runner ? await runner.run(qemuImgPath, args) : await runDirect(qemuImgPath, args)
  const text = result.stdout.trim()
  const start = text.indexOf('{')
  if (result.code < 0 || result.code > 3 || start < 0) {
    throw new Error(`qemu-img check ${image}: exit code ${result.code} ${result.signal ?? ''}\n${result.stderr.trim() || text}`)
  }
  let report: Record<string, unknown>
  try {
    report = JSON.parse(text.slice(start)) as Record<string, unknown>
  } catch {
    throw new Error(`qemu-img check ${image}: output is not JSON:\n${text}\n${result.stderr.trim()}`)
  }
  const count = (key: string): number => (typeof report[key] === 'number' ? (report[key] as number) : 0)
  return { corruptions: count('corruptions'), checkErrors: count('check-errors'), leaks: count('leaks'), exitCode: result.code, text: text.slice(start) }
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

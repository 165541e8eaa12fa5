/*
 * Helpers of the FUSE tests: an in-memory VirtualDisk with a recognisable pattern, damaged
 * regions and an in-flight counter; running programs with their exit code; mount table checks
 * and the cleanup that never leaves a mount behind.
 */
import { execFile, spawn } from 'node:child_process'
import { readFileSync, readdirSync } from 'node:fs'
import type { VirtualDisk } from '../../lib/disk.js'
import { ClosedError, CorruptImageError, ReadOnlyError } from '../../lib/errors.js'

/** Byte i of a pattern disk: every 4-byte word holds its own offset / 4, salted. */
export function patternByte(guestOffset: number, salt: number): number {
  const word = (Math.floor(guestOffset / 4) ^ salt) >>> 0
  return (word >>> ((guestOffset % 4) * 8)) & 0xff
}

export function patternBytes(guestOffset: number, length: number, salt: number): Buffer {
  const out = Buffer.alloc(length)
  for (let i = 0; i < length; i++) out[i] = patternByte(guestOffset + i, salt)
  return out
}

export interface MemoryDiskOptions {
  sizeBytes: number
  salt?: number
  readOnly?: boolean
  /** Reads touching [start, end) fail with CorruptImageError (EIO). */
  damaged?: { start: number; end: number }
  /** Each read waits this long (ms) before answering, so that requests overlap. */
  readDelayMs?: number
}

/** A disk in RAM; counts calls and the largest number of reads in flight at once. */
export class MemoryDisk implements VirtualDisk {
  readonly readOnly: boolean
  bytes: Buffer
  reads = 0
  writes = 0
  flushes = 0
  resizes = 0
  inFlight = 0
  maxInFlight = 0
  closed = false
  private readonly damaged: MemoryDiskOptions['damaged']
  private readonly readDelayMs: number

  get virtualSize(): number {
    return this.bytes.length
  }

  constructor(opts: MemoryDiskOptions) {
    this.readOnly = opts.readOnly ?? true
    this.bytes = patternBytes(0, opts.sizeBytes, opts.salt ?? 0)
    this.damaged = opts.damaged
    this.readDelayMs = opts.readDelayMs ?? 0
  }

  async read(buf: Uint8Array, guestOffset: number): Promise<void> {
    if (this.closed) throw new ClosedError()
    if (guestOffset < 0 || guestOffset + buf.length > this.virtualSize) throw new Error(`read past the end: ${guestOffset}+${buf.length}`)
    this.reads++
    this.inFlight++
    this.maxInFlight = Math.max(this.maxInFlight, this.inFlight)
    try {
      if (this.readDelayMs > 0) await new Promise((done) => setTimeout(done, this.readDelayMs))
      const d = this.damaged
      if (d && guestOffset < d.end && guestOffset + buf.length > d.start) {
        throw new CorruptImageError(`L2 table for guest offset 0x${d.start.toString(16)} lies past the end of the file`)
      }
      buf.set(this.bytes.subarray(guestOffset, guestOffset + buf.length))
    } finally {
      this.inFlight--
    }
  }

  async write(buf: Uint8Array, guestOffset: number): Promise<void> {
    if (this.closed) throw new ClosedError()
    if (this.readOnly) throw new ReadOnlyError('memory disk is read-only')
    if (guestOffset < 0 || guestOffset + buf.length > this.virtualSize) throw new Error(`write past the end: ${guestOffset}+${buf.length}`)
    this.writes++
    this.bytes.set(buf, guestOffset)
  }

  async writeZeroes(guestOffset: number, byteCount: number): Promise<void> {
    if (this.readOnly) throw new ReadOnlyError('memory disk is read-only')
    this.bytes.fill(0, guestOffset, guestOffset + byteCount)
  }

  /** Resizes like a qcow2 image: the size rounds up to 512 bytes, new bytes read as zeros. */
  async resize(sizeBytes: number): Promise<void> {
    if (this.readOnly) throw new ReadOnlyError('memory disk is read-only')
    this.resizes++
    const rounded = Math.ceil(sizeBytes / 512) * 512
    const next = Buffer.alloc(rounded)
    this.bytes.copy(next, 0, 0, Math.min(rounded, this.bytes.length))
    this.bytes = next
  }

  async flush(): Promise<void> {
    if (this.closed) throw new ClosedError()
    this.flushes++
  }

  async close(): Promise<void> {
    this.closed = true
  }
}

export interface ProcessResult {
  code: number | null
  signal: NodeJS.Signals | null
  stdout: Buffer
  stderr: string
}

/** Runs a program to its end (killed after timeoutMs); never rejects for a non-zero exit. */
export function runProcess(file: string, args: readonly string[], opts: { timeoutMs?: number; env?: NodeJS.ProcessEnv } = {}): Promise<ProcessResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(file, [...args], { stdio: ['ignore', 'pipe', 'pipe'], env: opts.env ?? process.env })
    const out: Buffer[] = []
    let err = ''
    child.stdout.on('data', (chunk: Buffer) => out.push(chunk))
    child.stderr.setEncoding('utf8')
    child.stderr.on('data', (chunk: string) => (err += chunk))
    const timer = setTimeout(() => child.kill('SIGKILL'), opts.timeoutMs ?? 60_000)
    child.on('error', (e) => {
      clearTimeout(timer)
      reject(e)
    })
    // 'exit', not 'close': a background server started by the program may hold its pipes.
    child.on('exit', (code, signal) => {
      clearTimeout(timer)
      setImmediate(() => resolve({ code, signal, stdout: Buffer.concat(out), stderr: err }))
    })
  })
}

export function mountEntry(mountpoint: string): { fsType: string } | undefined {
  let found: { fsType: string } | undefined
  for (const line of readFileSync('/proc/self/mountinfo', 'utf8').split('\n')) {
    const fields = line.split(' ')
    if (fields[4] !== mountpoint) continue
    const sep = fields.indexOf('-', 6)
    found = { fsType: fields[sep + 1] ?? '' }
  }
  return found
}

export function isMounted(mountpoint: string): boolean {
  return mountEntry(mountpoint) !== undefined
}

/** Detaches whatever is mounted at mountpoint (fusermount -uz); never throws. */
export function forceUnmount(mountpoint: string): Promise<void> {
  return new Promise((done) => {
    if (!isMounted(mountpoint)) return done()
    execFile('fusermount', ['-uz', mountpoint], () => done())
  })
}

export async function waitFor(condition: () => boolean | Promise<boolean>, timeoutMs: number, what: string): Promise<void> {
  const deadline = Date.now() + timeoutMs
  while (!(await condition())) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`)
    await new Promise((done) => setTimeout(done, 25))
  }
}

/** True while pid runs (a zombie counts as exited). */
export function processRuns(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8')
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z'
  } catch {
    return false
  }
}

/** Pids of live processes whose command line contains `needle`. */
export function processesMentioning(needle: string): number[] {
  const pids: number[] = []
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue
    try {
      const cmdline = readFileSync(`/proc/${entry}/cmdline`, 'utf8').split('\0').join(' ')
      if (cmdline.includes(needle) && processRuns(Number(entry))) pids.push(Number(entry))
    } catch {
      // gone meanwhile
    }
  }
  return pids
}

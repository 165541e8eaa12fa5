/*
 * A pool of worker threads that compress clusters (compressor.ts says with what): raw deflate
 * through the system zlib (the qemu_deflate addon) or node:zlib's synchronous call, or zstd
 * through the system libzstd (the qemu_zstd addon, which keeps one compression context per
 * worker) or @bokuweb/zstd-wasm (each worker loads its own WebAssembly instance). Workers start
 * on the first job and are referenced only while they have work, so an idle pool never keeps
 * the process alive.
 *
 * Why workers for zlib too: node:zlib's asynchronous calls do compress on the thread pool, but
 * each call also costs about as much event-loop time as the compression itself (stream set-up,
 * deflateInit's allocation, output concatenation; measured: 466 ms of loop time for 320
 * clusters of 64 KiB), time the FUSE requests then wait for. Here the loop only posts messages.
 *
 * What a job costs the event loop, kept small because the loop also answers every FUSE request:
 *  - Input: a cluster in shared memory (sharedBytes(), which the compressed-write pipeline
 *    allocates its cluster buffers with) is passed as it is: the worker reads it where it lies.
 *    Any other input is copied into a buffer that is transferred. The caller must not change a
 *    shared input until its job settles.
 *  - Messages: the jobs submitted in one turn of the event loop go to the workers two to a
 *    message (the two clusters of a 128 KiB FUSE write), and a worker answers a message with
 *    one message, its outputs transferred: a message costs tens of microseconds on both sides.
 *  - Priority: the workers lower their own scheduling priority (nice 19; on Linux the nice value
 *    belongs to each thread). With as many workers as cores, compression would otherwise take
 *    the CPU from the chain that feeds it (the writing program, the kernel's FUSE, the event
 *    loop), and each FUSE request would wait for a time slice; measured on a 2-CPU machine, a
 *    compressed 1 GiB copy took 7% less time with the workers at nice 19.
 *
 * The worker's code is a small CommonJS script run with `eval`: it works the same from the
 * compiled dist/ tree and from the TypeScript sources the tests import, and it loads the
 * encoder by the absolute path resolved here (the server's working directory is /).
 */
import { createRequire } from 'node:module'
import { Worker } from 'node:worker_threads'

/** The workers' nice value (lowest priority). */
const WORKER_NICE = 19
/** Jobs in one message at most: the two 64 KiB clusters of a 128 KiB FUSE write. */
const MAX_JOBS_PER_MESSAGE = 2

const WORKER_SOURCE = `
const { parentPort, workerData } = require('node:worker_threads')
try {
  require('node:os').setPriority(0, workerData.nice)
} catch {
  // Not allowed here: the workers run at the loop's priority.
}
let compress
let ready = Promise.resolve()
if (workerData.codec === 'zstd' && workerData.addonPath) {
  // One ZSTD_compressStream2(ZSTD_e_end) into cluster size - 1 bytes, as QEMU does: undefined if it does not fit.
  const qemu = require(workerData.addonPath)
  compress = (input) => qemu.compress(input, input.length - 1, workerData.zstdLevel)
} else if (workerData.codec === 'zstd') {
  const zstd = require(workerData.modulePath)
  ready = zstd.init()
  compress = (input) => zstd.compress(input, workerData.zstdLevel)
} else if (workerData.addonPath) {
  // One deflate(Z_FINISH) into cluster size - 1 bytes, as QEMU does: undefined if it does not fit.
  const qemu = require(workerData.addonPath)
  const o = workerData.deflateOptions
  compress = (input) => qemu.deflate(input, input.length - 1, o.level, -o.windowBits, o.memLevel, o.strategy)
} else {
  const zlib = require('node:zlib')
  compress = (input) => zlib.deflateRawSync(input, { ...workerData.deflateOptions, chunkSize: Math.max(input.length, 64) })
}
function run(job) {
  try {
    const input = new Uint8Array(job.input, job.offset, job.length)
    const out = compress(input)
    // Not shorter than the input: stored uncompressed (CW-4).
    if (out === undefined || out.length >= input.length) return { id: job.id }
    const own = out.byteOffset === 0 && out.byteLength === out.buffer.byteLength ? out : new Uint8Array(out)
    return { id: job.id, output: own.buffer, length: own.length }
  } catch (err) {
    return { id: job.id, error: String((err && err.message) || err) }
  }
}
parentPort.on('message', (jobs) => {
  ready.then(
    () => {
      const results = jobs.map(run)
      parentPort.postMessage(results, results.flatMap((r) => (r.output ? [r.output] : [])))
    },
    (err) => parentPort.postMessage(jobs.map((job) => ({ id: job.id, error: String((err && err.message) || err) }))),
  )
})
`

/** A buffer of `length` bytes in shared memory: a compression job reads it without a copy. */
export function sharedBytes(length: number): Uint8Array {
  return new Uint8Array(new SharedArrayBuffer(length))
}

/**
 * Shared buffers of one size, recycled: allocating shared memory costs about 13 us a buffer
 * (measured: 6% of the event loop's time in a compressed copy when every cluster had a new
 * one). Keeps at most `maxFree` buffers.
 */
export class SharedBufferPool {
  readonly size: number
  #maxFree: number
  #free: Uint8Array[] = []

  constructor(size: number, maxFree: number) {
    this.size = size
    this.#maxFree = maxFree
  }

  /** A buffer whose bytes are left from its last use. */
  take(): Uint8Array {
    return this.#free.pop() ?? sharedBytes(this.size)
  }

  /** A buffer of zeros. */
  takeZeroed(): Uint8Array {
    const buf = this.#free.pop()
    return buf ? buf.fill(0) : sharedBytes(this.size)
  }

  /** Takes `buf` back; nobody may use it any more (no worker reads it, nothing refers to it). */
  give(buf: Uint8Array): void {
    if (buf.length === this.size && buf.buffer instanceof SharedArrayBuffer && this.#free.length < this.#maxFree) this.#free.push(buf)
  }
}

/**
 * What the workers compress with. zlib: with `addonPath`, the system zlib through the
 * qemu_deflate addon; without, node:zlib. zstd: with `addonPath`, the system libzstd through the
 * qemu_zstd addon; without, @bokuweb/zstd-wasm.
 */
export type PoolCodec = { codec: 'zlib'; deflateOptions: Record<string, number>; addonPath?: string } | { codec: 'zstd'; zstdLevel: number; addonPath?: string }

interface Job {
  /** The stream, or undefined when it is not shorter than the input. */
  resolve: (out: Uint8Array | undefined) => void
  reject: (err: Error) => void
}

/** A job as the worker receives it: its input is [offset, offset + length) of `input`. */
interface JobMessage {
  id: number
  input: ArrayBufferLike
  offset: number
  length: number
}

/** A worker's answer to one job. */
interface JobResult {
  id: number
  output?: ArrayBuffer
  length?: number
  error?: string
}

interface PoolWorker {
  worker: Worker
  jobs: Map<number, Job>
}

export class CompressionPool {
  #threads: number
  #codec: PoolCodec
  #workers: PoolWorker[] = []
  #nextId = 1
  #closed = false
  /** Jobs submitted in this turn of the event loop, posted together when it ends. */
  #batch: { message: JobMessage; job: Job; transfer?: ArrayBuffer }[] = []

  constructor(threads: number, codec: PoolCodec) {
    this.#threads = threads
    this.#codec = codec
  }

  /**
   * The compressed stream of `input`, or undefined when it is not shorter than the input.
   * Shared input (sharedBytes) is read in place and must not change until this settles; other
   * input is copied.
   */
  compress(input: Uint8Array): Promise<Uint8Array | undefined> {
    if (this.#closed) return Promise.reject(new Error('compression worker pool is closed'))
    const id = this.#nextId++
    let message: JobMessage
    let transfer: ArrayBuffer | undefined
    if (input.buffer instanceof SharedArrayBuffer) {
      message = { id, input: input.buffer, offset: input.byteOffset, length: input.length }
    } else {
      // A copy of its own, transferred to the worker (slice() of a Node Buffer would be a view).
      const copy = new Uint8Array(input.length)
      copy.set(input)
      transfer = copy.buffer
      message = { id, input: copy.buffer, offset: 0, length: copy.length }
    }
    return new Promise((resolve, reject) => {
      if (this.#batch.length === 0) queueMicrotask(() => this.#post())
      this.#batch.push({ message, job: { resolve, reject }, transfer })
    })
  }

  /**
   * Posts this turn's jobs, MAX_JOBS_PER_MESSAGE to a message, each message to the worker with
   * the fewest jobs queued (so that many jobs of one turn, as a drain submits, still spread
   * over every worker).
   */
  #post(): void {
    const batch = this.#batch.splice(0)
    if (this.#closed) {
      for (const { job } of batch) job.reject(new Error('compression worker pool is closed'))
      return
    }
    for (let first = 0; first < batch.length; first += MAX_JOBS_PER_MESSAGE) {
      const part = batch.slice(first, first + MAX_JOBS_PER_MESSAGE)
      const slot = this.#pick()
      if (slot.jobs.size === 0) slot.worker.ref()
      for (const { message, job } of part) slot.jobs.set(message.id, job)
      slot.worker.postMessage(
        part.map((b) => b.message),
        part.flatMap((b) => (b.transfer ? [b.transfer] : [])),
      )
    }
  }

  async close(): Promise<void> {
    this.#closed = true
    const workers = this.#workers.splice(0)
    for (const slot of workers) this.#failAll(slot, new Error('compression worker pool closed'))
    await Promise.all(workers.map((slot) => slot.worker.terminate()))
  }

  #pick(): PoolWorker {
    let best: PoolWorker | undefined
    for (const slot of this.#workers) if (!best || slot.jobs.size < best.jobs.size) best = slot
    if (best && (best.jobs.size === 0 || this.#workers.length >= this.#threads)) return best
    return this.#spawn()
  }

  #spawn(): PoolWorker {
    const wasm = this.#codec.codec === 'zstd' && !this.#codec.addonPath
    const modulePath = wasm ? createRequire(import.meta.url).resolve('@bokuweb/zstd-wasm') : undefined
    const worker = new Worker(WORKER_SOURCE, { eval: true, workerData: { ...this.#codec, modulePath, nice: WORKER_NICE } })
    worker.unref()
    const slot: PoolWorker = { worker, jobs: new Map() }
    worker.on('message', (results: JobResult[]) => {
      for (const result of results) {
        const job = slot.jobs.get(result.id)
        if (!job) continue
        slot.jobs.delete(result.id)
        if (result.error !== undefined) job.reject(new Error(`compression failed: ${result.error}`))
        else job.resolve(result.output === undefined ? undefined : new Uint8Array(result.output, 0, result.length ?? 0))
      }
      if (slot.jobs.size === 0) worker.unref()
    })
    worker.on('error', (err) => this.#failAll(slot, err))
    worker.on('exit', () => {
      this.#failAll(slot, new Error('compression worker exited'))
      const at = this.#workers.indexOf(slot)
      if (at >= 0) this.#workers.splice(at, 1)
    })
    this.#workers.push(slot)
    return slot
  }

  #failAll(slot: PoolWorker, err: Error): void {
    for (const job of slot.jobs.values()) job.reject(err)
    slot.jobs.clear()
  }
}

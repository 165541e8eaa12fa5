/*
 * A pool of worker threads that compress clusters (compressor.ts says with what): raw deflate
 * through the system zlib (the qemu_deflate addon) or node:zlib's synchronous call, or zstd
 * through the system libzstd (the qemu_zstd addon, which keeps one compression context per
 * worker) or @bokuweb/zstd-wasm (each worker loads its own WebAssembly instance). A job goes to
 * the worker with the fewest jobs queued; its buffers are transferred (not copied) both ways.
 * Workers start on the first job and are referenced only while they have work, so an idle pool
 * never keeps the process alive.
 *
 * Why workers for zlib too: node:zlib's asynchronous calls do compress on the thread pool, but
 * each call also costs about as much event-loop time as the compression itself (stream set-up,
 * deflateInit's allocation, output concatenation; measured: 466 ms of loop time for 320
 * clusters of 64 KiB), time the FUSE requests then wait for. Here the loop only posts messages.
 *
 * The worker's code is a small CommonJS script run with `eval`: it works the same from the
 * compiled dist/ tree and from the TypeScript sources the tests import, and it loads the
 * encoder by the absolute path resolved here (the server's working directory is /).
 */
import { createRequire } from 'node:module'
import { Worker } from 'node:worker_threads'

const WORKER_SOURCE = `
const { parentPort, workerData } = require('node:worker_threads')
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
parentPort.on('message', (job) => {
  ready.then(() => {
    const out = compress(new Uint8Array(job.input))
    if (out === undefined) return parentPort.postMessage({ id: job.id })
    const own = out.byteOffset === 0 && out.byteLength === out.buffer.byteLength ? out : new Uint8Array(out)
    parentPort.postMessage({ id: job.id, output: own.buffer, length: own.length }, [own.buffer])
  }).catch((err) => parentPort.postMessage({ id: job.id, error: String(err && err.message || err) }))
})
`

/**
 * What the workers compress with. zlib: with `addonPath`, the system zlib through the
 * qemu_deflate addon; without, node:zlib. zstd: with `addonPath`, the system libzstd through the
 * qemu_zstd addon; without, @bokuweb/zstd-wasm.
 */
export type PoolCodec = { codec: 'zlib'; deflateOptions: Record<string, number>; addonPath?: string } | { codec: 'zstd'; zstdLevel: number; addonPath?: string }

interface Job {
  /** The stream, or undefined when it did not fit in the cluster (only the addon says so). */
  resolve: (out: Uint8Array | undefined) => void
  reject: (err: Error) => void
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

  constructor(threads: number, codec: PoolCodec) {
    this.#threads = threads
    this.#codec = codec
  }

  /** The compressed stream of `input` (copied: the caller keeps its buffer). */
  compress(input: Uint8Array): Promise<Uint8Array | undefined> {
    if (this.#closed) return Promise.reject(new Error('compression worker pool is closed'))
    const slot = this.#pick()
    const id = this.#nextId++
    // A copy of its own, transferred to the worker (slice() of a Node Buffer would be a view).
    const copy = new Uint8Array(input.length)
    copy.set(input)
    return new Promise((resolve, reject) => {
      slot.jobs.set(id, { resolve, reject })
      if (slot.jobs.size === 1) slot.worker.ref()
      slot.worker.postMessage({ id, input: copy.buffer }, [copy.buffer])
    })
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
    const worker = new Worker(WORKER_SOURCE, { eval: true, workerData: { ...this.#codec, modulePath } })
    worker.unref()
    const slot: PoolWorker = { worker, jobs: new Map() }
    worker.on('message', (message: { id: number; output?: ArrayBuffer; length?: number; error?: string }) => {
      const job = slot.jobs.get(message.id)
      if (!job) return
      slot.jobs.delete(message.id)
      if (slot.jobs.size === 0) worker.unref()
      if (message.error !== undefined) job.reject(new Error(`compression failed: ${message.error}`))
      else job.resolve(message.output === undefined ? undefined : new Uint8Array(message.output, 0, message.length ?? 0))
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

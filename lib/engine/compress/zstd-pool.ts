/*
 * A pool of worker threads that compress clusters with zstd (@bokuweb/zstd-wasm, see
 * compressor.ts for why that encoder). Each worker loads its own WebAssembly instance; a job
 * goes to the worker with the fewest jobs queued, its buffer is transferred (not copied) both
 * ways. Workers start on the first job and are referenced only while they have work, so an
 * idle pool never keeps the process alive.
 *
 * The worker's code is a small CommonJS script run with `eval`: it works the same from the
 * compiled dist/ tree and from the TypeScript sources the tests import, and it loads the
 * encoder by the absolute path resolved here (the server's working directory is /).
 */
import { createRequire } from 'node:module'
import { Worker } from 'node:worker_threads'

const WORKER_SOURCE = `
const { parentPort, workerData } = require('node:worker_threads')
const zstd = require(workerData.modulePath)
const ready = zstd.init()
parentPort.on('message', (job) => {
  ready.then(() => {
    const out = zstd.compress(new Uint8Array(job.input), workerData.level)
    parentPort.postMessage({ id: job.id, output: out.buffer, byteOffset: out.byteOffset, length: out.length }, [out.buffer])
  }).catch((err) => parentPort.postMessage({ id: job.id, error: String(err && err.message || err) }))
})
`

interface Job {
  resolve: (out: Uint8Array) => void
  reject: (err: Error) => void
}

interface PoolWorker {
  worker: Worker
  jobs: Map<number, Job>
}

export class ZstdPool {
  #threads: number
  #level: number
  #workers: PoolWorker[] = []
  #nextId = 1
  #closed = false

  constructor(threads: number, level: number) {
    this.#threads = threads
    this.#level = level
  }

  /** The zstd frame of `input` (copied: the caller keeps its buffer). */
  compress(input: Uint8Array): Promise<Uint8Array> {
    if (this.#closed) return Promise.reject(new Error('zstd worker pool is closed'))
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
    for (const slot of workers) this.#failAll(slot, new Error('zstd worker pool closed'))
    await Promise.all(workers.map((slot) => slot.worker.terminate()))
  }

  #pick(): PoolWorker {
    let best: PoolWorker | undefined
    for (const slot of this.#workers) if (!best || slot.jobs.size < best.jobs.size) best = slot
    if (best && (best.jobs.size === 0 || this.#workers.length >= this.#threads)) return best
    return this.#spawn()
  }

  #spawn(): PoolWorker {
    const modulePath = createRequire(import.meta.url).resolve('@bokuweb/zstd-wasm')
    const worker = new Worker(WORKER_SOURCE, { eval: true, workerData: { modulePath, level: this.#level } })
    worker.unref()
    const slot: PoolWorker = { worker, jobs: new Map() }
    worker.on('message', (message: { id: number; output?: ArrayBuffer; byteOffset?: number; length?: number; error?: string }) => {
      const job = slot.jobs.get(message.id)
      if (!job) return
      slot.jobs.delete(message.id)
      if (slot.jobs.size === 0) worker.unref()
      if (message.error !== undefined || message.output === undefined) job.reject(new Error(`zstd compression failed: ${message.error ?? 'no output'}`))
      else job.resolve(new Uint8Array(message.output, message.byteOffset ?? 0, message.length ?? 0))
    })
    worker.on('error', (err) => this.#failAll(slot, err))
    worker.on('exit', () => {
      this.#failAll(slot, new Error('zstd worker exited'))
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

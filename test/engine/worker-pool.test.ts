/*
 * The compression worker pool (lib/engine/compress/worker-pool.ts): shared and ordinary input,
 * jobs of one turn in one message, answers for streams that do not shrink, the workers' low
 * priority, and the recycled shared buffers.
 */
import { randomBytes } from 'node:crypto'
import * as fs from 'node:fs'
import * as os from 'node:os'
import * as zlib from 'node:zlib'
import { afterEach, describe, expect, test } from 'vitest'
import { QEMU_DEFLATE_MEM_LEVEL, QEMU_DEFLATE_WINDOW_BITS } from '../../lib/engine/compress/compressor.js'
import { CompressionPool, SharedBufferPool, sharedBytes } from '../../lib/engine/compress/worker-pool.js'

const CS = 64 * 1024
const deflateOptions = { level: 6, windowBits: QEMU_DEFLATE_WINDOW_BITS, memLevel: QEMU_DEFLATE_MEM_LEVEL, strategy: 0 }
const inflate = (stream: Uint8Array) => new Uint8Array(zlib.inflateRawSync(stream, { windowBits: QEMU_DEFLATE_WINDOW_BITS }))

/** A cluster of text-like bytes that deflate shrinks, different for each seed. */
function textCluster(seed: number, into: Uint8Array = new Uint8Array(CS)): Uint8Array {
  const words = ['qcow2', 'cluster', 'refcount', 'table', 'offset', `n${seed}`, 'l2', 'entry']
  let at = 0
  for (let i = seed; at < into.length; i++) {
    const word = Buffer.from(`${words[(i * 7) % words.length]} `)
    into.set(word.subarray(0, Math.min(word.length, into.length - at)), at)
    at += word.length
  }
  return into
}

let pool: CompressionPool | undefined
afterEach(async () => {
  await pool?.close()
  pool = undefined
})

describe('CompressionPool', () => {
  test('shared and ordinary input, submitted in one turn, all come back right', async () => {
    pool = new CompressionPool(2, { codec: 'zlib', deflateOptions })
    const inputs = [0, 1, 2, 3, 4, 5].map((seed) => (seed % 2 ? textCluster(seed) : textCluster(seed, sharedBytes(CS))))
    const outputs = await Promise.all(inputs.map((input) => pool!.compress(input)))
    outputs.forEach((out, i) => {
      expect(out).toBeDefined()
      expect(out!.length).toBeLessThan(CS)
      expect(inflate(out!)).toEqual(new Uint8Array(inputs[i]!))
    })
    // The ordinary input was copied, not transferred: the caller still has its bytes.
    expect(inputs[1]!.length).toBe(CS)
  })

  test('a shared input at an offset inside a larger shared buffer', async () => {
    pool = new CompressionPool(1, { codec: 'zlib', deflateOptions })
    const big = sharedBytes(3 * CS)
    textCluster(9, big.subarray(CS, 2 * CS))
    const out = await pool.compress(big.subarray(CS, 2 * CS))
    expect(inflate(out!)).toEqual(new Uint8Array(big.subarray(CS, 2 * CS)))
  })

  test('data that does not shrink answers undefined (stored uncompressed)', async () => {
    pool = new CompressionPool(1, { codec: 'zlib', deflateOptions })
    const random = sharedBytes(CS)
    random.set(randomBytes(CS))
    expect(zlib.deflateRawSync(random, deflateOptions).length).toBeGreaterThanOrEqual(CS)
    expect(await pool.compress(random)).toBeUndefined()
  })

  test('rejects after close, including jobs not yet posted', async () => {
    pool = new CompressionPool(1, { codec: 'zlib', deflateOptions })
    const pending = pool.compress(textCluster(1))
    await pool.close()
    await expect(pending).rejects.toThrow(/closed/)
    await expect(pool.compress(textCluster(2))).rejects.toThrow(/closed/)
  })

  // The nice value of a thread is field 19 of /proc/self/task/TID/stat (Linux).
  const niceValues = () =>
    fs.readdirSync('/proc/self/task').map((tid) => Number(fs.readFileSync(`/proc/self/task/${tid}/stat`, 'utf8').split(') ')[1]!.split(' ')[16]))
  const onLinux = process.platform === 'linux' ? test : test.skip

  onLinux('the workers run at nice 19; the event loop keeps its priority', async () => {
    const before = os.getPriority()
    const niceBefore = niceValues().filter((n) => n === 19).length
    pool = new CompressionPool(2, { codec: 'zlib', deflateOptions })
    // Three jobs in one turn: two messages, to two workers.
    await Promise.all([pool.compress(textCluster(1)), pool.compress(textCluster(2)), pool.compress(textCluster(3))])
    expect(niceValues().filter((n) => n === 19).length - niceBefore).toBe(2)
    expect(os.getPriority()).toBe(before)
  })
})

describe('SharedBufferPool', () => {
  test('recycles up to maxFree buffers of its size in shared memory; takeZeroed clears', () => {
    const buffers = new SharedBufferPool(4096, 2)
    const a = buffers.take()
    expect(a.buffer).toBeInstanceOf(SharedArrayBuffer)
    expect(a.length).toBe(4096)
    a.fill(7)
    buffers.give(a)
    expect(buffers.take()).toBe(a)
    buffers.give(a)
    const zeroed = buffers.takeZeroed()
    expect(zeroed).toBe(a)
    expect(zeroed.every((b) => b === 0)).toBe(true)
    // Only its own size, in shared memory, and at most maxFree.
    buffers.give(new Uint8Array(4096))
    buffers.give(sharedBytes(512))
    const kept = [sharedBytes(4096), sharedBytes(4096), sharedBytes(4096)]
    for (const b of kept) buffers.give(b)
    const back = [buffers.take(), buffers.take(), buffers.take()]
    expect(back.slice(0, 2).sort()).toEqual(kept.slice(0, 2).reverse().sort())
    expect(kept).not.toContain(back[2])
  })
})

/*
 * The sequential compressed-write cache (lib/engine/compress/compressed-cache.ts), rule by rule
 * (WC-1 to WC-22 in docs/COMPRESSION.md), against a recording writer: synchronous like the
 * image file, or asynchronous and slow to put flushes in flight.
 */
import { describe, expect, test } from 'vitest'
import { CompressedWriteCache } from '../../lib/engine/compress/compressed-cache.js'
import { MemoryBlockFile } from '../helpers/memory-file.js'

const CS = 65536
const A = 4096

/** Bytes 1..255 repeating, offset by `salt`: never zero, so padding is told apart. */
function bytes(length: number, salt: number): Uint8Array {
  const out = new Uint8Array(length)
  for (let i = 0; i < length; i++) out[i] = ((i + salt) % 255) + 1
  return out
}

interface Recorded {
  hostOffset: number
  data: Uint8Array
}

function syncCache(clusterSize = CS): { cache: CompressedWriteCache; writes: Recorded[]; file: MemoryBlockFile } {
  const writes: Recorded[] = []
  const file = MemoryBlockFile.fromBytes('host', new Uint8Array(0))
  const cache = new CompressedWriteCache(clusterSize, (buf, hostOffset) => {
    writes.push({ hostOffset, data: buf.slice() })
    file.pwrite(buf, hostOffset, 'compressed')
  })
  return { cache, writes, file }
}

/** A writer whose writes finish only when release() is called. */
function slowCache() {
  const writes: Recorded[] = []
  const file = MemoryBlockFile.fromBytes('host', new Uint8Array(0))
  const gates: (() => void)[] = []
  const events: string[] = []
  const cache = new CompressedWriteCache(CS, (buf, hostOffset) => {
    const data = buf.slice()
    writes.push({ hostOffset, data })
    events.push(`start ${hostOffset}`)
    return new Promise<void>((done) =>
      gates.push(() => {
        file.pwrite(data, hostOffset, 'compressed')
        events.push(`end ${hostOffset}`)
        done()
      }),
    )
  })
  return { cache, writes, file, events, release: () => gates.shift()?.() }
}

function read(cache: CompressedWriteCache, file: MemoryBlockFile, hostOffset: number, length: number): Uint8Array {
  const out = new Uint8Array(length)
  file.pread(out, hostOffset)
  cache.overlay(out, hostOffset)
  return out
}

describe('compressed-write cache', () => {
  test('WC-1, WC-2: one entry per host cluster; sequential writes append to the unfinished one', () => {
    const { cache, writes } = syncCache()
    cache.write(CS + 100, bytes(1000, 1))
    cache.write(CS + 1100, bytes(500, 2))
    cache.write(CS + 1600, bytes(10, 3))
    expect(cache.entries()).toEqual([{ start: CS + 100, bytes: 1510, finished: false, flushing: false }])
    expect(writes).toEqual([])
  })

  test('WC-3a: an entry reaching the end of its host cluster is finished', () => {
    const { cache } = syncCache()
    cache.write(2 * CS + 60000, bytes(5536, 1))
    expect(cache.entries()).toEqual([{ start: 2 * CS + 60000, bytes: 5536, finished: true, flushing: false }])
  })

  test('WC-3b: a write for another host cluster finishes the unfinished entry; the new one may start unaligned', () => {
    const { cache } = syncCache()
    cache.write(CS + 100, bytes(1000, 1))
    cache.write(5 * CS + 777, bytes(300, 2))
    expect(cache.entries()).toEqual([
      { start: CS + 100, bytes: 1000, finished: true, flushing: false },
      { start: 5 * CS + 777, bytes: 300, finished: false, flushing: false },
    ])
  })

  test('WC-4: non-sequential writes, writes into a finished entry and overlapping writes are refused', () => {
    const { cache } = syncCache()
    cache.write(CS, bytes(1000, 1))
    expect(() => cache.write(CS + 2000, bytes(10, 2))).toThrow(/not sequential/)
    expect(() => cache.write(CS + 500, bytes(10, 2))).toThrow(/not sequential/)
    cache.write(3 * CS, bytes(10, 3))
    expect(() => cache.write(CS + 1000, bytes(10, 4))).toThrow(/finished host cluster/)
    expect(cache.entries().map((e) => e.bytes)).toEqual([1000, 10])
  })

  test('WC-5: a write across a host-cluster boundary is split into independent entries', () => {
    const { cache, writes, file } = syncCache()
    const data = bytes(3000, 7)
    cache.write(2 * CS - 1000, data)
    expect(cache.entries()).toEqual([
      { start: 2 * CS - 1000, bytes: 1000, finished: true, flushing: false },
      { start: 2 * CS, bytes: 2000, finished: false, flushing: false },
    ])
    cache.flush(false)
    expect(writes.map((w) => [w.hostOffset, w.data.length])).toEqual([[2 * CS - 1000, 1000]])
    // The second entry is untouched by the first one's flush and still reads back.
    expect(read(cache, file, 2 * CS - 1000, 3000)).toEqual(data)
  })

  test('WC-6: finished entries are flushed in write order', () => {
    const { cache, writes } = syncCache()
    cache.write(7 * CS + 10, bytes(100, 1))
    cache.write(3 * CS + 20, bytes(100, 2))
    cache.write(9 * CS + 30, bytes(100, 3))
    cache.write(4 * CS, bytes(100, 4))
    cache.flush(false)
    expect(writes.map((w) => w.hostOffset)).toEqual([7 * CS + 10, 3 * CS + 20, 9 * CS + 30])
    expect(cache.entries()).toEqual([{ start: 4 * CS, bytes: 100, finished: false, flushing: false }])
  })

  test('WC-7: a finished entry is written up to an aligned end, zero-padded, its start not aligned down', () => {
    const { cache, writes, file } = syncCache()
    file.pwrite(new Uint8Array(3 * CS).fill(0xee), 0, 'data')
    cache.write(CS + 1234, bytes(5000, 1))
    cache.write(2 * CS + 8, bytes(10, 2))
    cache.flush(false)
    expect(writes).toHaveLength(1)
    const w = writes[0]!
    expect(w.hostOffset).toBe(CS + 1234)
    expect(w.hostOffset + w.data.length).toBe(CS + 8192)
    expect((w.hostOffset + w.data.length) % A).toBe(0)
    expect(w.data.subarray(5000).every((b) => b === 0)).toBe(true)
    // The bytes before the start are untouched on disk.
    const before = new Uint8Array(1234)
    file.pread(before, CS)
    expect(before.every((b) => b === 0xee)).toBe(true)
  })

  test('WC-7: the flush alignment is min(cluster size, max(request alignment, 4 KiB))', () => {
    expect(new CompressedWriteCache(512, () => undefined).alignment).toBe(512)
    expect(new CompressedWriteCache(CS, () => undefined).alignment).toBe(4096)
    expect(new CompressedWriteCache(CS, () => undefined, 8192).alignment).toBe(8192)
    // A 512-byte cluster: the padded end never passes the cluster end.
    const { cache, writes } = syncCache(512)
    cache.write(1024 + 100, bytes(50, 1))
    cache.write(4096, bytes(10, 2))
    cache.flush(false)
    expect(writes.map((w) => [w.hostOffset, w.data.length])).toEqual([[1124, 412]])
  })

  test('WC-8, WC-9: the unfinished entry is flushed exactly; later appends start a new entry and leave flushed bytes alone', () => {
    const { cache, writes, file } = syncCache()
    file.pwrite(new Uint8Array(2 * CS).fill(0xee), 0, 'data')
    const first = bytes(777, 1)
    cache.write(CS + 3, first)
    cache.flush(true)
    expect(writes.map((w) => [w.hostOffset, w.data.length])).toEqual([[CS + 3, 777]])
    expect(cache.size).toBe(0)
    const tail = new Uint8Array(10)
    file.pread(tail, CS + 780)
    expect(tail.every((b) => b === 0xee)).toBe(true)
    // More data packed after it: a new entry at the unaligned offset.
    const second = bytes(900, 2)
    cache.write(CS + 780, second)
    expect(cache.entries()).toEqual([{ start: CS + 780, bytes: 900, finished: false, flushing: false }])
    cache.flush(true)
    expect(writes.map((w) => [w.hostOffset, w.data.length])).toEqual([
      [CS + 3, 777],
      [CS + 780, 900],
    ])
    expect(read(cache, file, CS + 3, 777)).toEqual(first)
    expect(read(cache, file, CS + 780, 900)).toEqual(second)
  })

  test('WC-10: flush(true) writes finished entries first, then the unfinished one', () => {
    const { cache, writes } = syncCache()
    cache.write(2 * CS + 5, bytes(10, 1))
    cache.write(6 * CS + 5, bytes(10, 2))
    cache.flush(true)
    expect(writes.map((w) => w.hostOffset)).toEqual([2 * CS + 5, 6 * CS + 5])
    expect(writes[0]!.data.length).toBe(A - 5)
    expect(writes[1]!.data.length).toBe(10)
  })

  test('WC-10: a flush ends while writes keep arriving: it writes what was there when it started', async () => {
    const { cache, writes, release } = slowCache()
    cache.write(CS, bytes(100, 1))
    const flushed = cache.flush(true)
    expect(flushed).toBeInstanceOf(Promise)
    // Appends while in flight, over and over.
    let next = CS + 100
    for (let i = 0; i < 5; i++) {
      cache.write(next, bytes(10, i))
      next += 10
      release()
      await Promise.resolve()
    }
    for (let i = 0; i < 10; i++) {
      release()
      await new Promise((done) => setImmediate(done))
    }
    await flushed
    expect(writes[0]).toMatchObject({ hostOffset: CS })
    expect(writes[0]!.data.length).toBe(100)
  })

  test('WC-12: a failed flush drops the entry, the error is thrown to that flush and sticks', () => {
    const err = Object.assign(new Error('EIO: simulated'), { code: 'EIO' })
    let fail = true
    const cache = new CompressedWriteCache(CS, () => {
      if (fail) throw err
    })
    cache.write(CS, bytes(100, 1))
    cache.write(2 * CS, bytes(100, 2))
    // The write that finished the first host cluster runs the flush, and gets the error.
    expect(() => cache.flush(false)).toThrow(err)
    expect(cache.entries().map((e) => e.start)).toEqual([2 * CS])
    fail = false
    expect(() => cache.flush(true)).toThrow(err)
    expect(() => cache.flush(false)).toThrow(err)
    expect(() => cache.write(2 * CS + 100, bytes(1, 1))).toThrow(err)
    expect(cache.error).toBe(err)
  })

  test('WC-12: an asynchronous flush failure rejects that flush and every later one', async () => {
    const err = Object.assign(new Error('EIO: simulated'), { code: 'EIO' })
    const cache = new CompressedWriteCache(CS, () => Promise.reject(err))
    cache.write(CS, bytes(100, 1))
    await expect(cache.flush(true)).rejects.toBe(err)
    expect(() => cache.flush(true)).toThrow(err)
  })

  test('WC-13, WC-14: reads overlay cached bytes per byte range, across host clusters, during a flush too', async () => {
    const { cache, file, release } = slowCache()
    const old = new Uint8Array(4 * CS).fill(0xab)
    file.pwrite(old, 0, 'data')
    // A compressed cluster spanning host clusters 1 and 2.
    const data = bytes(3000, 5)
    cache.write(2 * CS - 1000, data)
    expect(read(cache, file, 2 * CS - 1000, 3000)).toEqual(data)
    // The finished first part is being flushed (not yet on disk): still read from the cache.
    const flushed = cache.flush(false) as Promise<void>
    expect(cache.entries()[0]!.flushing).toBe(true)
    expect(read(cache, file, 2 * CS - 1000, 3000)).toEqual(data)
    release()
    await flushed
    // Flushed part from the file, the unfinished part from the cache.
    expect(read(cache, file, 2 * CS - 1000, 3000)).toEqual(data)
    // Bytes no entry holds are left as read, never made up.
    const around = read(cache, file, 2 * CS - 1100, 3200)
    expect(around.subarray(0, 100).every((b) => b === 0xab)).toBe(true)
    expect(around.subarray(3100).every((b) => b === 0xab)).toBe(true)
  })

  test('WC-15: a freed host cluster is dropped without being written', () => {
    const { cache, writes } = syncCache()
    cache.write(CS + 10, bytes(100, 1))
    cache.write(3 * CS + 10, bytes(100, 2))
    expect(cache.drop(CS)).toBeUndefined()
    expect(cache.drop(3 * CS)).toBeUndefined()
    cache.flush(true)
    expect(writes).toEqual([])
    expect(cache.empty).toBe(true)
  })

  test('WC-16, WC-17: dropping a cluster being flushed waits for that flush; it stays busy until then', async () => {
    const { cache, events, release } = slowCache()
    cache.write(CS, bytes(100, 1))
    cache.write(2 * CS, bytes(10, 2))
    const flushed = cache.flush(false) as Promise<void>
    expect(cache.busy(CS)).toBe(true)
    const dropped = cache.drop(CS)
    expect(dropped).toBeInstanceOf(Promise)
    let dropDone = false
    void dropped!.then(() => {
      dropDone = true
      // When the drop returns, the flusher is done with the entry.
      events.push(`drop done, busy=${cache.busy(CS)}, entries=${cache.entries().length}`)
    })
    await new Promise((done) => setImmediate(done))
    expect(dropDone).toBe(false)
    // Not readable any more, not appendable.
    expect(cache.entries().map((e) => e.start)).toEqual([2 * CS])
    release()
    await flushed
    await dropped
    expect(events).toEqual([`start ${CS}`, `end ${CS}`, 'drop done, busy=false, entries=1'])
  })

  test('WC-18: appends during the unfinished entry flush are not lost; only the flushed prefix leaves', async () => {
    const { cache, writes, file, release } = slowCache()
    const first = bytes(1000, 1)
    const more = bytes(500, 2)
    cache.write(CS, first)
    const flushed = cache.flush(true) as Promise<void>
    cache.write(CS + 1000, more)
    release()
    await new Promise((done) => setImmediate(done))
    await flushed
    // The append came after the flush started: it stays cached (not lost), for the next flush.
    expect(cache.entries()).toEqual([{ start: CS + 1000, bytes: 500, finished: false, flushing: false }])
    expect(read(cache, file, CS, 1500)).toEqual(new Uint8Array([...first, ...more]))
    const again = cache.flush(true) as Promise<void>
    release()
    await again
    expect(writes.map((w) => [w.hostOffset, w.data.length])).toEqual([
      [CS, 1000],
      [CS + 1000, 500],
    ])
    expect(read(cache, file, CS, 1500)).toEqual(new Uint8Array([...first, ...more]))
  })

  test('WC-19: no size limit is needed: with flushes after every write it holds one unfinished entry', () => {
    const { cache } = syncCache()
    let offset = CS + 17
    for (let i = 0; i < 500; i++) {
      cache.write(offset, bytes(3001, i))
      offset += 3001
      cache.flush(false)
      expect(cache.size).toBeLessThanOrEqual(1)
    }
  })

  test('WC-20: unmount: flush(true) leaves nothing cached', () => {
    const { cache } = syncCache()
    cache.write(CS, bytes(70000, 1))
    cache.flush(true)
    expect(cache.empty).toBe(true)
  })

  test('WC-21: a flush that would land on metadata fails through the overlap check of its writer', async () => {
    const { MetadataOverlapGuard } = await import('../../lib/meta/overlap-guard.js')
    const guard = new MetadataOverlapGuard(MemoryBlockFile.fromBytes('img', new Uint8Array(4 * CS)), CS)
    guard.attach({ version: () => [1], ranges: () => [{ kind: 'l2' as const, hostOffset: 2 * CS, bytes: CS }] })
    const cache = new CompressedWriteCache(CS, (buf, hostOffset) => guard.pwrite(buf, hostOffset, 'compressed'))
    cache.write(CS + 10, bytes(10, 1))
    cache.flush(true)
    cache.write(2 * CS + 10, bytes(10, 1))
    expect(() => cache.flush(true)).toThrow(/would overwrite the l2/)
  })

  test('WC-22: N packed compressed clusters cost about one write per host cluster, finished writes aligned', () => {
    const { cache, writes } = syncCache()
    let offset = 3 * CS
    const sizes = [9547, 20000, 1234, 40000, 31111, 7, 65000, 12345, 23456, 3000, 50000, 1]
    for (let round = 0; round < 20; round++) {
      for (const size of sizes) {
        cache.write(offset, bytes(size, round))
        offset += size
        cache.flush(false)
      }
    }
    cache.flush(true)
    const hostClusters = Math.ceil(offset / CS) - 3
    expect(writes.length).toBeLessThanOrEqual(hostClusters + 1)
    const last = writes[writes.length - 1]!
    for (const w of writes) if (w !== last) expect((w.hostOffset + w.data.length) % A).toBe(0)
    expect(last.hostOffset + last.data.length).toBe(offset)
  })
})

/*
 * Read-ahead (lib/io/read-ahead.ts, lib/io/native/read_ahead.c): what it reads ahead for
 * sequential, disordered and random reads, that every byte it hands out is the file's, the
 * waits, failures, the page cache check and close; then the addon and NodeBlockFile on real
 * files.
 */
import * as fs from 'node:fs'
import * as path from 'node:path'
import { afterAll, beforeAll, describe, expect, test } from 'vitest'
import { NodeBlockFile } from '../../lib/io/block-file.js'
import { READ_AHEAD_CHUNK_BYTES, ReadAhead, type ReadAheadIo, openReadAheadIo, readAheadCalls } from '../../lib/io/read-ahead.js'
import { makeTempDir, removeTempDir } from '../helpers/qemu.js'

const KIB = 1024
const MIB = 1024 * KIB
/** Small chunks keep the fake files small; the policy does not depend on the size. */
const CHUNK = 64 * KIB
const AHEAD = 4
const REQUEST = 16 * KIB

function patternFile(length: number): Uint8Array {
  const out = new Uint8Array(length)
  let x = 0x9e3779b9
  for (let i = 0; i < length; i += 4) {
    x = (Math.imul(x, 1664525) + 1013904223) >>> 0
    out[i] = x & 0xff
    out[i + 1] = (x >>> 8) & 0xff
    out[i + 2] = (x >>> 16) & 0xff
    out[i + 3] = x >>> 24
  }
  return out
}

interface PendingRead {
  hostOffset: number
  settle(fail?: Error): void
}

/**
 * A file in memory behind a ReadAheadIo. Reads ahead wait in `pending` until settled (all at
 * once with settleAll), so a test decides when they arrive; `direct` counts the file's own reads.
 */
function fakeFile(length: number, options: { cached?: (hostOffset: number) => boolean } = {}) {
  const bytes = patternFile(length)
  const fake = {
    bytes,
    pending: [] as PendingRead[],
    readsAhead: [] as number[],
    direct: [] as [number, number][],
    io: {
      read(buf: Uint8Array, hostOffset: number): Promise<number> {
        fake.readsAhead.push(hostOffset)
        return new Promise<number>((resolve, reject) => {
          fake.pending.push({
            hostOffset,
            settle(fail?: Error) {
              if (fail) return reject(fail)
              const n = Math.max(0, Math.min(buf.length, length - hostOffset))
              buf.set(bytes.subarray(hostOffset, hostOffset + n))
              resolve(n)
            },
          })
        })
      },
      allocate: (n: number) => new Uint8Array(n),
      ...(options.cached ? { cached: (hostOffset: number) => options.cached!(hostOffset) } : {}),
    } satisfies ReadAheadIo,
    readDirect(buf: Uint8Array, hostOffset: number): number {
      fake.direct.push([hostOffset, buf.length])
      const n = Math.max(0, Math.min(buf.length, length - hostOffset))
      buf.set(bytes.subarray(hostOffset, hostOffset + n))
      return n
    },
    async settleAll(): Promise<void> {
      const now = fake.pending.splice(0)
      for (const p of now) p.settle()
      await new Promise((r) => setImmediate(r))
    },
  }
  return fake
}

/** Reads [hostOffset, +length) through the read-ahead, waiting as the read path does. */
async function readThrough(ra: ReadAhead, fake: ReturnType<typeof fakeFile>, hostOffset: number, length: number): Promise<Uint8Array> {
  const buf = new Uint8Array(length)
  const arriving = ra.whenReadable(hostOffset, length)
  if (arriving) {
    await fake.settleAll()
    await arriving
  }
  const n = ra.read(buf, hostOffset, fake.readDirect)
  return buf.subarray(0, n)
}

describe('ReadAhead: what it reads ahead', () => {
  test('sequential reads: after two that continue, the next chunks are read ahead and serve every later byte', async () => {
    const fake = fakeFile(16 * CHUNK)
    const ra = new ReadAhead(fake.io, 16 * CHUNK, { chunkBytes: CHUNK, chunksAhead: AHEAD })
    for (let at = 0; at < 16 * CHUNK; at += REQUEST) {
      const got = await readThrough(ra, fake, at, REQUEST)
      expect(Buffer.from(got).equals(Buffer.from(fake.bytes.subarray(at, at + REQUEST)))).toBe(true)
    }
    // The first three requests (48 KiB) came from the file; the third started the read-ahead
    // at the chunk its end lies in (chunk 0), and every chunk was read ahead exactly once.
    expect(fake.direct.map(([at]) => at)).toEqual([0, REQUEST, 2 * REQUEST])
    expect([...fake.readsAhead].sort((a, b) => a - b)).toEqual(Array.from({ length: 16 }, (_, i) => i * CHUNK))
    const stats = ra.stats()
    expect(stats.chunksRead).toBe(16)
    expect(stats.bytesServed).toBe(16 * CHUNK - 3 * REQUEST)
    // Chunk 0 was served from its 48 KiB on: it stays until dropped or the file closes.
    expect(ra.chunkIndexes()).toEqual([0])
  })

  test('reads in a shuffled order inside the window (as FUSE hands them over) never read a chunk twice', async () => {
    const fileBytes = 32 * CHUNK
    const fake = fakeFile(fileBytes)
    const ra = new ReadAhead(fake.io, fileBytes, { chunkBytes: CHUNK, chunksAhead: AHEAD })
    const requests: number[] = []
    for (let at = 0; at < fileBytes; at += REQUEST) requests.push(at)
    // Swap neighbours in groups, as out-of-order delivery does: 1 0 3 2 ... and some longer jumps back.
    for (let i = 0; i + 1 < requests.length; i += 2) [requests[i], requests[i + 1]] = [requests[i + 1]!, requests[i]!]
    for (let i = 5; i + 3 < requests.length; i += 11) [requests[i], requests[i + 3]] = [requests[i + 3]!, requests[i]!]
    const out = new Uint8Array(fileBytes)
    for (const at of requests) out.set(await readThrough(ra, fake, at, REQUEST), at)
    expect(Buffer.from(out).equals(Buffer.from(fake.bytes))).toBe(true)
    const counts = new Map<number, number>()
    for (const at of fake.readsAhead) counts.set(at, (counts.get(at) ?? 0) + 1)
    expect([...counts.values()].every((n) => n === 1)).toBe(true)
    expect(ra.stats().bytesServed).toBeGreaterThan(fileBytes * 0.8)
  })

  test('random reads never start a read-ahead', async () => {
    const fileBytes = 256 * CHUNK
    const fake = fakeFile(fileBytes)
    const ra = new ReadAhead(fake.io, fileBytes, { chunkBytes: CHUNK, chunksAhead: AHEAD })
    let x = 12345
    for (let i = 0; i < 500; i++) {
      x = (Math.imul(x, 1103515245) + 12345) >>> 0
      const at = (x % (fileBytes / 4096)) * 4096
      const got = await readThrough(ra, fake, at, 4096)
      expect(got[0]).toBe(fake.bytes[at])
    }
    expect(fake.readsAhead).toEqual([])
  })

  test('a read that continues one of the latest reads counts as sequential: two interleaved streams both read ahead', async () => {
    const fileBytes = 64 * CHUNK
    const fake = fakeFile(fileBytes)
    const ra = new ReadAhead(fake.io, fileBytes, { chunkBytes: CHUNK, chunksAhead: AHEAD })
    const streams = [0, 32 * CHUNK]
    for (let i = 0; i < 16; i++) {
      for (const base of streams) await readThrough(ra, fake, base + i * REQUEST, REQUEST)
    }
    expect(fake.readsAhead.some((at) => at < 32 * CHUNK)).toBe(true)
    expect(fake.readsAhead.some((at) => at >= 32 * CHUNK)).toBe(true)
  })

  test('whenReadable: a promise while a chunk of the range is on its way, undefined otherwise', async () => {
    const fake = fakeFile(16 * CHUNK)
    const ra = new ReadAhead(fake.io, 16 * CHUNK, { chunkBytes: CHUNK, chunksAhead: AHEAD })
    expect(ra.whenReadable(0, REQUEST)).toBeUndefined()
    for (let at = 0; at < 3 * REQUEST; at += REQUEST) ra.read(new Uint8Array(REQUEST), at, fake.readDirect)
    expect(fake.pending.map((p) => p.hostOffset)).toEqual([0, CHUNK, 2 * CHUNK, 3 * CHUNK])
    // A range across chunks 1 and 2 waits for both.
    const arriving = ra.whenReadable(2 * CHUNK - KIB, 2 * KIB)
    expect(arriving).toBeInstanceOf(Promise)
    expect(ra.stats().waits).toBe(1)
    let settled = false
    void arriving!.then(() => (settled = true))
    fake.pending[1]!.settle()
    await new Promise((r) => setImmediate(r))
    expect(settled).toBe(false)
    fake.pending[2]!.settle()
    await new Promise((r) => setImmediate(r))
    expect(settled).toBe(true)
    expect(ra.whenReadable(2 * CHUNK - KIB, 2 * KIB)).toBeUndefined()
    // Past the chunks read ahead: nothing to wait for.
    expect(ra.whenReadable(10 * CHUNK, REQUEST)).toBeUndefined()
    expect(ra.stats().waits).toBe(1)
  })

  test('a read of bytes still on their way reads them from the file (it cannot wait): right bytes, nothing lost', async () => {
    const fake = fakeFile(16 * CHUNK)
    const ra = new ReadAhead(fake.io, 16 * CHUNK, { chunkBytes: CHUNK, chunksAhead: AHEAD })
    for (let at = 0; at < 3 * REQUEST; at += REQUEST) ra.read(new Uint8Array(REQUEST), at, fake.readDirect)
    const buf = new Uint8Array(REQUEST)
    expect(ra.read(buf, CHUNK, fake.readDirect)).toBe(REQUEST)
    expect(fake.direct.at(-1)).toEqual([CHUNK, REQUEST])
    expect(Buffer.from(buf).equals(Buffer.from(fake.bytes.subarray(CHUNK, CHUNK + REQUEST)))).toBe(true)
  })

  test('a chunk whose read fails is dropped; the read that wanted it reads the file itself', async () => {
    const fake = fakeFile(16 * CHUNK)
    const ra = new ReadAhead(fake.io, 16 * CHUNK, { chunkBytes: CHUNK, chunksAhead: AHEAD })
    for (let at = 0; at < 3 * REQUEST; at += REQUEST) ra.read(new Uint8Array(REQUEST), at, fake.readDirect)
    const arriving = ra.whenReadable(CHUNK, REQUEST)!
    fake.pending[1]!.settle(new Error('EIO'))
    await arriving
    expect(ra.chunkIndexes()).not.toContain(1)
    const buf = new Uint8Array(REQUEST)
    const directBefore = fake.direct.length
    expect(ra.read(buf, CHUNK, fake.readDirect)).toBe(REQUEST)
    expect(fake.direct.length).toBe(directBefore + 1)
    expect(Buffer.from(buf).equals(Buffer.from(fake.bytes.subarray(CHUNK, CHUNK + REQUEST)))).toBe(true)
  })

  test('the end of the file: nothing is read ahead past it, and a short last chunk serves what it has', async () => {
    const fileBytes = 5 * CHUNK + 3000
    const fake = fakeFile(fileBytes)
    const ra = new ReadAhead(fake.io, fileBytes, { chunkBytes: CHUNK, chunksAhead: AHEAD })
    const out = new Uint8Array(fileBytes)
    let at = 0
    while (at < fileBytes) {
      const got = await readThrough(ra, fake, at, REQUEST)
      out.set(got, at)
      at += got.length
      if (got.length < REQUEST) break
    }
    expect(at).toBe(fileBytes)
    expect(Buffer.from(out).equals(Buffer.from(fake.bytes))).toBe(true)
    expect(Math.max(...fake.readsAhead)).toBe(5 * CHUNK)
  })

  test('it holds at most twice its depth in chunks, and drops only chunks behind the latest read', async () => {
    const fileBytes = 64 * CHUNK
    const fake = fakeFile(fileBytes)
    const ra = new ReadAhead(fake.io, fileBytes, { chunkBytes: CHUNK, chunksAhead: AHEAD })
    // Reads that skip half of every chunk: no chunk is ever served whole.
    for (let at = 0; at < fileBytes; at += CHUNK) {
      await readThrough(ra, fake, at, REQUEST)
      await readThrough(ra, fake, at + REQUEST, REQUEST)
      expect(ra.chunkIndexes().length).toBeLessThanOrEqual(2 * AHEAD)
      const latest = Math.floor((at + 2 * REQUEST) / CHUNK)
      for (const index of ra.chunkIndexes()) expect(index).toBeGreaterThanOrEqual(latest - 2 * AHEAD)
    }
    expect(ra.stats().chunksDropped).toBeGreaterThan(0)
  })

  test('ranges the page cache holds are not read ahead', async () => {
    const fileBytes = 16 * CHUNK
    // The first half is cached.
    const fake = fakeFile(fileBytes, { cached: (hostOffset) => hostOffset < 8 * CHUNK })
    const ra = new ReadAhead(fake.io, fileBytes, { chunkBytes: CHUNK, chunksAhead: AHEAD })
    for (let at = 0; at < fileBytes; at += REQUEST) await readThrough(ra, fake, at, REQUEST)
    expect(fake.readsAhead.every((at) => at >= 8 * CHUNK)).toBe(true)
    expect(fake.readsAhead.length).toBe(8)
    expect(ra.stats().chunksCached).toBe(8)
  })

  test('close: onIdle at once without reads on their way, else once the last has settled; nothing is read ahead after', async () => {
    const idle = fakeFile(16 * CHUNK)
    const quiet = new ReadAhead(idle.io, 16 * CHUNK, { chunkBytes: CHUNK, chunksAhead: AHEAD })
    let closed = 0
    quiet.close(() => closed++)
    expect(closed).toBe(1)

    const fake = fakeFile(16 * CHUNK)
    const ra = new ReadAhead(fake.io, 16 * CHUNK, { chunkBytes: CHUNK, chunksAhead: AHEAD })
    for (let at = 0; at < 3 * REQUEST; at += REQUEST) ra.read(new Uint8Array(REQUEST), at, fake.readDirect)
    expect(fake.pending.length).toBe(AHEAD)
    let idleCalls = 0
    ra.close(() => idleCalls++)
    fake.pending[0]!.settle()
    fake.pending[1]!.settle(new Error('EIO'))
    fake.pending[2]!.settle()
    await new Promise((r) => setImmediate(r))
    expect(idleCalls).toBe(0)
    fake.pending[3]!.settle()
    await new Promise((r) => setImmediate(r))
    expect(idleCalls).toBe(1)
    expect(ra.chunkIndexes()).toEqual([])
    const reads = fake.readsAhead.length
    for (let at = 3 * REQUEST; at < 12 * REQUEST; at += REQUEST) ra.read(new Uint8Array(REQUEST), at, fake.readDirect)
    expect(fake.readsAhead.length).toBe(reads)
  })
})

const addon = readAheadCalls()

describe('read_ahead addon and NodeBlockFile on real files', () => {
  let dir: string
  let dataPath: string
  const fileBytes = 6 * MIB + 12345
  let bytes: Uint8Array

  /**
   * A file of `bytes` written with O_DIRECT, so that the page cache holds none of it (a file
   * written the usual way stays cached, and the read-ahead leaves cached ranges alone).
   */
  function uncachedFile(name: string): string {
    const file = path.join(dir, name)
    const aligned = addon!.alloc(Math.ceil(fileBytes / 4096) * 4096)
    aligned.fill(0)
    aligned.set(bytes)
    const fd = fs.openSync(file, fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_TRUNC | fs.constants.O_DIRECT)
    try {
      fs.writeSync(fd, aligned, 0, aligned.length, 0)
      fs.ftruncateSync(fd, fileBytes)
    } finally {
      fs.closeSync(fd)
    }
    return file
  }

  beforeAll(async () => {
    dir = await makeTempDir('read-ahead')
    bytes = patternFile(fileBytes)
    dataPath = uncachedFile('data.bin')
  })
  afterAll(async () => {
    await removeTempDir(dir)
  })

  test('the addon is built (make build builds it; CI needs it)', () => {
    expect(addon).not.toBeNull()
  })

  test('alloc: aligned buffers of the size asked; bad sizes throw', () => {
    const buf = addon!.alloc(READ_AHEAD_CHUNK_BYTES)
    expect(buf.length).toBe(READ_AHEAD_CHUNK_BYTES)
    expect(() => addon!.alloc(0)).toThrow(RangeError)
    expect(() => addon!.alloc(2 ** 31)).toThrow(RangeError)
  })

  test('read: O_DIRECT reads of the file, short at its end; unaligned arguments throw', async () => {
    const fd = fs.openSync(dataPath, fs.constants.O_RDONLY)
    const io = openReadAheadIo(fd, dataPath, addon!)
    try {
      expect(io).toBeDefined()
      const buf = io!.allocate(MIB)
      expect(await io!.read(buf, 2 * MIB)).toBe(MIB)
      expect(Buffer.from(buf).equals(Buffer.from(bytes.subarray(2 * MIB, 3 * MIB)))).toBe(true)
      expect(await io!.read(buf, 6 * MIB)).toBe(12345)
      expect(Buffer.from(buf.subarray(0, 12345)).equals(Buffer.from(bytes.subarray(6 * MIB)))).toBe(true)
      expect(await io!.read(buf, 8 * MIB)).toBe(0)
      expect(() => addon!.read(fd, buf, 100, () => {})).toThrow(TypeError)
      expect(() => addon!.read(fd, buf.subarray(1), 0, () => {})).toThrow(TypeError)
      expect(() => addon!.read(fd, new Uint8Array(4096), 0, () => {})).toThrow(TypeError)
      expect(() => addon!.read(-1, buf, 0, () => {})).toThrow(TypeError)
      // A bad descriptor fails in the read itself, reported through done.
      const failed = await new Promise<[number, number]>((resolve) => addon!.read(1_000_000, buf, 0, (e, n) => resolve([e, n])))
      expect(failed).toEqual([9 /* EBADF */, 0])
    } finally {
      io?.close()
      fs.closeSync(fd)
    }
  })

  test('cached: true for a range that was just read, false for a hole never read', () => {
    const holePath = path.join(dir, 'hole.bin')
    const hole = fs.openSync(holePath, 'w+')
    const fd = fs.openSync(dataPath, 'r')
    try {
      fs.ftruncateSync(hole, 8 * MIB)
      expect(addon!.cached(hole, 0, 4 * MIB)).toBe(false)
      fs.readSync(fd, Buffer.alloc(MIB), 0, MIB, MIB)
      expect(addon!.cached(fd, MIB, MIB)).toBe(true)
      // Past the end of the file there is nothing to hold: the part before it decides.
      fs.readSync(fd, Buffer.alloc(12345), 0, 12345, 6 * MIB)
      expect(addon!.cached(fd, 6 * MIB, MIB)).toBe(true)
      expect(addon!.cached(fd, 7 * MIB, MIB)).toBe(false)
      expect(() => addon!.cached(fd, -1, MIB)).toThrow(TypeError)
    } finally {
      fs.closeSync(hole)
      fs.closeSync(fd)
    }
  })

  test('a file the page cache holds whole (tmpfs, or one just written) is left to it: no chunk is read ahead', () => {
    const cachedPath = path.join(fs.existsSync('/dev/shm') ? '/dev/shm' : dir, `qcow2fs-read-ahead-${process.pid}`)
    fs.writeFileSync(cachedPath, bytes)
    const file = NodeBlockFile.open(cachedPath, { readOnly: true, lock: 'none', readAhead: true })
    try {
      const buf = new Uint8Array(128 * KIB)
      for (let at = 0; at < fileBytes; at += buf.length) file.pread(buf, at)
      // tmpfs takes O_DIRECT since Linux 6.6; where it does not, there is no read-ahead at all.
      expect(file.readAheadStats()?.chunksRead ?? 0).toBe(0)
    } finally {
      file.close()
      fs.rmSync(cachedPath, { force: true })
    }
  })

  test('NodeBlockFile: only a read-only open asked for it reads ahead', () => {
    const writable = NodeBlockFile.open(dataPath, { readOnly: false, lock: 'none', readAhead: true })
    const plain = NodeBlockFile.open(dataPath, { readOnly: true, lock: 'none' })
    const reading = NodeBlockFile.open(dataPath, { readOnly: true, lock: 'none', readAhead: true })
    try {
      expect(writable.readsAhead).toBe(false)
      expect(plain.readsAhead).toBe(false)
      expect(reading.readsAhead).toBe(true)
    } finally {
      writable.close()
      plain.close()
      reading.close()
    }
  })

  test('NodeBlockFile: sequential reads in a disordered order, waiting as the read path does, read the file exactly', async () => {
    const file = NodeBlockFile.open(uncachedFile('sequential.bin'), { readOnly: true, lock: 'none', readAhead: true })
    const out = new Uint8Array(fileBytes)
    const request = 128 * KIB
    const offsets: number[] = []
    for (let at = 0; at < fileBytes; at += request) offsets.push(at)
    for (let i = 2; i + 1 < offsets.length; i += 3) [offsets[i], offsets[i + 1]] = [offsets[i + 1]!, offsets[i]!]
    // Several reads in flight at once, as FUSE sends them.
    let next = 0
    const reader = async (): Promise<void> => {
      while (next < offsets.length) {
        const at = offsets[next++]!
        const buf = out.subarray(at, Math.min(at + request, fileBytes))
        const arriving = file.whenReadable(at, buf.length)
        if (arriving) await arriving
        expect(file.pread(buf, at)).toBe(buf.length)
      }
    }
    try {
      await Promise.all([reader(), reader(), reader(), reader()])
      expect(Buffer.from(out).equals(Buffer.from(bytes))).toBe(true)
      const stats = file.readAheadStats()!
      expect(stats.chunksRead).toBeGreaterThanOrEqual(5)
      expect(stats.bytesServed).toBeGreaterThan(fileBytes / 2)
    } finally {
      file.close()
    }
  })

  test('NodeBlockFile: close while reads ahead are on their way; the lock is free at once', async () => {
    const closingPath = uncachedFile('closing.bin')
    const file = NodeBlockFile.open(closingPath, { readOnly: true, lock: 'read', readAhead: true })
    const buf = new Uint8Array(128 * KIB)
    for (let at = 0; at < 3 * buf.length; at += buf.length) file.pread(buf, at)
    expect(file.whenReadable(MIB, buf.length)).toBeInstanceOf(Promise)
    file.close()
    const writer = NodeBlockFile.open(closingPath, { readOnly: false, lock: 'write' })
    writer.close()
    // The reads on their way end on their own descriptor, which closes after them.
    await new Promise((r) => setTimeout(r, 50))
  })
})

/*
 * lib/engine/codec.ts: decompression of compressed clusters and zstd frame measurement.
 *
 *  - zlib: raw deflate streams made with node:zlib (windowBits 12, as QEMU writes them), for
 *    cluster sizes 512 B..2 MiB; trailing bytes ignored; truncated, short and garbage streams
 *    rejected with CorruptImageError.
 *  - zstd: frames built by hand (raw and RLE blocks, every frame header form, checksums
 *    computed with an XXH64 written here), frames recorded from the zstd command line tool,
 *    skippable frames and several frames per cluster.
 *  - Clusters compressed by QEMU: `qemu-img convert -c` at test time (zlib and zstd), the
 *    compressed descriptors read from the image's L2 tables, each cluster decompressed from
 *    exactly the bytes the descriptor names (sector padding included) and compared with the
 *    source.
 *  - Streams that inflate past the cluster: compared with what qemu-img does with the same
 *    cluster.
 */
import { closeSync, openSync, writeFileSync, writeSync } from 'node:fs'
import { readFile, stat } from 'node:fs/promises'
import * as path from 'node:path'
import * as zlib from 'node:zlib'
import { afterAll, beforeAll, describe, expect, test } from 'vitest'
import { decompressCluster, zstdFrameLength } from '../../lib/engine/codec.js'
import { CorruptImageError } from '../../lib/errors.js'
import { decodeCompressedDescriptor, encodeCompressedEntry } from '../../lib/format/l2-entry.js'
import { type QemuTools, makeTempDir, qemuImg, removeTempDir, requireQemu } from '../helpers/qemu.js'
import { Rng, concatBytes, halves, joinHalves, readFileRange, readL2Entries } from '../format/bytes.js'
import { xorshift32 } from '../helpers/random.js'

const ZLIB = 0
const ZSTD = 1
const KiB = 1024
const MiB = 1024 * KiB

// ---------------------------------------------------------------------------------------------
// Test data
// ---------------------------------------------------------------------------------------------

const WORDS = ['qcow2', 'cluster', 'the', 'of', 'refcount', 'table', 'L2', 'entry', 'guest', 'host', '\n', 'snapshot', ' ']


/**
 * `length` bytes of one of several kinds: 'text' (words), 'runs' (byte runs of random length),
 * 'mixed' (text with random bytes), 'random' (incompressible), 'zero'.
 */
function content(kind: 'text' | 'runs' | 'mixed' | 'random' | 'zero', length: number, seed: number): Uint8Array {
  const out = new Uint8Array(length)
  const next = xorshift32(seed)
  let at = 0
  const enc = new TextEncoder()
  switch (kind) {
    case 'zero':
      return out
    case 'random':
      for (; at < length; at++) out[at] = next() & 0xff
      return out
    case 'runs':
      while (at < length) {
        const run = 1 + (next() % 300)
        out.fill(next() & 0xff, at, Math.min(length, at + run))
        at += run
      }
      return out
    default:
      while (at < length) {
        if (kind === 'mixed' && next() % 4 === 0) {
          out[at++] = next() & 0xff
          continue
        }
        const word = enc.encode(WORDS[next() % WORDS.length]! + ' ')
        out.set(word.subarray(0, Math.min(word.length, length - at)), at)
        at += word.length
      }
      return out
  }
}

function corruptError(fn: () => unknown): CorruptImageError {
  try {
    fn()
  } catch (err) {
    expect(err).toBeInstanceOf(CorruptImageError)
    expect((err as CorruptImageError).errno).toBe('EIO')
    expect((err as CorruptImageError).message).not.toContain('\n')
    return err as CorruptImageError
  }
  throw new Error('expected CorruptImageError, nothing was thrown')
}

function inflate(type: number, input: Uint8Array, clusterBytes: number): Uint8Array {
  const out = new Uint8Array(clusterBytes)
  decompressCluster(type, input, out)
  return out
}

/** Bytes of `input` that its raw deflate stream occupies (node:zlib's `info` engine count). */
function deflateStreamLength(input: Uint8Array): number {
  const result = zlib.inflateRawSync(input, { info: true } as zlib.ZlibOptions) as unknown as { engine: { bytesWritten: number } }
  return result.engine.bytesWritten
}

/** QEMU's zlib settings: raw deflate with a 4 KiB window. */
const deflate12 = (data: Uint8Array, level = 6): Uint8Array => zlib.deflateRawSync(data, { windowBits: 12, level })

// ---------------------------------------------------------------------------------------------
// XXH64 (the zstd content checksum is its low 32 bits), from the xxHash specification
// ---------------------------------------------------------------------------------------------

const P1 = 0x9e3779b185ebca87n
const P2 = 0xc2b2ae3d27d4eb4fn
const P3 = 0x165667b19e3779f9n
const P4 = 0x85ebca77c2b2ae63n
const P5 = 0x27d4eb2f165667c5n
const M64 = (1n << 64n) - 1n

const rotl = (x: bigint, r: bigint): bigint => ((x << r) | (x >> (64n - r))) & M64
const xxRound = (acc: bigint, lane: bigint): bigint => (rotl((acc + lane * P2) & M64, 31n) * P1) & M64
const xxMerge = (acc: bigint, v: bigint): bigint => (((acc ^ xxRound(0n, v)) * P1) & M64) + P4 & M64

function xxh64(data: Uint8Array, seed = 0n): bigint {
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength)
  const len = data.length
  let at = 0
  let h: bigint
  if (len >= 32) {
    let v1 = (seed + P1 + P2) & M64
    let v2 = (seed + P2) & M64
    let v3 = seed
    let v4 = (seed - P1) & M64
    for (; at + 32 <= len; at += 32) {
      v1 = xxRound(v1, view.getBigUint64(at, true))
      v2 = xxRound(v2, view.getBigUint64(at + 8, true))
      v3 = xxRound(v3, view.getBigUint64(at + 16, true))
      v4 = xxRound(v4, view.getBigUint64(at + 24, true))
    }
    h = (rotl(v1, 1n) + rotl(v2, 7n) + rotl(v3, 12n) + rotl(v4, 18n)) & M64
    h = xxMerge(xxMerge(xxMerge(xxMerge(h, v1), v2), v3), v4)
  } else {
    h = (seed + P5) & M64
  }
  h = (h + BigInt(len)) & M64
  for (; at + 8 <= len; at += 8) {
    h ^= xxRound(0n, view.getBigUint64(at, true))
    h = (rotl(h, 27n) * P1 + P4) & M64
  }
  if (at + 4 <= len) {
    h ^= (BigInt(view.getUint32(at, true)) * P1) & M64
    h = (rotl(h, 23n) * P2 + P3) & M64
    at += 4
  }
  for (; at < len; at++) {
    h ^= (BigInt(data[at]!) * P5) & M64
    h = (rotl(h, 11n) * P1) & M64
  }
  h ^= h >> 33n
  h = (h * P2) & M64
  h ^= h >> 29n
  h = (h * P3) & M64
  h ^= h >> 32n
  return h
}

// ---------------------------------------------------------------------------------------------
// zstd frames by hand (RFC 8878 section 3.1.1)
// ---------------------------------------------------------------------------------------------

type Block = { raw: Uint8Array } | { rle: number; count: number } | { reservedType: true }

interface FrameOptions {
  blocks: Block[]
  /** Frame_Content_Size, written when set. */
  contentSize?: number
  /** Size of the Frame_Content_Size field (1 only with single segment). Default: smallest. */
  fcsBytes?: 1 | 2 | 4 | 8
  /** Single_Segment_flag; default: set when contentSize is given. */
  singleSegment?: boolean
  checksum?: boolean
  dictionaryIdBytes?: 0 | 1 | 2 | 4
  /** Window_Log for the window descriptor (frames without single segment). */
  windowLog?: number
}

function contentOf(blocks: Block[]): Uint8Array {
  return concatBytes(
    blocks.map((b) => ('raw' in b ? b.raw : 'rle' in b ? new Uint8Array(b.count).fill(b.rle) : new Uint8Array(0))),
  )
}

function zstdFrame(o: FrameOptions): Uint8Array {
  const parts: number[] = [0x28, 0xb5, 0x2f, 0xfd]
  const single = o.singleSegment ?? o.contentSize !== undefined
  let fcsBytes = 0
  if (o.contentSize !== undefined) {
    fcsBytes = o.fcsBytes ?? (o.contentSize < 256 && single ? 1 : o.contentSize < 65536 + 256 ? 2 : 4)
  }
  const fcsFlag = { 0: 0, 1: 0, 2: 1, 4: 2, 8: 3 }[fcsBytes]!
  const dictFlag = { 0: 0, 1: 1, 2: 2, 4: 3 }[o.dictionaryIdBytes ?? 0]!
  parts.push((fcsFlag << 6) | ((single ? 1 : 0) << 5) | ((o.checksum ? 1 : 0) << 2) | dictFlag)
  if (!single) parts.push(((o.windowLog ?? 17) - 10) << 3)
  for (let i = 0; i < (o.dictionaryIdBytes ?? 0); i++) parts.push(0x10 + i)
  if (fcsBytes > 0) {
    let value = BigInt(o.contentSize! - (fcsBytes === 2 ? 256 : 0))
    for (let i = 0; i < fcsBytes; i++) {
      parts.push(Number(value & 0xffn))
      value >>= 8n
    }
  }
  o.blocks.forEach((b, i) => {
    const last = i === o.blocks.length - 1 ? 1 : 0
    const type = 'raw' in b ? 0 : 'rle' in b ? 1 : 3
    const size = 'raw' in b ? b.raw.length : 'rle' in b ? b.count : 0
    const header = last | (type << 1) | (size << 3)
    parts.push(header & 0xff, (header >>> 8) & 0xff, (header >>> 16) & 0xff)
    if ('raw' in b) parts.push(...b.raw)
    else if ('rle' in b) parts.push(b.rle)
  })
  if (o.checksum) {
    const sum = Number(xxh64(contentOf(o.blocks)) & 0xffffffffn)
    parts.push(sum & 0xff, (sum >>> 8) & 0xff, (sum >>> 16) & 0xff, sum >>> 24)
  }
  return Uint8Array.from(parts)
}

/** A skippable frame: magic 0x184D2A5x, u32 length, payload. */
function skippableFrame(nibble: number, payload: Uint8Array): Uint8Array {
  const out = new Uint8Array(8 + payload.length)
  const view = new DataView(out.buffer)
  view.setUint32(0, 0x184d2a50 + nibble, true)
  view.setUint32(4, payload.length, true)
  out.set(payload, 8)
  return out
}

const hexBytes = (hex: string): Uint8Array => Uint8Array.from(Buffer.from(hex, 'hex'))

/** Frames written by the zstd command line tool (v1.5.4), with their content. */
const CLI_FRAMES: { label: string; frame: Uint8Array; content: Uint8Array }[] = [
  {
    // printf abc | zstd --no-check: no content size, window descriptor, one raw block
    label: 'from a pipe, no checksum',
    frame: hexBytes('28b52ffd0058190000616263'),
    content: new TextEncoder().encode('abc'),
  },
  {
    // printf abc | zstd --check: as above with a checksum
    label: 'from a pipe, checksum',
    frame: hexBytes('28b52ffd0458190000616263990977ad'),
    content: new TextEncoder().encode('abc'),
  },
  {
    // 300 x 'a' from a file with --check: single segment, 2-byte content size, compressed block
    label: 'from a file, 2-byte content size, compressed block, checksum',
    frame: hexBytes('28b52ffd642c004d00001061610100272ac002c7cfcfb9'),
    content: new Uint8Array(300).fill(0x61),
  },
  {
    // 480 bytes of 'hello qcow2 ' with --no-check
    label: 'from a file, compressed block, no checksum',
    frame: hexBytes('28b52ffd60e0009d00006068656c6c6f2071636f7732200100d1574b12'),
    content: new TextEncoder().encode('hello qcow2 '.repeat(40)),
  },
]

// ---------------------------------------------------------------------------------------------

describe('codec', () => {
  describe('xxh64 (test helper)', () => {
    test.each([
      ['', 0xef46db3751d8e999n],
      ['abc', 0x44bc2cf5ad770999n],
    ])('xxh64(%j)', (text, hash) => {
      expect(xxh64(new TextEncoder().encode(text))).toBe(hash)
    })

    test('matches the checksums in frames written by the zstd tool', () => {
      for (const { frame, content: data } of CLI_FRAMES) {
        if ((frame[4]! & 4) === 0) continue
        const stored = new DataView(frame.buffer).getUint32(frame.length - 4, true)
        expect(Number(xxh64(data) & 0xffffffffn)).toBe(stored)
      }
    })
  })

  // -------------------------------------------------------------------------------------------
  describe('zlib', () => {
    const SIZES = [512, 1 * KiB, 4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB, 1 * MiB, 2 * MiB]
    const KINDS = ['text', 'runs', 'mixed', 'random', 'zero'] as const

    test.each(SIZES)('%i-byte clusters of every kind of content', (clusterBytes) => {
      KINDS.forEach((kind, i) => {
        const data = content(kind, clusterBytes, clusterBytes + i)
        expect(Buffer.from(inflate(ZLIB, deflate12(data), clusterBytes)).equals(Buffer.from(data)), kind).toBe(true)
      })
    })

    test.each([0, 1, 9])('compression level %i', (level) => {
      const data = content('mixed', 64 * KiB, 7)
      expect(Buffer.from(inflate(ZLIB, deflate12(data, level), 64 * KiB)).equals(Buffer.from(data))).toBe(true)
    })

    test('trailing bytes after the stream are ignored: zeros, garbage, another stream', () => {
      const data = content('text', 64 * KiB, 1)
      const stream = deflate12(data)
      const trailers = [
        new Uint8Array(511),
        new Uint8Array(512 - (stream.length % 512)).fill(0xff),
        new Rng(5).bytes(4096),
        deflate12(content('runs', 64 * KiB, 2)),
      ]
      for (const trailer of trailers) {
        const out = inflate(ZLIB, concatBytes([stream, trailer]), 64 * KiB)
        expect(Buffer.from(out).equals(Buffer.from(data))).toBe(true)
      }
    })

    test('only `out` is written', () => {
      const data = content('text', 4096, 3)
      const host = new Uint8Array(3 * 4096).fill(0xee)
      decompressCluster(ZLIB, deflate12(data), host.subarray(4096, 8192))
      expect(Buffer.from(host.subarray(4096, 8192)).equals(Buffer.from(data))).toBe(true)
      expect(host.subarray(0, 4096).every((b) => b === 0xee)).toBe(true)
      expect(host.subarray(8192).every((b) => b === 0xee)).toBe(true)
    })

    test('a truncated stream is CorruptImageError, at every cut', () => {
      const data = content('mixed', 4096, 4)
      const stream = deflate12(data)
      expect(stream.length).toBeGreaterThan(100)
      for (let cut = 0; cut < stream.length; cut++) {
        corruptError(() => inflate(ZLIB, stream.subarray(0, cut), 4096))
      }
    })

    test.each([
      ['one byte short', 4095],
      ['half a cluster', 2048],
      ['empty stream', 0],
    ])('a stream that inflates short (%s) is CorruptImageError', (_label, length) => {
      const err = corruptError(() => inflate(ZLIB, deflate12(content('text', length, 5)), 4096))
      expect(err.message).toContain(String(length))
    })

    test('a short stream followed by garbage is still short', () => {
      const stream = concatBytes([deflate12(content('text', 1000, 6)), new Rng(6).bytes(3000)])
      corruptError(() => inflate(ZLIB, stream, 4096))
    })

    test('bytes that are not a deflate stream are CorruptImageError', () => {
      // Block type 3 is reserved in deflate: first byte 0b111 = final block, type 3.
      corruptError(() => inflate(ZLIB, Uint8Array.from([0x07, 0, 0, 0]), 4096))
      // A zlib-wrapped stream (with header) is not raw deflate.
      corruptError(() => inflate(ZLIB, zlib.deflateSync(content('random', 4096, 8)), 4096))
    })

    // QEMU inflates into a buffer of exactly one cluster and accepts a stream that still has
    // output left when the buffer is full (Z_BUF_ERROR with avail_out == 0); see the qemu-img
    // comparison below. The codec's design note says the same: "cut at the cluster size".
    test.each([
      ['a cluster and one byte', 4096 + 1],
      ['two clusters', 2 * 4096],
      ['three clusters', 3 * 4096],
      ['sixteen clusters', 16 * 4096],
    ])('a stream that inflates past the cluster (to %s) is cut at the cluster size', (_label, length) => {
      const data = content('runs', length, 9)
      const out = inflate(ZLIB, deflate12(data), 4096)
      expect(Buffer.from(out).equals(Buffer.from(data.subarray(0, 4096)))).toBe(true)
    })
  })

  // -------------------------------------------------------------------------------------------
  describe('zstd frame length', () => {
    const body = content('text', 1000, 11)
    type Row = [label: string, options: FrameOptions]
    const rows: Row[] = [
      ['single segment, 1-byte content size, raw block', { blocks: [{ raw: body.subarray(0, 200) }], contentSize: 200 }],
      ['single segment, 2-byte content size', { blocks: [{ raw: body }], contentSize: 1000 }],
      ['2-byte content size at its lowest value (256)', { blocks: [{ raw: body.subarray(0, 256) }], contentSize: 256 }],
      ['single segment, 4-byte content size', { blocks: [{ raw: body }], contentSize: 1000, fcsBytes: 4 }],
      ['single segment, 8-byte content size', { blocks: [{ raw: body }], contentSize: 1000, fcsBytes: 8 }],
      ['window descriptor, no content size', { blocks: [{ raw: body }] }],
      ['window descriptor and 2-byte content size', { blocks: [{ raw: body }], contentSize: 1000, singleSegment: false }],
      ['window descriptor and 8-byte content size', { blocks: [{ raw: body }], contentSize: 1000, singleSegment: false, fcsBytes: 8 }],
      ['checksum, content size', { blocks: [{ raw: body }], contentSize: 1000, checksum: true }],
      ['checksum, no content size', { blocks: [{ raw: body }], checksum: true }],
      ['1-byte dictionary id', { blocks: [{ raw: body }], dictionaryIdBytes: 1 }],
      ['2-byte dictionary id with content size', { blocks: [{ raw: body }], dictionaryIdBytes: 2, contentSize: 1000 }],
      ['4-byte dictionary id with checksum', { blocks: [{ raw: body }], dictionaryIdBytes: 4, checksum: true }],
      ['RLE block', { blocks: [{ rle: 0x5a, count: 100_000 }], contentSize: 100_000 }],
      [
        'several blocks of both kinds',
        {
          blocks: [{ raw: body.subarray(0, 10) }, { rle: 1, count: 5000 }, { raw: body }, { rle: 0, count: 3 }, { raw: body.subarray(0, 1) }],
          checksum: true,
        },
      ],
      ['an empty raw block', { blocks: [{ raw: new Uint8Array(0) }], contentSize: 0 }],
      ['empty raw block after data', { blocks: [{ raw: body }, { raw: new Uint8Array(0) }] }],
    ]

    test.each(rows)('%s', (_label, options) => {
      const frame = zstdFrame(options)
      expect(zstdFrameLength(frame, 0)).toBe(frame.length)
      // Trailing bytes, a frame further into a buffer, and every truncation.
      const padded = concatBytes([new Uint8Array(13).fill(0x77), frame, new Uint8Array(40).fill(0xff)])
      expect(zstdFrameLength(padded, 13)).toBe(frame.length)
      for (let cut = 0; cut < frame.length; cut++) {
        expect(zstdFrameLength(frame.subarray(0, cut), 0), `cut at ${cut}`).toBe(-1)
      }
    })

    test.each(CLI_FRAMES)('frame written by the zstd tool: $label', ({ frame }) => {
      expect(zstdFrameLength(frame, 0)).toBe(frame.length)
      expect(zstdFrameLength(concatBytes([frame, new Rng(1).bytes(100)]), 0)).toBe(frame.length)
      for (let cut = 0; cut < frame.length; cut++) expect(zstdFrameLength(frame.subarray(0, cut), 0)).toBe(-1)
    })

    test.each([0, 5, 15])('skippable frame with magic 0x184D2A5%s', (nibble) => {
      for (const payload of [new Uint8Array(0), Uint8Array.from([1, 2, 3, 4, 5])]) {
        const frame = skippableFrame(nibble, payload)
        expect(zstdFrameLength(frame, 0)).toBe(8 + payload.length)
        expect(zstdFrameLength(concatBytes([frame, new Uint8Array(9)]), 0)).toBe(8 + payload.length)
        for (let cut = 0; cut < frame.length; cut++) expect(zstdFrameLength(frame.subarray(0, cut), 0)).toBe(-1)
      }
    })

    test('several frames back to back, measured one after another', () => {
      const frames = [
        zstdFrame({ blocks: [{ raw: body.subarray(0, 300) }], contentSize: 300 }),
        skippableFrame(3, new Uint8Array(17)),
        zstdFrame({ blocks: [{ rle: 9, count: 700 }], checksum: true }),
        CLI_FRAMES[2]!.frame,
      ]
      const all = concatBytes(frames)
      let at = 0
      for (const frame of frames) {
        expect(zstdFrameLength(all, at)).toBe(frame.length)
        at += frame.length
      }
      expect(zstdFrameLength(all, at)).toBe(-1)
    })

    test.each([
      ['bad magic', Uint8Array.from([0x28, 0xb5, 0x2f, 0xfe, 0x20, 0x01, 0x01, 0x00, 0x00, 0x61])],
      ['zlib data', deflate12(body)],
      ['empty', new Uint8Array(0)],
      ['magic only', Uint8Array.from([0x28, 0xb5, 0x2f, 0xfd])],
    ])('not a frame: %s', (_label, bytes) => {
      expect(zstdFrameLength(bytes, 0)).toBe(-1)
    })

    test('a reserved block type (3) is not a frame', () => {
      expect(zstdFrameLength(zstdFrame({ blocks: [{ reservedType: true }] }), 0)).toBe(-1)
      expect(zstdFrameLength(zstdFrame({ blocks: [{ raw: body }, { reservedType: true }] }), 0)).toBe(-1)
    })

    test('`at` at or past the end', () => {
      const frame = zstdFrame({ blocks: [{ raw: body }] })
      expect(zstdFrameLength(frame, frame.length)).toBe(-1)
      expect(zstdFrameLength(frame, frame.length + 10)).toBe(-1)
    })
  })

  // -------------------------------------------------------------------------------------------
  describe('zstd clusters', () => {
    const C = 4096
    const data = content('mixed', C, 21)

    test.each(CLI_FRAMES)('frame written by the zstd tool: $label', ({ frame, content: expected }) => {
      const out = inflate(ZSTD, concatBytes([frame, new Uint8Array(64).fill(0xab)]), expected.length)
      expect(Buffer.from(out).equals(Buffer.from(expected))).toBe(true)
    })

    type Row = [label: string, input: () => Uint8Array]
    const good: Row[] = [
      ['one raw block with content size', () => zstdFrame({ blocks: [{ raw: data }], contentSize: C })],
      ['no content size, checksum', () => zstdFrame({ blocks: [{ raw: data }], checksum: true })],
      ['content size and checksum', () => zstdFrame({ blocks: [{ raw: data }], contentSize: C, checksum: true, fcsBytes: 8 })],
      [
        'several blocks',
        () => zstdFrame({ blocks: [{ raw: data.subarray(0, 1000) }, { raw: data.subarray(1000, 3000) }, { raw: data.subarray(3000) }] }),
      ],
      [
        'two frames',
        () => concatBytes([zstdFrame({ blocks: [{ raw: data.subarray(0, 1234) }] }), zstdFrame({ blocks: [{ raw: data.subarray(1234) }], checksum: true })]),
      ],
      [
        'a skippable frame first and between frames',
        () =>
          concatBytes([
            skippableFrame(0, Uint8Array.from([1, 2, 3])),
            zstdFrame({ blocks: [{ raw: data.subarray(0, 2048) }], contentSize: 2048 }),
            skippableFrame(15, new Uint8Array(0)),
            zstdFrame({ blocks: [{ raw: data.subarray(2048) }], contentSize: 2048 }),
          ]),
      ],
      ['trailing zeros (sector padding)', () => concatBytes([zstdFrame({ blocks: [{ raw: data }] }), new Uint8Array(500)])],
      ['trailing garbage', () => concatBytes([zstdFrame({ blocks: [{ raw: data }] }), new Rng(22).bytes(700)])],
      [
        'the start of another frame after the cluster is full',
        () => concatBytes([zstdFrame({ blocks: [{ raw: data }] }), zstdFrame({ blocks: [{ raw: data }] }).subarray(0, 100)]),
      ],
    ]
    test.each(good)('%s', (_label, input) => {
      expect(Buffer.from(inflate(ZSTD, input(), C)).equals(Buffer.from(data))).toBe(true)
    })

    test('RLE blocks', () => {
      const input = zstdFrame({ blocks: [{ rle: 0x11, count: 1000 }, { rle: 0x22, count: C - 1000 }], contentSize: C })
      const out = inflate(ZSTD, input, C)
      expect(out.subarray(0, 1000).every((b) => b === 0x11)).toBe(true)
      expect(out.subarray(1000).every((b) => b === 0x22)).toBe(true)
    })

    const bad: Row[] = [
      ['empty input', () => new Uint8Array(0)],
      ['zeros', () => new Uint8Array(512)],
      ['zlib data', () => deflate12(data)],
      ['a frame one byte short', () => zstdFrame({ blocks: [{ raw: data.subarray(1) }] })],
      ['a frame of half a cluster, then garbage', () => concatBytes([zstdFrame({ blocks: [{ raw: data.subarray(0, 2048) }] }), new Rng(23).bytes(600)])],
      ['only a skippable frame', () => skippableFrame(0, new Uint8Array(100))],
      ['a truncated frame', () => zstdFrame({ blocks: [{ raw: data }] }).subarray(0, 2000)],
      ['a reserved block type', () => zstdFrame({ blocks: [{ raw: data.subarray(0, 100) }, { reservedType: true }] })],
    ]
    test.each(bad)('%s is CorruptImageError', (_label, input) => {
      corruptError(() => inflate(ZSTD, input(), C))
    })

    test('every truncation of a two-frame cluster is CorruptImageError', () => {
      const input = concatBytes([
        zstdFrame({ blocks: [{ raw: data.subarray(0, 1500) }], checksum: true }),
        zstdFrame({ blocks: [{ rle: 3, count: 10 }, { raw: data.subarray(1510) }], contentSize: C - 1500 }),
      ])
      expect(Buffer.from(inflate(ZSTD, input, C)).subarray(0, 1500).equals(Buffer.from(data.subarray(0, 1500)))).toBe(true)
      for (let cut = 0; cut < input.length; cut++) corruptError(() => inflate(ZSTD, input.subarray(0, cut), C))
    })

    // QEMU decodes zstd clusters with ZSTD_decompressStream into one cluster and fails with
    // EIO when the frame that fills the cluster has not ended there (see the qemu-img
    // comparison below).
    test.each([
      ['one byte', 1],
      ['a whole cluster', C],
    ])('a frame that decodes past the cluster (%s more) is CorruptImageError, as in QEMU', (_label, extra) => {
      const input = zstdFrame({ blocks: [{ raw: data }, { rle: 0x33, count: extra }] })
      corruptError(() => inflate(ZSTD, input, C))
    })
  })
})

// ---------------------------------------------------------------------------------------------
// Clusters compressed by QEMU
// ---------------------------------------------------------------------------------------------

const qemu = requireQemu('codec: clusters compressed by qemu-img')

const KINDS_BY_CLUSTER = ['text', 'runs', 'mixed', 'random', 'text', 'zero', 'mixed', 'runs'] as const

/** Source disk: clusters of varied content; random ones stay uncompressed, zero ones unallocated. */
function sourceDisk(clusterBytes: number, clusters: number, seed: number): Uint8Array {
  return concatBytes(
    Array.from({ length: clusters }, (_, i) => content(KINDS_BY_CLUSTER[i % KINDS_BY_CLUSTER.length]!, clusterBytes, seed + i)),
  )
}

describe.skipIf(!qemu)('clusters compressed by qemu-img convert -c', () => {
  const tools = qemu as QemuTools
  let dir = ''
  beforeAll(async () => {
    dir = await makeTempDir('codec')
  })
  afterAll(async () => {
    if (dir) await removeTempDir(dir)
  })

  const cases: [name: string, clusterBytes: number, type: number, clusters: number][] = []
  for (const [name, type] of [
    ['zlib', ZLIB],
    ['zstd', ZSTD],
  ] as const) {
    for (const [clusterBytes, clusters] of [
      [512, 256],
      [4 * KiB, 64],
      [64 * KiB, 24],
      [2 * MiB, 4],
    ] as const) {
      cases.push([name, clusterBytes, type, clusters])
    }
  }

  test.each(cases)('%s, %i-byte clusters', async (name, clusterBytes, type, clusters) => {
    const source = sourceDisk(clusterBytes, clusters, clusterBytes)
    const src = path.join(dir, `src-${name}-${clusterBytes}.raw`)
    const image = path.join(dir, `img-${name}-${clusterBytes}.qcow2`)
    writeFileSync(src, source)
    await qemuImg(tools, [
      'convert', '-c', '-f', 'raw', '-O', 'qcow2',
      '-o', `cluster_size=${clusterBytes},compression_type=${name}`,
      src, image,
    ])
    const { clusterBits, entries } = readL2Entries(image)
    expect(2 ** clusterBits).toBe(clusterBytes)

    let compressed = 0
    let withForeignTrailer = 0
    for (const { guestCluster, entry } of entries) {
      if ((entry & (1n << 62n)) === 0n) continue
      compressed += 1
      const { hi, lo } = halves(entry)
      const d = decodeCompressedDescriptor(hi, lo, clusterBits)
      expect(d, `guest cluster ${guestCluster}`).toBeDefined()
      // Exactly the bytes the descriptor names, up to the sector end (zeros past EOF).
      const input = readFileRange(image, d!.hostOffset, d!.compressedSize)
      const out = new Uint8Array(clusterBytes)
      decompressCluster(type, input, out)
      const expected = source.subarray(guestCluster * clusterBytes, (guestCluster + 1) * clusterBytes)
      expect(Buffer.from(out).equals(Buffer.from(expected)), `guest cluster ${guestCluster}`).toBe(true)

      // The compressed stream's own length must give back QEMU's descriptor.
      const streamLength =
        type === ZSTD ? zstdFrameLength(input, 0) : deflateStreamLength(input)
      expect(streamLength).toBeGreaterThan(0)
      expect(streamLength).toBeLessThanOrEqual(d!.compressedSize)
      const encoded = encodeCompressedEntry(d!.hostOffset, streamLength, clusterBits)
      expect(joinHalves(encoded.hi, encoded.lo)).toBe(entry & ~(1n << 63n))
      if (input.subarray(streamLength).some((b) => b !== 0)) withForeignTrailer += 1
    }
    // Every compressible cluster (all but the random and zero ones) is stored compressed.
    const compressible = Array.from({ length: clusters }, (_, i) => KINDS_BY_CLUSTER[i % KINDS_BY_CLUSTER.length]!).filter(
      (k) => k !== 'random' && k !== 'zero',
    ).length
    expect(compressed).toBe(compressible)
    // QEMU packs compressed clusters back to back, so the sector padding read with a cluster
    // usually holds the start of the next one: the decoders must stop at their stream's end.
    if (compressed > 1) expect(withForeignTrailer).toBeGreaterThan(0)
  })

  /**
   * A 4 KiB-cluster image whose guest cluster 0 is a compressed cluster holding `payload`,
   * appended at the end of the file and padded to a sector; qemu-img's reading of it is the
   * reference.
   */
  async function imageWithCompressedCluster(name: 'zlib' | 'zstd', payload: Uint8Array, label: string): Promise<string> {
    const src = path.join(dir, `patched-${name}-${label}.raw`)
    const image = path.join(dir, `patched-${name}-${label}.qcow2`)
    writeFileSync(src, content('text', 4 * 4096, 31))
    await qemuImg(tools, ['convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', `cluster_size=4096,compression_type=${name}`, src, image])
    const header = await readFile(image)
    const l1Offset = Number(header.readBigUInt64BE(40))
    const l2Offset = Number(header.readBigUInt64BE(l1Offset) & 0x00fffffffffffe00n)
    expect(readL2Entries(image).entries.find((e) => e.guestCluster === 0)?.entry).toBe(header.readBigUInt64BE(l2Offset))
    const hostOffset = (await stat(image)).size
    const { hi, lo } = encodeCompressedEntry(hostOffset, payload.length, 12)
    const entry = Buffer.alloc(8)
    entry.writeBigUInt64BE(joinHalves(hi, lo))
    const fd = openSync(image, 'r+')
    try {
      writeSync(fd, concatBytes([payload, new Uint8Array(512 - (payload.length % 512))]), 0, undefined, hostOffset)
      writeSync(fd, entry, 0, 8, l2Offset)
    } finally {
      closeSync(fd)
    }
    return image
  }

  /** What decompressCluster makes of guest cluster 0 of such an image. */
  function ourCluster0(image: string, type: number): Uint8Array {
    const { clusterBits, entries } = readL2Entries(image)
    const e = halves(entries.find((x) => x.guestCluster === 0)!.entry)
    const d = decodeCompressedDescriptor(e.hi, e.lo, clusterBits)!
    return inflate(type, readFileRange(image, d.hostOffset, d.compressedSize), 2 ** clusterBits)
  }

  test.each([
    ['a cluster and one byte', 4096 + 1],
    ['two clusters', 2 * 4096],
    ['three clusters', 3 * 4096],
  ])('zlib stream inflating past the cluster (to %s): read as qemu-img reads it', async (label, length) => {
    const data = content('runs', length, 41)
    const image = await imageWithCompressedCluster('zlib', deflate12(data), label.replace(/\W+/g, '-'))
    const raw = path.join(dir, `patched-zlib-${length}.out`)
    await qemuImg(tools, ['convert', '-O', 'raw', image, raw])
    const qemuView = readFileRange(raw, 0, 4096)
    expect(Buffer.from(qemuView).equals(Buffer.from(data.subarray(0, 4096)))).toBe(true)
    expect(Buffer.from(ourCluster0(image, ZLIB)).equals(Buffer.from(qemuView))).toBe(true)
  })

  test('zstd frame of exactly one cluster: qemu-img and decompressCluster agree', async () => {
    const data = content('mixed', 4096, 42)
    const image = await imageWithCompressedCluster('zstd', zstdFrame({ blocks: [{ raw: data }] }), 'exact')
    const raw = path.join(dir, 'patched-zstd-exact.out')
    await qemuImg(tools, ['convert', '-O', 'raw', image, raw])
    expect(Buffer.from(readFileRange(raw, 0, 4096)).equals(Buffer.from(data))).toBe(true)
    expect(Buffer.from(ourCluster0(image, ZSTD)).equals(Buffer.from(data))).toBe(true)
  })

  test('zstd frame decoding one byte past the cluster: qemu-img fails with EIO, so does decompressCluster', async () => {
    const data = content('mixed', 4096, 43)
    const image = await imageWithCompressedCluster('zstd', zstdFrame({ blocks: [{ raw: data }, { rle: 7, count: 1 }] }), 'plus-one')
    await expect(qemuImg(tools, ['convert', '-O', 'raw', image, path.join(dir, 'patched-zstd-plus-one.out')])).rejects.toThrow(
      /Input\/output error/,
    )
    corruptError(() => ourCluster0(image, ZSTD))
  })
})

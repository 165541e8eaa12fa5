/*
 * Decompression of compressed clusters (spec: "Compressed Clusters Descriptor"; compression
 * type field).
 *
 * Design notes:
 *  - zlib clusters are raw deflate streams (no zlib header). QEMU writes them with a 4 KiB
 *    window (windowBits 12). We inflate through node:zlib with the default 32 KiB window: it
 *    decodes every stream a 4 KiB window can decode, so whatever QEMU reads we read. fflate is
 *    not used for the codec: its deflate cannot cap the window at 4 KiB (QEMU cannot read what
 *    it writes) and its inflate measured about 3x slower than node:zlib here.
 *  - The compressed size in a descriptor is rounded up to whole 512-byte sectors, so the input
 *    usually carries trailing bytes (often the start of the next compressed cluster). Both
 *    decoders stop at the end of their stream and ignore them.
 *  - Output must be exactly one cluster: a stream that ends early is corrupt. A deflate stream
 *    that would produce more is cut at the cluster size, as QEMU does (it stops at a full output
 *    buffer); node:zlib has no sync way to stop early, so we allow up to
 *    MAX_INFLATE_OVERRUN_CLUSTERS of output and call anything longer damage. A zstd frame that
 *    decodes past the cluster is damage, as in QEMU.
 *  - zstd clusters are one or more zstd frames. fzstd (pure JS, no native build step) decodes
 *    them; it does not tolerate trailing bytes, so we measure each frame from its block headers
 *    and hand it exactly one frame at a time.
 */
import * as zlib from 'node:zlib'
import { decompress as zstdDecompress } from 'fzstd'
import { CorruptImageError } from '../errors.js'
import { COMPRESSION_TYPE_ZLIB, COMPRESSION_TYPE_ZSTD } from '../format/constants.js'

/** How much longer than a cluster a deflate stream may inflate before we call it damage. */
const MAX_INFLATE_OVERRUN_CLUSTERS = 32

export type CompressionType = typeof COMPRESSION_TYPE_ZLIB | typeof COMPRESSION_TYPE_ZSTD

/** Inflates `input` into exactly `out.length` bytes of `out`, or throws CorruptImageError. */
export function decompressCluster(type: number, input: Uint8Array, out: Uint8Array): void {
  if (type === COMPRESSION_TYPE_ZSTD) {
    zstdDecompressCluster(input, out)
    return
  }
  let produced: Buffer
  try {
    produced = zlib.inflateRawSync(input, inflateOptions(out.length))
  } catch (err) {
    throw inflateError(err)
  }
  takeCluster(produced, out)
}

function inflateOptions(clusterSize: number): zlib.ZlibOptions {
  return { chunkSize: Math.max(clusterSize, 64), maxOutputLength: clusterSize * MAX_INFLATE_OVERRUN_CLUSTERS }
}

function inflateError(err: unknown): CorruptImageError {
  if ((err as NodeJS.ErrnoException).code === 'ERR_BUFFER_TOO_LARGE') {
    return new CorruptImageError(`compressed cluster inflates to more than ${MAX_INFLATE_OVERRUN_CLUSTERS} clusters`, { cause: err })
  }
  return new CorruptImageError(`compressed cluster is damaged (${(err as Error).message})`, { cause: err })
}

function takeCluster(produced: Uint8Array, out: Uint8Array): void {
  if (produced.length < out.length) {
    throw new CorruptImageError(`compressed cluster inflates to ${produced.length} bytes, not ${out.length}`)
  }
  out.set(produced.subarray(0, out.length))
}

// ---- zstd framing (RFC 8878, section 3.1.1) ----

/** Zstandard frame magic number, little-endian on disk. */
const ZSTD_FRAME_MAGIC = 0xfd2fb528
/** Skippable frames: magic 0x184D2A50 to 0x184D2A5F. */
const ZSTD_SKIPPABLE_MAGIC_MASK = 0xfffffff0
const ZSTD_SKIPPABLE_MAGIC = 0x184d2a50
/** Block header: 3 bytes; block type 1 (RLE) stores one byte whatever its size. */
const ZSTD_BLOCK_HEADER_SIZE = 3
const ZSTD_BLOCK_TYPE_RLE = 1
const ZSTD_BLOCK_TYPE_RESERVED = 3
const ZSTD_CHECKSUM_SIZE = 4

/** Length in bytes of the zstd frame starting at input[at], or -1 if it is not a whole frame. */
export function zstdFrameLength(input: Uint8Array, at: number): number {
  const view = new DataView(input.buffer, input.byteOffset, input.byteLength)
  if (at + 4 > input.length) return -1
  const magic = view.getUint32(at, true)
  if ((magic & ZSTD_SKIPPABLE_MAGIC_MASK) >>> 0 === ZSTD_SKIPPABLE_MAGIC) {
    if (at + 8 > input.length) return -1
    const length = 8 + view.getUint32(at + 4, true)
    return at + length <= input.length ? length : -1
  }
  if (magic !== ZSTD_FRAME_MAGIC) return -1
  let pos = at + 4
  if (pos >= input.length) return -1
  const descriptor = input[pos]!
  pos += 1
  const contentSizeFlag = descriptor >>> 6
  const singleSegment = (descriptor >>> 5) & 1
  const checksumFlag = (descriptor >>> 2) & 1
  const dictionaryIdFlag = descriptor & 3
  if (!singleSegment) pos += 1 // window descriptor
  pos += [0, 1, 2, 4][dictionaryIdFlag]!
  pos += [singleSegment ? 1 : 0, 2, 4, 8][contentSizeFlag]!
  for (;;) {
    if (pos + ZSTD_BLOCK_HEADER_SIZE > input.length) return -1
    const header = input[pos]! | (input[pos + 1]! << 8) | (input[pos + 2]! << 16)
    pos += ZSTD_BLOCK_HEADER_SIZE
    const last = header & 1
    const blockType = (header >>> 1) & 3
    const blockSize = header >>> 3
    if (blockType === ZSTD_BLOCK_TYPE_RESERVED) return -1
    pos += blockType === ZSTD_BLOCK_TYPE_RLE ? 1 : blockSize
    if (last) break
  }
  if (checksumFlag) pos += ZSTD_CHECKSUM_SIZE
  return pos <= input.length ? pos - at : -1
}

function zstdDecompressCluster(input: Uint8Array, out: Uint8Array): void {
  let inPos = 0
  let outPos = 0
  while (outPos < out.length) {
    const frameLength = zstdFrameLength(input, inPos)
    if (frameLength < 0) {
      throw new CorruptImageError(`zstd compressed cluster is damaged (${outPos} of ${out.length} bytes decoded)`)
    }
    let chunk: Uint8Array
    try {
      chunk = zstdDecompress(input.subarray(inPos, inPos + frameLength))
    } catch (err) {
      throw new CorruptImageError(`zstd compressed cluster is damaged (${(err as Error).message})`, { cause: err })
    }
    if (chunk.length > out.length - outPos) {
      throw new CorruptImageError(`zstd compressed cluster decodes to more than ${out.length} bytes`)
    }
    out.set(chunk, outPos)
    outPos += chunk.length
    inPos += frameLength
  }
}

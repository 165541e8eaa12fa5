/*
 * Helpers of the compressed-write tests:
 *   realisticData(size, seed)    deterministic disk-like data: slices of the programs in
 *                                /usr/bin, text, zero runs (unaligned) and a little noise
 *   newImage(path, options)      a new empty image on disk (our create, as qcow2fs create does)
 *   openCompressed(path, ...)    that image opened read-write with the compress option, on a
 *                                counting file layer
 *   compressedDescriptor(entry)  host offset and length of a compressed L2 entry read by
 *                                l2-inspect (independently of the engine)
 */
import * as fs from 'node:fs'
import * as path from 'node:path'
import { type CreateOptions, createImage } from '../../lib/engine/create.js'
import type { CompressOptions } from '../../lib/engine/compress/pipeline.js'
import { Qcow2Image } from '../../lib/image.js'
import { NodeBlockFile } from '../../lib/io/block-file.js'
import { CountingFile } from './counting-file.js'
import type { L2EntryOnDisk } from './l2-inspect.js'
import { xorshift32 } from './random.js'

const WORDS = (
  'the of and to in is that for it as was with be by on not he this are or his from at which but have an they you were ' +
  'their one all we can her has there been if more when will would who so no disk image cluster sector block file ' +
  'kernel module driver device read write offset length table entry refcount compressed qemu linux system user data'
).split(' ')

let programPool: Buffer | undefined

/** Up to 16 MiB of the regular files in /usr/bin (sorted by name), read once per process. */
function programs(): Buffer {
  if (programPool) return programPool
  const parts: Buffer[] = []
  let total = 0
  for (const name of fs.readdirSync('/usr/bin').sort()) {
    const file = path.join('/usr/bin', name)
    try {
      const st = fs.statSync(file)
      if (!st.isFile() || st.size < 4096) continue
      parts.push(fs.readFileSync(file))
      total += st.size
    } catch {
      continue
    }
    if (total >= 16 * 1024 * 1024) break
  }
  programPool = Buffer.concat(parts)
  return programPool
}

function textPool(seed: number, bytes: number): Buffer {
  const next = xorshift32(seed)
  const lines: string[] = []
  let length = 0
  while (length < bytes) {
    const words: string[] = []
    const count = 4 + (next() % 12)
    for (let i = 0; i < count; i++) words.push(WORDS[next() % WORDS.length]!)
    const line = `${next() % 100000}: ${words.join(' ')}\n`
    lines.push(line)
    length += line.length
  }
  return Buffer.from(lines.join('')).subarray(0, bytes)
}

function noisePool(seed: number, bytes: number): Buffer {
  const next = xorshift32(seed)
  const out = Buffer.alloc(bytes)
  for (let i = 0; i < bytes; i += 4) out.writeUInt32LE(next(), i)
  return out
}

/**
 * `size` bytes like a disk holds: program binaries (about half), text (a quarter), zero runs of
 * 4 KiB to 1 MiB at unaligned places, and about 3% incompressible noise. The same seed gives the
 * same bytes on one machine.
 */
export function realisticData(size: number, seed: number): Buffer {
  const next = xorshift32(seed)
  const bin = programs()
  const text = textPool(seed + 1, 4 * 1024 * 1024)
  const noise = noisePool(seed + 2, 1024 * 1024)
  const out = Buffer.alloc(size)
  let at = 0
  while (at < size) {
    const kind = next() % 100
    let length: number
    if (kind < 50) {
      length = 4096 + (next() % (768 * 1024))
      const from = next() % Math.max(1, bin.length - length)
      bin.copy(out, at, from, Math.min(bin.length, from + length))
    } else if (kind < 75) {
      length = 1000 + (next() % (384 * 1024))
      const from = next() % (text.length - length)
      text.copy(out, at, from, from + length)
    } else if (kind < 97) {
      length = 4096 + (next() % (1024 * 1024))
      // zeros: Buffer.alloc already holds them
    } else {
      length = 512 + (next() % (96 * 1024))
      const from = next() % (noise.length - length)
      noise.copy(out, at, from, from + length)
    }
    at += length
  }
  return out
}

/** Creates an empty image at imagePath with our own create (as `qcow2fs create`). */
export async function newImage(imagePath: string, options: CreateOptions): Promise<void> {
  await createImage(imagePath, options, (p) => {
    fs.writeFileSync(p, new Uint8Array(0), { flag: 'wx' })
    return NodeBlockFile.open(p, { readOnly: false })
  })
}

/** Opens imagePath read-write with compressed writes, on a counting file layer. */
export function openCompressed(imagePath: string, compress: CompressOptions = {}): { image: Qcow2Image; file: CountingFile } {
  const file = new CountingFile(NodeBlockFile.open(imagePath, { readOnly: false, lock: 'none' }))
  const image = Qcow2Image.openFile(file, imagePath, { readOnly: false, compress })
  return { image, file }
}

/** The host range a compressed entry names: offset, and sector-rounded length. */
export function compressedDescriptor(entry: L2EntryOnDisk, clusterBits: number): { hostOffset: number; sectors: number; bytes: number } {
  const shift = BigInt(62 - (clusterBits - 8))
  const hostOffset = Number(entry.descriptor & ((1n << shift) - 1n))
  const sectors = Number((entry.descriptor >> shift) & ((1n << BigInt(clusterBits - 8)) - 1n)) + 1
  return { hostOffset, sectors, bytes: sectors * 512 - (hostOffset % 512) }
}

#!/usr/bin/env node
/*
 * Writes the raw guest data for the benchmark images: SIZE_MIB MiB that are never all zeros
 * in any 64 KiB cluster, so that `qemu-img convert` allocates every cluster.
 *
 * Usage: node bench/make-data.mjs OUTPUT SIZE_MIB
 *
 * Layout, per 1 MiB block: three blocks out of four are slices of a pool built from the files
 * under /usr/bin and /usr/lib (real machine code and data: compresses roughly 2-3x with zlib),
 * every fourth block is an AES-128-CTR keystream with a fixed key (incompressible, so the
 * compressed image also holds some uncompressed clusters, as real images do). The output is
 * the same for the same pool files, so repeated runs on one machine read the same bytes.
 */
import { createCipheriv } from 'node:crypto'
import { closeSync, openSync, readdirSync, readFileSync, statSync, writeSync, fsyncSync } from 'node:fs'
import { join } from 'node:path'

const MIB = 1024 * 1024
const CLUSTER_BYTES = 64 * 1024
const POOL_TARGET_BYTES = 96 * MIB
const POOL_DIRS = ['/usr/bin', '/usr/lib']
const ZERO_CLUSTER = Buffer.alloc(CLUSTER_BYTES)

function usage(message) {
  process.stderr.write(`make-data: ${message}\nusage: node bench/make-data.mjs OUTPUT SIZE_MIB\n`)
  process.exit(2)
}

/** Regular files under the pool directories, depth-first, sorted by name for a stable order. */
function* poolFiles(dir, depth) {
  let names
  try {
    names = readdirSync(dir).sort()
  } catch {
    return
  }
  for (const name of names) {
    const path = join(dir, name)
    let st
    try {
      st = statSync(path, { throwIfNoEntry: false })
    } catch {
      continue
    }
    if (!st) continue
    if (st.isDirectory() && depth < 3) yield* poolFiles(path, depth + 1)
    else if (st.isFile() && st.size >= 4096) yield path
  }
}

function buildPool() {
  const parts = []
  let poolBytes = 0
  const seen = new Set()
  for (const dir of POOL_DIRS) {
    for (const path of poolFiles(dir, 0)) {
      if (poolBytes >= POOL_TARGET_BYTES) break
      let data
      try {
        data = readFileSync(path)
      } catch {
        continue
      }
      // Skip identical files reached through different names (hard links, copies).
      const key = `${data.length}:${data.subarray(0, 64).toString('hex')}`
      if (seen.has(key)) continue
      seen.add(key)
      parts.push(data)
      poolBytes += data.length
    }
  }
  if (poolBytes < 8 * MIB) throw new Error(`only ${poolBytes} bytes of files found under ${POOL_DIRS.join(', ')}`)
  return Buffer.concat(parts, poolBytes)
}

function keystreamBlock(blockIndex) {
  const key = Buffer.from('qcow2fs-bench-k1', 'latin1')
  const iv = Buffer.alloc(16)
  iv.writeUInt32BE(blockIndex, 0)
  const cipher = createCipheriv('aes-128-ctr', key, iv)
  return Buffer.concat([cipher.update(Buffer.alloc(MIB)), cipher.final()])
}

/** Stamps any all-zero 64 KiB cluster of the block so that no cluster stays unallocated. */
function stampZeroClusters(block, blockIndex) {
  let stamped = 0
  for (let clusterStart = 0; clusterStart < block.length; clusterStart += CLUSTER_BYTES) {
    const cluster = block.subarray(clusterStart, clusterStart + CLUSTER_BYTES)
    if (cluster.equals(ZERO_CLUSTER)) {
      cluster.write(`qcow2fs bench block ${blockIndex} cluster ${clusterStart / CLUSTER_BYTES}`, 0, 'latin1')
      stamped++
    }
  }
  return stamped
}

const [output, sizeArg] = process.argv.slice(2)
if (!output || !sizeArg) usage('missing argument')
const sizeMiB = Number(sizeArg)
if (!Number.isInteger(sizeMiB) || sizeMiB <= 0) usage(`bad SIZE_MIB: ${sizeArg}`)

const pool = buildPool()
// A stride that is not a multiple of the cluster size, so consecutive blocks are different slices.
const strideBytes = 7 * MIB + 12345
const fd = openSync(output, 'w')
let stampedClusters = 0
let randomBlocks = 0
try {
  for (let blockIndex = 0; blockIndex < sizeMiB; blockIndex++) {
    let block
    if (blockIndex % 4 === 3) {
      block = keystreamBlock(blockIndex)
      randomBlocks++
    } else {
      const poolOffset = (blockIndex * strideBytes) % (pool.length - MIB)
      block = Buffer.from(pool.subarray(poolOffset, poolOffset + MIB))
    }
    stampedClusters += stampZeroClusters(block, blockIndex)
    let written = 0
    while (written < block.length) written += writeSync(fd, block, written, block.length - written)
  }
  fsyncSync(fd)
} finally {
  closeSync(fd)
}
process.stdout.write(
  `make-data: wrote ${sizeMiB} MiB to ${output} (pool ${(pool.length / MIB).toFixed(1)} MiB, ` +
    `${randomBlocks} random MiB, ${stampedClusters} zero clusters stamped)\n`,
)

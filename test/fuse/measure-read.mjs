#!/usr/bin/env node
/*
 * The measurement behind the kernel options in lib/fuse/adapter.ts (figures in docs/FUSE.md).
 * Mounts one large disk through the real adapter with each candidate tuning and reads it with
 * `dd bs=1M` twice (first pass: nothing cached; second pass: a fresh open, so a page cache
 * kept across opens shows), counting the read requests the adapter answers; then, caches
 * dropped again, the first 256 MiB with `dd bs=4K` (a reader with small blocks).
 *
 * Usage (after `npx tsc -p tsconfig.json`, as root for drop_caches and read_ahead_kb):
 *   node test/fuse/measure-read.mjs [SIZE_MIB] [memory|file] [REPETITIONS]
 * Each variant is mounted REPETITIONS times (default 3); the table shows medians.
 * memory: the disk answers from RAM (FUSE cost alone); file: positional reads of a raw file
 * (host page cache warm); qcow2: the real engine (Qcow2Image) on a fully allocated image made
 * by qemu-img convert from the same pattern (64 KiB clusters, host page cache warm).
 */
import { spawn } from 'node:child_process'
import { open, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { mountRawFiles } from '../../dist/lib/fuse/adapter.js'
import { Qcow2Image } from '../../dist/lib/image.js'

const sizeMiB = Number(process.argv[2] ?? 2048)
const backing = process.argv[3] ?? 'memory'
const repetitions = Number(process.argv[4] ?? 3)
const sizeBytes = sizeMiB * 1024 * 1024

function pattern(guestOffset, length, out) {
  for (let i = 0; i < length; i += 4096) out.writeUInt32LE(((guestOffset + i) / 4096) >>> 0, i)
}

class CountingDisk {
  constructor(readAt) {
    this.virtualSize = sizeBytes
    this.readOnly = true
    this.readAt = readAt
    this.requests = 0
    this.bytes = 0
    this.maxConcurrent = 0
    this.concurrent = 0
  }
  async read(buf, guestOffset) {
    this.requests++
    this.bytes += buf.length
    this.concurrent++
    this.maxConcurrent = Math.max(this.maxConcurrent, this.concurrent)
    try {
      await this.readAt(buf, guestOffset)
    } finally {
      this.concurrent--
    }
  }
  async write() {
    throw Object.assign(new Error('read-only'), { code: 'EROFS' })
  }
  async flush() {}
  async close() {}
}

function run(cmd, args) {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] })
    let out = ''
    child.stdout.on('data', (d) => (out += d))
    child.stderr.on('data', (d) => (out += d))
    child.on('error', reject)
    child.on('close', (code) => (code === 0 ? resolve(out) : reject(new Error(`${cmd} exited ${code}: ${out}`))))
  })
}

async function ddMiBs(path, blockBytes = 1 << 20, totalMiB = sizeMiB) {
  const started = process.hrtime.bigint()
  await run('dd', [`if=${path}`, 'of=/dev/null', `bs=${blockBytes}`, `count=${(totalMiB * 1048576) / blockBytes}`])
  const seconds = Number(process.hrtime.bigint() - started) / 1e9
  return totalMiB / seconds
}

async function dropCaches() {
  try {
    await writeFile('/proc/sys/vm/drop_caches', '1')
  } catch {
    // Not root: the first pass then starts with whatever was cached.
  }
}

const variants = [
  { label: 'libfuse defaults (no kernel_cache)', tuning: { kernelCache: false, readAheadKb: 128 } },
  { label: 'kernel_cache', tuning: { kernelCache: true, readAheadKb: 128 } },
  { label: 'direct_io', tuning: { kernelCache: false, directIo: true, readAheadKb: 128 } },
  { label: 'kernel_cache, max_read=64K', tuning: { kernelCache: true, maxReadBytes: 65536, readAheadKb: 128 } },
  { label: 'kernel_cache, read_ahead_kb=512', tuning: { kernelCache: true, readAheadKb: 512 } },
  { label: 'kernel_cache, read_ahead_kb=1024', tuning: { kernelCache: true, readAheadKb: 1024 } },
  { label: 'kernel_cache, read_ahead_kb=4096', tuning: { kernelCache: true, readAheadKb: 4096 } },
]

const dir = await mkdtemp(join(tmpdir(), 'qcow2fs-measure-'))
const mnt = join(dir, 'mnt')
await run('mkdir', [mnt])
let readAt
let cleanupBacking = async () => {}
if (backing === 'memory') {
  const memory = Buffer.alloc(sizeBytes)
  pattern(0, sizeBytes, memory)
  readAt = async (buf, guestOffset) => {
    memory.copy(buf, 0, guestOffset, guestOffset + buf.length)
  }
} else {
  const rawPath = join(dir, 'backing.raw')
  const chunk = Buffer.alloc(1 << 20)
  const fh = await open(rawPath, 'w')
  for (let offset = 0; offset < sizeBytes; offset += chunk.length) {
    pattern(offset, chunk.length, chunk)
    await fh.write(chunk, 0, chunk.length, offset)
  }
  await fh.close()
  if (backing === 'qcow2') {
    const imagePath = join(dir, 'backing.qcow2')
    await run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', rawPath, imagePath])
    await rm(rawPath)
    const image = await Qcow2Image.open(imagePath, { readOnly: true })
    readAt = (buf, guestOffset) => image.read(buf, guestOffset)
    cleanupBacking = () => image.close()
  } else {
    const reader = await open(rawPath, 'r')
    readAt = async (buf, guestOffset) => {
      await reader.read(buf, 0, buf.length, guestOffset)
    }
    cleanupBacking = () => reader.close()
  }
}

console.log(`disk ${sizeMiB} MiB, backing ${backing}, load average ${(await readFile('/proc/loadavg', 'utf8')).split(' ').slice(0, 3).join(' ')}`)
console.log('variant | pass 1 MiB/s | pass 2 MiB/s | bs=4K MiB/s | requests (pass 1) | avg KiB | max in flight')

function median(values) {
  const sorted = [...values].sort((a, b) => a - b)
  return sorted[Math.floor(sorted.length / 2)]
}

async function measureOnce(variant) {
  const disk = new CountingDisk(readAt)
  const mounted = await mountRawFiles(mnt, [{ imagePath: 'disk.qcow2', disk }], { tuning: variant.tuning })
  try {
    await dropCaches()
    const first = await ddMiBs(mounted.paths[0])
    const requests = disk.requests
    const avgKiB = disk.bytes / disk.requests / 1024
    const second = await ddMiBs(mounted.paths[0])
    await dropCaches()
    const small = await ddMiBs(mounted.paths[0], 4096, Math.min(256, sizeMiB))
    return { first, second, small, requests, avgKiB, maxConcurrent: disk.maxConcurrent }
  } finally {
    await mounted.session.unmount(false)
    await mounted.session.ended
    mounted.session.release()
  }
}

try {
  for (const variant of variants) {
    const runs = []
    for (let i = 0; i < repetitions; i++) runs.push(await measureOnce(variant))
    const first = median(runs.map((r) => r.first))
    const second = median(runs.map((r) => r.second))
    const small = median(runs.map((r) => r.small))
    const last = runs[runs.length - 1]
    const maxConcurrent = Math.max(...runs.map((r) => r.maxConcurrent))
    console.log(
      `${variant.label} | ${first.toFixed(0)} | ${second.toFixed(0)} | ${small.toFixed(0)} | ${last.requests} | ${last.avgKiB.toFixed(0)} | ${maxConcurrent}`,
    )
  }
} finally {
  await cleanupBacking()
  await rm(dir, { recursive: true, force: true })
}

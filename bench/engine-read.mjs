#!/usr/bin/env node
/*
 * The qcow2fs read engine alone, without FUSE and the kernel: reads an image through
 * Qcow2Image (from the built dist/), opened as the mount opens it, with the request sizes the
 * FUSE mount sees.
 * bench/run.sh runs it next to the FUSE targets, so a figure of the mount can be split into
 * "engine" and "FUSE round trip" (the no-I/O server measures the latter alone).
 *
 * Usage: node bench/engine-read.mjs MODE IMAGE [SECONDS]
 *   seq       read the whole guest in 128 KiB requests (the FUSE max_read), in order;
 *             prints MB/s (10^6 bytes per second) and the CPU seconds used per GiB
 *   rand-qd1  4 KiB reads at random 4 KiB-aligned guest offsets, one at a time, for SECONDS;
 *             prints IOPS and the CPU microseconds used per read
 *   rand-qd16 the same with 16 reads in flight (as fio libaio iodepth 16 issues them)
 * CPU time is this process's user + system time (all threads) during the reads.
 */
import { randomInt } from 'node:crypto'
import { resolve } from 'node:path'
import { pathToFileURL } from 'node:url'

const SEQ_REQUEST_BYTES = 128 * 1024
const RAND_REQUEST_BYTES = 4096

function fail(message) {
  process.stderr.write(`engine-read: ${message}\n`)
  process.exit(2)
}

const [mode, imagePath, secondsArg = '10'] = process.argv.slice(2)
if (!mode || !imagePath) fail('usage: node bench/engine-read.mjs seq|rand-qd1|rand-qd16 IMAGE [SECONDS]')
const seconds = Number(secondsArg)
if (!(seconds > 0)) fail(`bad SECONDS: ${secondsArg}`)

const root = resolve(import.meta.dirname ?? new URL('.', import.meta.url).pathname, '..')
const { Qcow2Image } = await import(pathToFileURL(resolve(root, 'dist/lib/image.js')).href)
// As the mount opens it: read-only, with the read-ahead of lib/io/read-ahead.ts.
const image = await Qcow2Image.open(imagePath, { readOnly: true, readAhead: true })

/** CPU seconds (user + system) since `since`, a process.cpuUsage() value. */
function cpuSecondsSince(since) {
  const used = process.cpuUsage(since)
  return (used.user + used.system) / 1e6
}

async function sequential() {
  const buf = Buffer.alloc(SEQ_REQUEST_BYTES)
  const cpuStart = process.cpuUsage()
  const start = process.hrtime.bigint()
  let bytes = 0
  for (let guestOffset = 0; guestOffset < image.virtualSize; guestOffset += SEQ_REQUEST_BYTES) {
    const view = buf.subarray(0, Math.min(SEQ_REQUEST_BYTES, image.virtualSize - guestOffset))
    await image.read(view, guestOffset)
    bytes += view.length
  }
  const elapsedS = Number(process.hrtime.bigint() - start) / 1e9
  return [bytes / elapsedS / 1e6, (cpuSecondsSince(cpuStart) * 2 ** 30) / bytes]
}

async function random(depth) {
  const blockCount = Math.floor(image.virtualSize / RAND_REQUEST_BYTES)
  const deadline = process.hrtime.bigint() + BigInt(Math.round(seconds * 1e9))
  const cpuStart = process.cpuUsage()
  const start = process.hrtime.bigint()
  let reads = 0
  async function worker() {
    const buf = Buffer.alloc(RAND_REQUEST_BYTES)
    while (process.hrtime.bigint() < deadline) {
      await image.read(buf, randomInt(blockCount) * RAND_REQUEST_BYTES)
      reads++
    }
  }
  await Promise.all(Array.from({ length: depth }, worker))
  const elapsedS = Number(process.hrtime.bigint() - start) / 1e9
  return [reads / elapsedS, (cpuSecondsSince(cpuStart) * 1e6) / reads]
}

try {
  let result
  if (mode === 'seq') result = await sequential()
  else if (mode === 'rand-qd1') result = await random(1)
  else if (mode === 'rand-qd16') result = await random(16)
  else fail(`unknown MODE: ${mode}`)
  const [value, cpu] = result
  process.stdout.write(`${value.toFixed(1)} ${cpu.toFixed(mode === 'seq' ? 3 : 2)}\n`)
} finally {
  await image.close()
}

/*
 * Child process of test/ordering/kill9.test.ts, run with node on the compiled engine (dist/).
 *
 *   node kill9-child.mjs IMAGE SEED CLUSTER_SIZE
 *
 * Opens IMAGE read-write and loops over seeded random ops until it is killed: writes (data
 * from kill9-data.mjs), zero writes, all-zero data writes, and flushes. It reports on stdout,
 * one JSON object per line, written synchronously (stdout is a pipe) so every line printed
 * before a SIGKILL reaches the parent:
 *
 *   {"ready":true,"virtualSize":N}                the image is open
 *   {"op":I,"kind":"write"|"zeroes"|"zero-data","guestOffset":O,"length":L}
 *                                                 before op I is issued
 *   {"flushed":I}                                 flush() returned: ops 0..I-1 are durable
 *
 * After MAX_OPS ops it closes the image and prints {"done":true} (the parent kills it long
 * before that).
 */
import { dataFor, makeStream } from './kill9-data.mjs'

const MAX_OPS = 100000
const [imagePath, seedText, clusterSizeText] = process.argv.slice(2)
if (!imagePath || !seedText || !clusterSizeText) {
  process.stderr.write('usage: node kill9-child.mjs IMAGE SEED CLUSTER_SIZE\n')
  process.exit(2)
}
const seed = Number(seedText)
const clusterSize = Number(clusterSizeText)
const { Qcow2Image } = await import(new URL('../../dist/lib/image.js', import.meta.url).href)

function say(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n')
}

const img = await Qcow2Image.open(imagePath, { readOnly: false })
const virtualSize = img.virtualSize
say({ ready: true, virtualSize })
const next = makeStream(seed)
const below = (n) => Math.floor((next() / 0x1_0000_0000) * n)
let sinceFlush = 0
let flushEvery = 1 + below(6)
for (let op = 0; op < MAX_OPS; op++) {
  const r = below(100)
  let guestOffset
  let length
  if (r < 15) {
    // Cluster-aligned zero writes: zero flags, released clusters.
    const clusters = 1 + below(4)
    guestOffset = below(virtualSize / clusterSize - clusters) * clusterSize
    length = clusters * clusterSize
    say({ op, kind: 'zeroes', guestOffset, length })
    await img.writeZeroes(guestOffset, length)
  } else if (r < 20) {
    length = 1 + below(32 * 1024)
    guestOffset = below(virtualSize - length)
    say({ op, kind: 'zero-data', guestOffset, length })
    await img.write(Buffer.alloc(length), guestOffset)
  } else {
    length = 1 + below(r < 60 ? 8 * 1024 : 256 * 1024)
    guestOffset = below(virtualSize - length)
    say({ op, kind: 'write', guestOffset, length })
    await img.write(dataFor(seed, op, length), guestOffset)
  }
  if (++sinceFlush >= flushEvery) {
    await img.flush()
    say({ flushed: op + 1 })
    sinceFlush = 0
    flushEvery = 1 + below(6)
  }
}
await img.close()
say({ done: true })

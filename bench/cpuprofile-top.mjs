#!/usr/bin/env node
/*
 * Summarises a V8 .cpuprofile (from `node --cpu-prof`, e.g. a bench run with
 * BENCH_CPU_PROFILE=1): where the sampled time went, by function (self time) and by the
 * source file of the function, so that "engine", "FUSE adapter", "fuse-native" and "idle"
 * can be told apart.
 *
 * Usage: node bench/cpuprofile-top.mjs FILE.cpuprofile [TOP_N]
 */
import { readFileSync } from 'node:fs'
import { relative } from 'node:path'

const [file, topArg = '25'] = process.argv.slice(2)
if (!file) {
  process.stderr.write('usage: node bench/cpuprofile-top.mjs FILE.cpuprofile [TOP_N]\n')
  process.exit(2)
}
const topCount = Number(topArg)
process.stdout.on('error', (err) => {
  if (err.code === 'EPIPE') process.exit(0)
  throw err
})
const profile = JSON.parse(readFileSync(file, 'utf8'))

/** node id -> node */
const nodes = new Map(profile.nodes.map((node) => [node.id, node]))
/** node id -> sampled microseconds (self) */
const selfMicros = new Map()
const deltas = profile.timeDeltas ?? []
for (let i = 0; i < profile.samples.length; i++) {
  // timeDeltas[i] is the time before sample i; attribute the next delta to sample i.
  const micros = deltas[i + 1] ?? 0
  const id = profile.samples[i]
  selfMicros.set(id, (selfMicros.get(id) ?? 0) + micros)
}
const totalMicros = [...selfMicros.values()].reduce((a, b) => a + b, 0)

function shortUrl(url) {
  if (!url) return ''
  const path = url.startsWith('file://') ? new URL(url).pathname : url
  return path.startsWith('/') ? relative(process.cwd(), path) : path
}

const byFunction = new Map()
const byFile = new Map()
for (const [id, micros] of selfMicros) {
  const frame = nodes.get(id).callFrame
  const name = frame.functionName || '(anonymous)'
  const url = shortUrl(frame.url)
  const fnKey = url ? `${name}  ${url}:${frame.lineNumber + 1}` : name
  byFunction.set(fnKey, (byFunction.get(fnKey) ?? 0) + micros)
  const fileKey = url || name
  byFile.set(fileKey, (byFile.get(fileKey) ?? 0) + micros)
}

function print(title, map) {
  process.stdout.write(`\n${title}\n`)
  const rows = [...map.entries()].sort((a, b) => b[1] - a[1]).slice(0, topCount)
  for (const [key, micros] of rows) {
    const pct = ((100 * micros) / totalMicros).toFixed(1).padStart(5)
    process.stdout.write(`${pct}%  ${(micros / 1000).toFixed(0).padStart(7)} ms  ${key}\n`)
  }
}

process.stdout.write(`${file}: ${(totalMicros / 1e6).toFixed(1)} s sampled, ${profile.samples.length} samples\n`)
print('Self time by function:', byFunction)
print('Self time by file (or pseudo-function):', byFile)

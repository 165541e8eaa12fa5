#!/usr/bin/env node
/*
 * Turns the samples of one bench/run.sh run into a markdown report: medians per case and
 * target, the qcow2fs / qsd ratio with the project goals, the no-I/O ceiling, every sample.
 *
 * Usage: node bench/report.mjs --samples FILE.tsv --meta FILE.env --out FILE.md [--doc PERFORMANCE.md]
 *
 * The report goes to --out and to stdout. With --doc, the text between the markers
 * <!-- bench-results:begin --> and <!-- bench-results:end --> of that file is replaced by it,
 * so the figures in the doc are exactly what the run printed.
 */
import { readFileSync, writeFileSync } from 'node:fs'
import { parseArgs } from 'node:util'

const BEGIN_MARKER = '<!-- bench-results:begin -->'
const END_MARKER = '<!-- bench-results:end -->'

const CASES = [
  { id: 'seq-cold', label: 'Sequential read, dd bs=1M, all caches dropped', unit: 'MB/s', cpuUnit: 'CPU s per GiB' },
  { id: 'seq-warm', label: 'Sequential read, dd bs=1M, qcow2 file in host page cache', unit: 'MB/s', cpuUnit: 'CPU s per GiB' },
  { id: 'rand-qd1', label: '4 KiB random read, fio psync, iodepth 1', unit: 'IOPS', cpuUnit: 'CPU µs per read' },
  { id: 'rand-qd16', label: '4 KiB random read, fio libaio, iodepth 16', unit: 'IOPS', cpuUnit: 'CPU µs per read' },
]
const IMAGES = ['allocated', 'compressed']
/** Project goals for qcow2fs / qsd (from the performance issue). */
const GOALS = new Map([
  ['seq-cold/allocated', 1.2],
  ['seq-cold/compressed', 1.0],
])
const KIND_NAMES = {
  qcow2fs: 'qcow2fs',
  qsd: 'qsd FUSE export',
  engine: 'qcow2fs engine alone (no FUSE)',
  zero: 'no-I/O fuse-native server',
}

function fail(message) {
  process.stderr.write(`report: ${message}\n`)
  process.exit(1)
}

const { values: args } = parseArgs({
  options: {
    samples: { type: 'string' },
    meta: { type: 'string' },
    out: { type: 'string' },
    doc: { type: 'string' },
  },
  strict: true,
})
if (!args.samples || !args.meta || !args.out) fail('--samples, --meta and --out are required')

function readMeta(path) {
  const meta = {}
  for (const line of readFileSync(path, 'utf8').split('\n')) {
    const eq = line.indexOf('=')
    if (eq > 0) meta[line.slice(0, eq)] = line.slice(eq + 1)
  }
  return meta
}

function readSamples(path) {
  const lines = readFileSync(path, 'utf8').trim().split('\n')
  const header = lines.shift()?.split('\t')
  if (header?.join(',') !== 'rep,case,kind,image,value,cpu') fail(`unexpected header in ${path}`)
  /** key "case|kind|image" -> values in run order */
  const samples = new Map()
  /** the same keys -> CPU time of the server per GiB or per read */
  const cpuSamples = new Map()
  for (const line of lines) {
    const [rep, caseId, kind, image, valueText, cpuText] = line.split('\t')
    const value = Number(valueText)
    const cpu = Number(cpuText)
    if (!rep || !caseId || !kind || !image || !Number.isFinite(value) || value <= 0) fail(`bad sample line: ${line}`)
    if (!Number.isFinite(cpu) || cpu < 0) fail(`bad CPU figure in sample line: ${line}`)
    const key = `${caseId}|${kind}|${image}`
    if (!samples.has(key)) samples.set(key, [])
    samples.get(key).push(value)
    if (!cpuSamples.has(key)) cpuSamples.set(key, [])
    cpuSamples.get(key).push(cpu)
  }
  return { samples, cpuSamples }
}

function median(values) {
  const sorted = [...values].sort((a, b) => a - b)
  const mid = Math.floor(sorted.length / 2)
  return sorted.length % 2 === 1 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2
}

function formatValue(value, unit) {
  if (value === undefined) return 'n/a'
  return unit === 'IOPS' ? String(Math.round(value)) : value.toFixed(0)
}

const meta = readMeta(args.meta)
const { samples, cpuSamples } = readSamples(args.samples)
const medianIn = (map, caseId, kind, image) => {
  const values = map.get(`${caseId}|${kind}|${image}`)
  return values && values.length > 0 ? median(values) : undefined
}
const medianOf = (caseId, kind, image) => medianIn(samples, caseId, kind, image)
const cpuMedianOf = (caseId, kind, image) => medianIn(cpuSamples, caseId, kind, image)

function formatCpu(value, cpuUnit) {
  if (value === undefined) return 'n/a'
  return cpuUnit.includes('GiB') ? value.toFixed(2) : value.toFixed(1)
}

const out = []
const mib = (bytes) => (Number(bytes) / 1048576).toFixed(0)
out.push(`Run of ${meta.date}, commit ${meta.git}, command \`make bench\` (bash bench/run.sh).`)
out.push('')
out.push(
  `Machine: ${meta.cpu}, ${meta.nproc} CPUs, ${meta.memory} RAM, ${meta.kernel}; ` +
    `Node.js ${meta.node}, ${meta.qemu}, ${meta.fio}, fuse-native ${meta.fuse_native}; ` +
    `${meta.load} (other work on the machine shows here).`,
)
out.push('')
out.push(
  `Images: ${meta.image_mib} MiB guest, 64 KiB clusters, every cluster allocated; ` +
    `allocated.qcow2 is ${mib(meta.allocated_bytes)} MiB on disk, compressed.qcow2 is ` +
    `${mib(meta.compressed_bytes)} MiB with ${meta.compressed_pct || '?'}% of its clusters compressed.`,
)
out.push('')
out.push(
  `Each figure is the median of ${meta.reps} runs; fio runs ${meta.fio_runtime} s each; ` +
    `random reads use ${meta.fio_cache}.` +
    (meta.qcow2fs_opts ? ` qcow2fs mount options: \`${meta.qcow2fs_opts}\`.` : '') +
    (meta.zero_options ? ` The no-I/O server mounts with \`${meta.zero_options}\`.` : ''),
)
out.push('')
out.push(
  '"engine alone" reads the qcow2 file through the qcow2fs engine in-process (bench/engine-read.mjs: ' +
    `128 KiB requests for the sequential cases, 4 KiB random reads for ${meta.engine_random_s} s ` +
    'with 1 or 16 in flight); "no-I/O FUSE ceiling" is bench/zero-fuse.mjs, a fuse-native server ' +
    'answering every read with zeros, measured with the same dd and fio commands as the mounts.',
)
if (meta.cpu_profile === '1') {
  out.push('')
  out.push('**The qcow2fs servers ran under `node --cpu-prof`: these figures are not representative.**')
}
out.push('')
out.push('| Case | Image | qsd FUSE export | qcow2fs | qcow2fs / qsd | Goal | engine alone | no-I/O FUSE ceiling |')
out.push('|---|---|---:|---:|---:|---|---:|---:|')
for (const c of CASES) {
  for (const image of IMAGES) {
    const qsd = medianOf(c.id, 'qsd', image)
    const ours = medianOf(c.id, 'qcow2fs', image)
    const zero = medianOf(c.id, 'zero', 'none')
    const engine = medianOf(c.id, 'engine', image)
    const ratio = qsd && ours ? ours / qsd : undefined
    const goal = GOALS.get(`${c.id}/${image}`)
    let goalText = ''
    if (goal !== undefined) goalText = ratio === undefined ? `>= ${goal.toFixed(1)}x` : `>= ${goal.toFixed(1)}x: ${ratio >= goal ? 'met' : '**missed**'}`
    out.push(
      `| ${c.label} (${c.unit}) | ${image} | ${formatValue(qsd, c.unit)} | ${formatValue(ours, c.unit)} | ` +
        `${ratio === undefined ? 'n/a' : ratio.toFixed(2) + 'x'} | ${goalText} | ${formatValue(engine, c.unit)} | ` +
        `${formatValue(zero, c.unit)} |`,
    )
  }
}
out.push('')
out.push(
  'CPU time the server process used (user + system, all its threads) for the same runs, ' +
    'median: seconds per GiB read sequentially, microseconds per random read. It counts ' +
    "only the server's own work, not the kernel's FUSE and page cache work for the reader, " +
    'and moves much less than the throughput when other work shares the CPUs. Lower is better.',
)
out.push('')
out.push('| Case | Image | qsd FUSE export | qcow2fs | qcow2fs / qsd | engine alone | no-I/O FUSE server |')
out.push('|---|---|---:|---:|---:|---:|---:|')
for (const c of CASES) {
  for (const image of IMAGES) {
    const qsd = cpuMedianOf(c.id, 'qsd', image)
    const ours = cpuMedianOf(c.id, 'qcow2fs', image)
    const ratio = qsd && ours ? ours / qsd : undefined
    out.push(
      `| ${c.label} (${c.cpuUnit}) | ${image} | ${formatCpu(qsd, c.cpuUnit)} | ${formatCpu(ours, c.cpuUnit)} | ` +
        `${ratio === undefined ? 'n/a' : ratio.toFixed(2) + 'x'} | ${formatCpu(cpuMedianOf(c.id, 'engine', image), c.cpuUnit)} | ` +
        `${formatCpu(cpuMedianOf(c.id, 'zero', 'none'), c.cpuUnit)} |`,
    )
  }
}
out.push('')
out.push('All samples, in run order:')
out.push('')
out.push('| Case | Target | Image | Samples | Median | CPU per sample (s/GiB or µs/read) |')
out.push('|---|---|---|---|---:|---|')
for (const c of CASES) {
  for (const [kind, images] of [['qsd', IMAGES], ['qcow2fs', IMAGES], ['engine', IMAGES], ['zero', ['none']]]) {
    for (const image of images) {
      const values = samples.get(`${c.id}|${kind}|${image}`)
      if (!values) continue
      out.push(
        `| ${c.id} (${c.unit}) | ${KIND_NAMES[kind]} | ${image === 'none' ? '-' : image} | ` +
          `${values.map((v) => formatValue(v, c.unit)).join(', ')} | ${formatValue(median(values), c.unit)} | ` +
          `${(cpuSamples.get(`${c.id}|${kind}|${image}`) ?? []).map((v) => formatCpu(v, c.cpuUnit)).join(', ')} |`,
      )
    }
  }
  // The two targets ran back to back in each repetition: their per-repetition ratio shows how
  // much of a difference is noise of the machine.
  for (const image of IMAGES) {
    const ours = samples.get(`${c.id}|qcow2fs|${image}`)
    const qsd = samples.get(`${c.id}|qsd|${image}`)
    if (!ours || !qsd || ours.length !== qsd.length) continue
    const ratios = ours.map((v, i) => v / qsd[i])
    out.push(
      `| ${c.id} | qcow2fs / qsd, same repetition | ${image} | ` +
        `${ratios.map((r) => r.toFixed(2) + 'x').join(', ')} | ${median(ratios).toFixed(2)}x | |`,
    )
  }
}
const report = out.join('\n') + '\n'

writeFileSync(args.out, `# qcow2fs benchmark: latest run\n\n${report}`)
process.stdout.write(`\n${report}\n`)

if (args.doc) {
  const doc = readFileSync(args.doc, 'utf8')
  const begin = doc.indexOf(BEGIN_MARKER)
  const end = doc.indexOf(END_MARKER)
  if (begin < 0 || end < begin) fail(`${args.doc} lacks the ${BEGIN_MARKER} ... ${END_MARKER} markers`)
  const updated = doc.slice(0, begin + BEGIN_MARKER.length) + '\n' + report + doc.slice(end)
  writeFileSync(args.doc, updated)
}

/*
 * `qcow2fs create IMAGE [SIZE] [OPTIONS]`: writes a new, empty qcow2 (version 3) image with
 * the engine's creator (lib/engine/create.ts), for the options qemu-img knows by the same
 * meaning. Unlike qemu-img it never overwrites: an existing IMAGE is an error.
 *
 * Exit codes: 2 for anything wrong in the arguments themselves (unknown option, bad SIZE or
 * option value, options that do not go together, a size or backing name the format cannot
 * hold); 1 for problems found in files (IMAGE exists, backing file missing or unreadable,
 * write errors). In both cases nothing is created.
 */
import * as fs from 'node:fs'
import * as path from 'node:path'
import { InvalidRequestError, describeError } from '../../lib/errors.js'
import { type CreateOptions, type ImagePlan, DEFAULT_CLUSTER_SIZE, DEFAULT_REFCOUNT_BITS, checkCreateOptions, createImage } from '../../lib/engine/create.js'
import { NodeBlockFile } from '../../lib/io/block-file.js'
import { log } from '../../lib/log.js'
import { EXIT_OK, UsageError, parseCommandArgs, type Command } from '../command.js'

/** Size suffixes (powers of 1024), case-insensitive, as qemu-img accepts them. */
const SIZE_SUFFIXES: Record<string, bigint> = {
  b: 1n,
  k: 1n << 10n,
  m: 1n << 20n,
  g: 1n << 30n,
  t: 1n << 40n,
  p: 1n << 50n,
  e: 1n << 60n,
}

/**
 * A byte count from the command line: digits, optionally a fraction, and an optional suffix
 * K, M, G, T, P or E (powers of 1024; B for bytes), e.g. 1073741824, 10G, 1.5M. A fraction
 * needs a suffix; fractional bytes are dropped. Throws UsageError naming `what`.
 */
export function parseSizeArgument(text: string, what = 'size'): number {
  const m = /^(\d+)(?:\.(\d*))?([bkmgtpe])?$/i.exec(text)
  const bad = (): UsageError => new UsageError(`invalid ${what} '${text}': give bytes, or a number with a K, M, G, T, P or E suffix (powers of 1024)`)
  if (!m) throw bad()
  const [, whole, fraction, suffix] = m
  if (fraction !== undefined && suffix === undefined) throw bad()
  const unit = SIZE_SUFFIXES[(suffix ?? 'b').toLowerCase()]!
  let bytes = BigInt(whole!) * unit
  if (fraction !== undefined && fraction.length > 0) bytes += (BigInt(fraction) * unit) / 10n ** BigInt(fraction.length)
  if (bytes > BigInt(Number.MAX_SAFE_INTEGER)) throw new UsageError(`${what} '${text}' is too large (at most ${Number.MAX_SAFE_INTEGER} bytes)`)
  return Number(bytes)
}

/** A whole decimal number (refcount bits). */
function parseCount(text: string, what: string): number {
  if (!/^\d+$/.test(text)) throw new UsageError(`invalid ${what} '${text}': give a whole number`)
  return Number(text)
}

/** The options `qcow2fs create` takes (every one is described in its usage text). */
export const CREATE_OPTIONS = {
  'cluster-size': { type: 'string' },
  'extended-l2': { type: 'boolean' },
  backing: { type: 'string', short: 'b' },
  'backing-format': { type: 'string', short: 'F' },
  'compression-type': { type: 'string' },
  'refcount-bits': { type: 'string' },
  'lazy-refcounts': { type: 'boolean' },
  quiet: { type: 'boolean', short: 'q' },
} as const

function onOff(value: boolean): string {
  return value ? 'on' : 'off'
}

/** The line printed after creating, in the style of qemu-img's "Formatting ..." line. */
export function describePlan(imagePath: string, plan: ImagePlan): string {
  const { spec, layout } = plan
  const parts = [
    `Formatting '${imagePath}', fmt=qcow2`,
    `cluster_size=${layout.clusterSize}`,
    `extended_l2=${onOff(spec.extendedL2)}`,
    `compression_type=${spec.compressionType === 0 ? 'zlib' : 'zstd'}`,
    `size=${spec.virtualSize}`,
  ]
  if (spec.backingFile !== undefined) parts.push(`backing_file=${spec.backingFile}`, `backing_fmt=${spec.backingFormat ?? 'raw'}`)
  parts.push(`lazy_refcounts=${onOff(spec.lazyRefcounts)}`, `refcount_bits=${2 ** spec.refcountOrder}`)
  return parts.join(' ')
}

/** Creates `imagePath` empty and exclusively; a file already there (even a dangling link) is an error. */
function createExclusive(imagePath: string): NodeBlockFile {
  let fd: number
  try {
    fd = fs.openSync(imagePath, 'wx', 0o644)
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code
    if (code === 'EEXIST') throw new Error(existsMessage(imagePath))
    if (code === 'ENOENT') throw new Error(`cannot create '${imagePath}': directory '${path.dirname(imagePath)}' does not exist`)
    throw new Error(`cannot create '${imagePath}': ${describeError(err)}`)
  }
  fs.closeSync(fd)
  return NodeBlockFile.open(imagePath, { readOnly: false })
}

function existsMessage(imagePath: string): string {
  return `'${imagePath}' already exists; qcow2fs create never overwrites a file (remove it first)`
}

function exists(p: string): boolean {
  try {
    fs.lstatSync(p)
    return true
  } catch {
    return false
  }
}

export const createCommand: Command = {
  name: 'create',
  summary: 'create a new empty qcow2 image (optionally on top of a backing file)',
  usage: [
    'Usage: qcow2fs create [OPTIONS] IMAGE SIZE',
    '       qcow2fs create [OPTIONS] --backing FILE IMAGE [SIZE]',
    '',
    'Writes a new, empty qcow2 version 3 image (compat 1.1) that qemu-img and QEMU read as',
    "their own. IMAGE must not exist: unlike 'qemu-img create', qcow2fs create never",
    'overwrites a file, it stops with an error instead.',
    '',
    'SIZE is the virtual disk size in bytes, or a number with a K, M, G, T, P or E suffix',
    '(powers of 1024: 10G, 1.5M). It is rounded up to a multiple of 512 bytes. With --backing',
    "it may be left out: the new disk then has the backing file's virtual size.",
    '',
    'Options:',
    `  --cluster-size N          bytes per cluster, a power of two from 512 to 2M (default ${DEFAULT_CLUSTER_SIZE / 1024}K)`,
    '  --extended-l2             extended L2 entries (32 subclusters per cluster); needs a',
    '                            cluster size of at least 16K',
    '  -b, --backing FILE        backing file; the name is stored as given, so a relative',
    "                            name stays relative and is found from IMAGE's directory",
    '  -F, --backing-format FMT  qcow2 or raw; without it the format is probed (qcow2 header',
    '                            -> qcow2, anything else -> raw) and stored in the image',
    '  --compression-type TYPE   zlib (default) or zstd, for compressed clusters',
    `  --refcount-bits N         refcount width: 1, 2, 4, 8, 16, 32 or 64 (default ${DEFAULT_REFCOUNT_BITS})`,
    '  --lazy-refcounts          set the lazy refcounts compatible feature',
    "  -q, --quiet               do not print the 'Formatting ...' line",
    '  -h, --help                show this help',
    '',
    'Exit codes: 0 created, 1 IMAGE exists, the backing file cannot be opened, or a write',
    'failed, 2 usage error (bad option or SIZE). Nothing is created when it fails.',
  ].join('\n') + '\n',
  async run(argv: string[]): Promise<number> {
    const { values, positionals } = parseCommandArgs(argv, CREATE_OPTIONS)
    if (positionals.length === 0) throw new UsageError('missing IMAGE')
    if (positionals.length > 2) throw new UsageError(`expected IMAGE and SIZE, got ${positionals.length} arguments`)
    const imagePath = positionals[0]!
    if (imagePath === '') throw new UsageError('IMAGE is empty')
    const options: CreateOptions = {
      extendedL2: values['extended-l2'] === true,
      lazyRefcounts: values['lazy-refcounts'] === true,
    }
    const sizeText = positionals[1]
    if (sizeText !== undefined) options.virtualSize = parseSizeArgument(sizeText)
    if (values['cluster-size'] !== undefined) options.clusterSize = parseSizeArgument(values['cluster-size'], 'cluster size')
    if (values['refcount-bits'] !== undefined) options.refcountBits = parseCount(values['refcount-bits'], 'refcount bits')
    if (values['compression-type'] !== undefined) options.compressionType = values['compression-type']
    if (values.backing !== undefined) options.backingFile = values.backing
    if (values['backing-format'] !== undefined) options.backingFormat = values['backing-format']
    try {
      checkCreateOptions(options)
    } catch (err) {
      if (err instanceof InvalidRequestError) throw new UsageError(err.message)
      throw err
    }
    if (exists(imagePath)) throw new Error(existsMessage(imagePath))
    log.cli('create %s %o', imagePath, options)

    let created = false
    let plan: ImagePlan
    try {
      plan = await createImage(imagePath, options, (p) => {
        const file = createExclusive(p)
        created = true
        return file
      })
    } catch (err) {
      // Only a file this run created is removed; an existing one was never touched.
      if (!created) throw err
      fs.rmSync(imagePath, { force: true })
      throw new Error(`cannot write '${imagePath}' (the partial file was removed): ${describeError(err)}`, { cause: err })
    }
    if (values.quiet !== true) process.stdout.write(describePlan(imagePath, plan) + '\n')
    return EXIT_OK
  },
}

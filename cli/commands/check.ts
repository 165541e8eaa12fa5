/*
 * `qcow2fs check [--repair leaks|all] [--json] IMAGE`: the consistency check of lib/check/, in
 * the vocabulary and with the exit codes of `qemu-img check` (0 clean, 2 corruptions, 3 leaks
 * only, 1 the check could not be done or hit errors). Each problem is one line on stderr in
 * qemu-img's wording ("ERROR cluster 5 refcount=1 reference=2"); the summary goes to stdout,
 * as text like qemu-img's or, with --json, with the keys of `qemu-img check --output=json`.
 */
import { type CheckCounts, checkImage } from '../../lib/check/check.js'
import { type RepairMode, repairImage } from '../../lib/check/repair.js'
import { NodeBlockFile } from '../../lib/io/block-file.js'
import { log } from '../../lib/log.js'
import { EXIT_FAILURE, EXIT_OK, UsageError, parseCommandArgs, singleImage, type Command } from '../command.js'

/** Exit codes of qemu-img check. */
export const EXIT_CORRUPTIONS = 2
export const EXIT_LEAKS = 3

/**
 * C's "%0.2f": rounds the exact binary value to two decimals, ties to even (JavaScript's
 * toFixed rounds ties up).
 */
export function formatFixed2(value: number): string {
  const exact = value.toFixed(20)
  const dot = exact.indexOf('.')
  const tail = exact.slice(dot + 3)
  if (/^50*$/.test(tail)) {
    const truncated = exact.slice(0, dot + 3)
    const lastDigit = Number(truncated[truncated.length - 1])
    if (lastDigit % 2 === 0) return truncated
  }
  return value.toFixed(2)
}

/** The human summary, as qemu-img check prints it. */
export function formatCheckHuman(counts: CheckCounts): string {
  const lines: string[] = []
  if (counts.corruptions === 0 && counts.leaks === 0 && counts.checkErrors === 0) {
    lines.push('No errors were found on the image.')
  } else {
    if (counts.corruptions > 0) {
      lines.push('', `${counts.corruptions} errors were found on the image.`, 'Data may be corrupted, or further writes to the image may corrupt it.')
    }
    if (counts.leaks > 0) {
      lines.push('', `${counts.leaks} leaked clusters were found on the image.`, 'This means waste of disk space, but no harm to data.')
    }
    if (counts.checkErrors > 0) lines.push('', `${counts.checkErrors} internal errors have occurred during the check.`)
  }
  if (counts.totalClusters !== 0 && counts.allocatedClusters !== 0) {
    lines.push(
      `${counts.allocatedClusters}/${counts.totalClusters} = ${formatFixed2((counts.allocatedClusters * 100) / counts.totalClusters)}% allocated, ` +
        `${formatFixed2((counts.fragmentedClusters * 100) / counts.allocatedClusters)}% fragmented, ` +
        `${formatFixed2((counts.compressedClusters * 100) / counts.allocatedClusters)}% compressed clusters`,
    )
  }
  if (counts.imageEndOffset !== 0) lines.push(`Image end offset: ${counts.imageEndOffset}`)
  return lines.join('\n') + '\n'
}

/** The block qemu-img prints before the double check of a repaired image. */
export function formatRepaired(counts: CheckCounts): string {
  return (
    'The following inconsistencies were found and repaired:\n\n' +
    `    ${counts.leaksFixed} leaked clusters\n` +
    `    ${counts.corruptionsFixed} corruptions\n\n` +
    'Double checking the fixed image now...\n'
  )
}

/**
 * The keys of `qemu-img check --output=json`: counters that are 0 are left out (check-errors,
 * filename and format never are), in the order qemu-img prints them (its JSON object's order).
 */
export function checkJson(counts: CheckCounts, filename: string): Record<string, string | number> {
  const out: Record<string, string | number> = {}
  const optional = (key: string, value: number): void => {
    if (value !== 0) out[key] = value
  }
  optional('image-end-offset', counts.imageEndOffset)
  optional('compressed-clusters', counts.compressedClusters)
  optional('total-clusters', counts.totalClusters)
  optional('corruptions', counts.corruptions)
  optional('corruptions-fixed', counts.corruptionsFixed)
  out['check-errors'] = counts.checkErrors
  optional('leaks', counts.leaks)
  optional('leaks-fixed', counts.leaksFixed)
  optional('allocated-clusters', counts.allocatedClusters)
  out.filename = filename
  out.format = 'qcow2'
  optional('fragmented-clusters', counts.fragmentedClusters)
  return out
}

/** 1 (check errors), 2 (corruptions), 3 (leaks) or 0, as qemu-img check exits. */
export function checkExitCode(counts: CheckCounts): number {
  if (counts.checkErrors > 0) return EXIT_FAILURE
  if (counts.corruptions > 0) return EXIT_CORRUPTIONS
  if (counts.leaks > 0) return EXIT_LEAKS
  return EXIT_OK
}

function parseRepairMode(value: string | undefined): RepairMode | undefined {
  if (value === undefined) return undefined
  if (value === 'leaks' || value === 'all') return value
  throw new UsageError(`--repair takes 'leaks' or 'all', not '${value}'`)
}

export const checkCommand: Command = {
  name: 'check',
  summary: 'check an image for consistency (refcounts, leaks, corruptions); repair it',
  usageExitCode: EXIT_FAILURE,
  usage: [
    'Usage: qcow2fs check [--repair leaks|all] [--json] [-U] IMAGE',
    '',
    "Checks IMAGE the way 'qemu-img check' does: it counts the references to every cluster",
    '(header, L1 and L2 tables of the image and its snapshots, data and compressed clusters,',
    'snapshot table, refcount table and blocks, bitmaps) and compares them with the refcounts',
    'the image states. Each problem is one line on stderr, in qemu-img\'s wording:',
    '  ERROR cluster N refcount=A reference=B   cluster N is used more often than counted',
    '                                           (also: used twice, metadata over metadata)',
    '  Leaked cluster N refcount=A reference=B  counted but unused (wasted space, no harm)',
    'and entries past the end of the file, misaligned tables and clusters, reserved bits,',
    'invalid subcluster bitmaps, invalid compressed descriptors, wrong COPIED flags.',
    'Without --repair the image is opened read-only and never modified. Like qemu-img check it',
    "takes QEMU's read lock (with --repair the write lock): an image that QEMU or a qcow2fs",
    'mount has open for writing is refused unless -U is given (not with --repair).',
    '',
    'Options:',
    '  -r, --repair leaks  lower refcounts that are too high (frees leaked clusters)',
    '  -r, --repair all    also raise refcounts that are too low, rebuild a broken refcount',
    '                      structure from the references, fix COPIED flags, misaligned zero',
    '                      clusters and incomplete snapshot table entries; clears the dirty',
    '                      and corrupt bits when nothing is left wrong. Metadata is',
    '                      rewritten in a crash-safe order.',
    "  --json              print JSON with the keys of 'qemu-img check --output=json'",
    '  -U, --force-share   check the image even while another process writes it (no lock;',
    '                      what is read may then be inconsistent)',
    '  -h, --help          show this help',
    '',
    'Exit codes (those of qemu-img check): 0 no errors, 2 corruptions found, 3 only leaks',
    'found, 1 the image could not be checked (or the check met errors), and also for usage',
    'errors (2 means corruptions here).',
  ].join('\n') + '\n',
  async run(argv: string[]): Promise<number> {
    const { values, positionals } = parseCommandArgs(argv, {
      json: { type: 'boolean' },
      repair: { type: 'string', short: 'r' },
      'force-share': { type: 'boolean', short: 'U' },
    })
    const imagePath = singleImage(positionals)
    const mode = parseRepairMode(values.repair)
    const json = values.json === true
    const forceShare = values['force-share'] === true
    if (forceShare && mode !== undefined) throw new UsageError('-U (--force-share) cannot be used with --repair')
    log.cli('check %s (repair=%s, json=%s, force-share=%s)', imagePath, mode ?? 'no', json, forceShare)
    const file = NodeBlockFile.open(imagePath, { readOnly: mode === undefined, ...(forceShare ? { lock: 'none' as const } : {}) })
    const report = (line: string): void => {
      process.stderr.write(`${line}\n`)
    }
    let counts: CheckCounts
    let repairedText = ''
    try {
      if (mode === undefined) {
        counts = checkImage(file, imagePath, report)
      } else {
        const result = repairImage(file, imagePath, mode, report)
        counts = result.counts
        if (counts.leaksFixed > 0 || counts.corruptionsFixed > 0) repairedText = formatRepaired(counts)
      }
    } finally {
      file.close()
    }
    if (json) {
      process.stdout.write(JSON.stringify(checkJson(counts, imagePath), null, 4) + '\n')
    } else {
      process.stdout.write(repairedText + formatCheckHuman(counts))
    }
    const code = checkExitCode(counts)
    if (code === EXIT_FAILURE) process.stderr.write('qcow2fs: check failed\n')
    return code
  },
}

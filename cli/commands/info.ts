/*
 * `qcow2fs info [--json] IMAGE`: opens the image read-only and prints what the engine knows
 * about it. --json prints the keys of `qemu-img info --output=json` (ImageInfo); the human
 * form follows the layout of `qemu-img info` so the two can be read side by side.
 */
import { Qcow2Image } from '../../lib/image.js'
import type { ImageInfo, SnapshotInfo } from '../../lib/image-info.js'
import { log } from '../../lib/log.js'
import { EXIT_OK, parseCommandArgs, singleImage, type Command } from '../command.js'

const SIZE_UNITS = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB', 'EiB'] as const

/**
 * A byte count the way qemu-img prints one: the largest binary unit that keeps the number
 * below 1000, three significant digits, trailing zeros dropped ("1 MiB", "332 KiB", "1.5 GiB").
 */
export function formatSize(bytes: number): string {
  let unitIndex = 0
  let unitBytes = 1
  while (unitIndex < SIZE_UNITS.length - 1 && bytes >= 1000 * unitBytes) {
    unitIndex++
    unitBytes *= 1024
  }
  const value = Number((bytes / unitBytes).toPrecision(3))
  return `${value} ${SIZE_UNITS[unitIndex]}`
}

function twoDigits(n: number): string {
  return String(n).padStart(2, '0')
}

/** Local time as "YYYY-MM-DD HH:MM:SS" (the DATE column of the snapshot table). */
export function formatSnapshotDate(dateSec: number): string {
  const d = new Date(dateSec * 1000)
  return (
    `${d.getFullYear()}-${twoDigits(d.getMonth() + 1)}-${twoDigits(d.getDate())} ` +
    `${twoDigits(d.getHours())}:${twoDigits(d.getMinutes())}:${twoDigits(d.getSeconds())}`
  )
}

/** Guest clock as "HH:MM:SS.mmm" (the VM CLOCK column); hours may exceed two digits. */
export function formatVmClock(vmClockSec: number, vmClockNsec: number): string {
  const hours = Math.floor(vmClockSec / 3600)
  const minutes = Math.floor((vmClockSec % 3600) / 60)
  const seconds = vmClockSec % 60
  const millis = Math.floor(vmClockNsec / 1_000_000)
  return `${twoDigits(hours)}:${twoDigits(minutes)}:${twoDigits(seconds)}.${String(millis).padStart(3, '0')}`
}

function snapshotRow(cells: [string, string, string, string, string, string]): string {
  const [id, tag, vmSize, date, vmClock, icount] = cells
  // Column widths of qemu-img's table; a long ID or TAG pushes the row right but keeps a space.
  return (
    `${id.padEnd(9)} ${tag.padEnd(16)} ${vmSize.padStart(8)}` +
    ` ${date.padStart(19)} ${vmClock.padStart(12)} ${icount.padStart(10)}`
  ).trimEnd()
}

function formatSnapshotTable(snapshots: readonly SnapshotInfo[]): string[] {
  const lines = [snapshotRow(['ID', 'TAG', 'VM SIZE', 'DATE', 'VM CLOCK', 'ICOUNT'])]
  for (const s of snapshots) {
    lines.push(
      snapshotRow([
        s.id,
        s.name,
        formatSize(s['vm-state-size']),
        formatSnapshotDate(s['date-sec']),
        formatVmClock(s['vm-clock-sec'], s['vm-clock-nsec']),
        s.icount === undefined ? '' : String(s.icount),
      ]),
    )
  }
  return lines
}

/** Keys of the format-specific data, in the order qemu-img 7.2 prints them. */
const FORMAT_SPECIFIC_ORDER = [
  'compat',
  'compression-type',
  'lazy-refcounts',
  'refcount-bits',
  'data-file',
  'data-file-raw',
  'corrupt',
  'extended-l2',
] as const

/** The human-readable form, modelled on `qemu-img info`. */
export function formatInfo(info: ImageInfo): string {
  const lines = [
    `image: ${info.filename}`,
    `file format: ${info.format}`,
    `virtual size: ${formatSize(info['virtual-size'])} (${info['virtual-size']} bytes)`,
    `disk size: ${formatSize(info['actual-size'])}`,
    `cluster_size: ${info['cluster-size']}`,
  ]
  const backing = info['backing-filename']
  if (backing !== undefined) {
    const full = info['full-backing-filename']
    lines.push(
      full !== undefined && full !== backing
        ? `backing file: ${backing} (actual path: ${full})`
        : `backing file: ${backing}`,
    )
    if (info['backing-filename-format'] !== undefined) {
      lines.push(`backing file format: ${info['backing-filename-format']}`)
    }
  }
  if (info['dirty-flag']) lines.push('cleanly shut down: no')
  if (info.snapshots !== undefined && info.snapshots.length > 0) {
    lines.push('Snapshot list:', ...formatSnapshotTable(info.snapshots))
  }
  const data = info['format-specific'].data
  lines.push('Format specific information:')
  for (const key of FORMAT_SPECIFIC_ORDER) {
    const value = data[key]
    if (value === undefined) continue
    lines.push(`    ${key.replace(/-/g, ' ')}: ${String(value)}`)
  }
  return lines.join('\n') + '\n'
}

export const infoCommand: Command = {
  name: 'info',
  summary: 'show an image: virtual size, cluster size, backing file, snapshots, features',
  usage: [
    'Usage: qcow2fs info [--json] [-U] IMAGE',
    '',
    'Opens IMAGE read-only (it is never modified) and prints what qcow2fs sees in it, in the',
    "layout of 'qemu-img info': virtual size, disk size, cluster size, backing file and its",
    'format, internal snapshots, and the qcow2 feature fields (compat, compression type, lazy',
    'refcounts, refcount bits, corrupt, extended l2, data file).',
    '',
    "Like 'qemu-img info' it takes QEMU's read lock, so an image that QEMU or a qcow2fs mount",
    'has open for writing is refused unless -U is given.',
    '',
    'Options:',
    "  --json              print JSON with the keys of 'qemu-img info --output=json'",
    '  -U, --force-share   read the image even while another process writes it (no lock;',
    '                      what is printed may be out of date or inconsistent)',
    '  -h, --help          show this help',
    '',
    'Exit codes: 0 printed, 1 the image cannot be opened (the reason is one line on',
    'stderr), 2 usage error.',
  ].join('\n') + '\n',
  async run(argv: string[]): Promise<number> {
    const { values, positionals } = parseCommandArgs(argv, { json: { type: 'boolean' }, 'force-share': { type: 'boolean', short: 'U' } })
    const imagePath = singleImage(positionals)
    log.cli('info %s (json=%s)', imagePath, values.json === true)
    const img = await Qcow2Image.open(imagePath, { readOnly: true, lock: values['force-share'] !== true })
    let text: string
    try {
      // The image named as the user gave it, like qemu-img; the engine keeps the absolute path.
      const info: ImageInfo = { ...img.info(), filename: imagePath }
      text = values.json === true ? JSON.stringify(info, null, 4) + '\n' : formatInfo(info)
    } finally {
      await img.close()
    }
    process.stdout.write(text)
    return EXIT_OK
  },
}

/*
 * `qcow2fs map [--json] IMAGE`: the allocation map of an image and its backing chain
 * (lib/check/map.ts). --json prints the array of `qemu-img map --output=json`, byte for byte in
 * its layout; the human form is qemu-img map's table of the extents that hold data.
 */
import { type MapEntry, mapImage } from '../../lib/check/map.js'
import { log } from '../../lib/log.js'
import { EXIT_FAILURE, EXIT_OK, parseCommandArgs, singleImage, type Command } from '../command.js'

/** One extent in qemu-img's JSON layout (keys in its order; offset only when known). */
function jsonEntry(e: MapEntry): string {
  const offset = e.offset !== undefined ? `, "offset": ${e.offset}` : ''
  return (
    `{ "start": ${e.start}, "length": ${e.length}, "depth": ${e.depth}, "present": ${e.present}, ` +
    `"zero": ${e.zero}, "data": ${e.data}${offset}}`
  )
}

/** The whole JSON output: `[` entry `,\n` entry ... `]`, as qemu-img prints it. */
export function formatMapJson(entries: readonly MapEntry[]): string {
  return `[${entries.map(jsonEntry).join(',\n')}]\n`
}

/** C's "%#-16" PRIx64: 0x-prefixed hex (plain 0 for zero), left-justified in 16 columns. */
function hexColumn(n: number): string {
  return (n === 0 ? '0' : `0x${n.toString(16)}`).padEnd(16)
}

/**
 * The human table: the extents that hold data (not zero), with where they are mapped. Like
 * qemu-img, it cannot show data without an offset (compressed clusters): `error` says so after
 * the lines before it.
 */
export function formatMapHuman(entries: readonly MapEntry[]): { text: string; error?: string } {
  const lines = [`${'Offset'.padEnd(16)}${'Length'.padEnd(16)}${'Mapped to'.padEnd(16)}File`]
  for (const e of entries) {
    if (e.data && e.offset === undefined) {
      return { text: lines.join('\n') + '\n', error: 'File contains external, encrypted or compressed clusters.' }
    }
    if (e.data && !e.zero) lines.push(`${hexColumn(e.start)}${hexColumn(e.length)}${hexColumn(e.offset ?? 0)}${e.filename ?? ''}`)
  }
  return { text: lines.join('\n') + '\n' }
}

export const mapCommand: Command = {
  name: 'map',
  summary: 'show where the guest data of an image and its backing chain lies',
  usage: [
    'Usage: qcow2fs map [--json] [-U] IMAGE',
    '',
    'Opens IMAGE and its backing chain read-only and prints its allocation map, like',
    "'qemu-img map': the extents of the guest disk and, for each, the layer of the chain that",
    'answers it (depth 0 is IMAGE), whether it is allocated there (present), reads as zeros',
    '(zero) or holds data (data), and where that data lies (offset, in File). Like qemu-img map',
    "it takes QEMU's read lock: an image that QEMU or a qcow2fs mount has open for writing is",
    'refused unless -U is given.',
    '',
    'The human table lists the extents that hold data: Offset, Length, Mapped to, File. It',
    'cannot show compressed clusters (they have no offset of their own): use --json.',
    '',
    'Options:',
    "  --json              print the JSON array of 'qemu-img map --output=json'",
    '  -U, --force-share   map the image even while another process writes it (no lock;',
    '                      what is read may then be inconsistent)',
    '  -h, --help          show this help',
    '',
    'Exit codes: 0 printed, 1 the image cannot be opened or its metadata cannot be read (the',
    'reason is one line on stderr), 2 usage error.',
  ].join('\n') + '\n',
  async run(argv: string[]): Promise<number> {
    const { values, positionals } = parseCommandArgs(argv, { json: { type: 'boolean' }, 'force-share': { type: 'boolean', short: 'U' } })
    const imagePath = singleImage(positionals)
    log.cli('map %s (json=%s)', imagePath, values.json === true)
    const entries = mapImage(imagePath, imagePath, { lock: values['force-share'] !== true })
    if (values.json === true) {
      process.stdout.write(formatMapJson(entries))
      return EXIT_OK
    }
    const { text, error } = formatMapHuman(entries)
    process.stdout.write(text)
    if (error === undefined) return EXIT_OK
    process.stderr.write(`qcow2fs: ${error}\n`)
    return EXIT_FAILURE
  },
}

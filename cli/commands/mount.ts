/*
 * `qcow2fs mount [-o OPTS] [-f] IMAGE... MOUNTPOINT`: exposes each image as MOUNTPOINT/STEM.raw.
 *
 * Without -f the server runs in the background: this command starts `qcow2fs __serve` as a
 * detached process (its own session, stdin/stdout on /dev/null, stderr into the server log in
 * the runtime directory), waits until it reports on a pipe that the mount is live or why it is
 * not, prints the raw file paths, and exits. On failure the server has already closed what it
 * opened and exits; this command waits for that, so nothing stays behind.
 *
 * `__serve` (hidden) is that background server: the mount options of `mount`, plus
 * --ready-fd N, the pipe to report on.
 */
import { spawn } from 'node:child_process'
import { closeSync, openSync, realpathSync, renameSync, statSync, writeSync } from 'node:fs'
import { resolve } from 'node:path'
import { describeError } from '../../lib/errors.js'
import { ensureRuntimeDir, removeIfEmpty, serverLogPath } from '../../lib/fuse/control.js'
import { MountFailure, MountServer, type ServerOptions } from '../../lib/fuse/server.js'
import type { DeflateChoice } from '../../lib/engine/compress/compressor.js'
import { Qcow2Image } from '../../lib/image.js'
import { log } from '../../lib/log.js'
import { EXIT_FAILURE, EXIT_OK, UsageError, parseCommandArgs, type Command } from '../command.js'

/** How long `mount` waits for the background server to report. */
const READY_TIMEOUT_MS = 60_000
const LOG_ROTATE_BYTES = 1024 * 1024
/** How long a server asked to stop before it reported gets before it is killed. */
const STOP_GRACE_MS = 15_000
const INTERRUPTS = ['SIGINT', 'SIGTERM', 'SIGHUP'] as const

/**
 * `access`: 'ro' and 'rw' as asked; 'auto' (neither given) opens each image read-write, and an
 * image that refuses writing (marked corrupt, dirty, an external data file, a read-only file)
 * is mounted read-only with a note saying why.
 */
export interface MountOptions {
  access: 'auto' | 'ro' | 'rw'
  fixedSize: boolean
  snapshot?: string
  l2CacheBytes?: number
  allowOther: boolean
  /** Take QEMU's image locks (false with -o nolock). */
  lock: boolean
  /** Store writes to fresh clusters compressed (-o compress; docs/COMPRESSION.md). */
  compress?: boolean
  /** Bound of the staging memory of partial writes with compress (-o compress-staging=BYTES). */
  compressStagingBytes?: number
  /** Which deflate compress uses for zlib images (-o compress-zlib=fast|qemu). */
  compressZlib?: DeflateChoice
}

const KNOWN_OPTIONS =
  'ro, rw, fixed-size, snapshot=NAME|ID, cache-size=BYTES[K|M|G], allow_other, nolock, compress, compress-staging=BYTES[K|M|G], compress-zlib=fast|qemu'

/** BYTES with an optional K, M or G (binary) suffix. */
export function parseByteSize(text: string): number | undefined {
  const match = /^(\d+)([KMG]?)$/i.exec(text)
  if (!match) return undefined
  const shift = { '': 0, K: 10, M: 20, G: 30 }[match[2]!.toUpperCase() as '' | 'K' | 'M' | 'G']
  const bytes = Number(match[1]) * 2 ** shift
  return Number.isSafeInteger(bytes) && bytes > 0 ? bytes : undefined
}

/** Parses the -o lists (comma-separated, later values win); throws UsageError. */
export function parseMountOptions(lists: readonly string[]): MountOptions {
  const opts: MountOptions = { access: 'auto', fixedSize: false, allowOther: false, lock: true }
  for (const list of lists) {
    for (const item of list.split(',')) {
      if (item === '') continue
      const eq = item.indexOf('=')
      const key = eq < 0 ? item : item.slice(0, eq)
      const value = eq < 0 ? undefined : item.slice(eq + 1)
      switch (key) {
        case 'ro':
        case 'rw':
        case 'fixed-size':
        case 'allow_other':
        case 'nolock':
        case 'compress':
          if (value !== undefined) throw new UsageError(`mount option '${key}' takes no value`)
          if (key === 'allow_other') opts.allowOther = true
          else if (key === 'fixed-size') opts.fixedSize = true
          else if (key === 'nolock') opts.lock = false
          else if (key === 'compress') opts.compress = true
          else opts.access = key
          break
        case 'compress-staging': {
          // 0 is allowed: partial writes to fresh clusters are then stored uncompressed.
          const bytes = value === '0' ? 0 : value === undefined ? undefined : parseByteSize(value)
          if (bytes === undefined) {
            throw new UsageError(`bad mount option 'compress-staging=${value ?? ''}': expected BYTES with an optional K, M or G suffix`)
          }
          opts.compressStagingBytes = bytes
          break
        }
        case 'compress-zlib':
          if (value !== 'fast' && value !== 'qemu') {
            throw new UsageError(`bad mount option 'compress-zlib=${value ?? ''}': expected fast or qemu`)
          }
          opts.compressZlib = value
          break
        case 'snapshot':
          if (!value) throw new UsageError(`mount option 'snapshot' needs a value: snapshot=NAME|ID`)
          opts.snapshot = value
          break
        case 'cache-size': {
          const bytes = value === undefined ? undefined : parseByteSize(value)
          if (bytes === undefined) {
            throw new UsageError(`bad mount option 'cache-size=${value ?? ''}': expected BYTES with an optional K, M or G suffix`)
          }
          opts.l2CacheBytes = bytes
          break
        }
        default:
          throw new UsageError(`unknown mount option '${key}' (known: ${KNOWN_OPTIONS})`)
      }
    }
  }
  if (opts.compressStagingBytes !== undefined && !opts.compress) {
    throw new UsageError(`mount option 'compress-staging' needs 'compress'`)
  }
  if (opts.compressZlib !== undefined && !opts.compress) {
    throw new UsageError(`mount option 'compress-zlib' needs 'compress'`)
  }
  if (opts.compress && (opts.access === 'ro' || opts.snapshot !== undefined)) {
    throw new UsageError(`mount option 'compress' writes: it cannot be combined with '${opts.snapshot !== undefined ? 'snapshot' : 'ro'}'`)
  }
  // A snapshot is a view of the past: never writable.
  if (opts.snapshot !== undefined) {
    if (opts.access === 'rw') throw new UsageError(`mount options 'rw' and 'snapshot' exclude each other: a snapshot is read-only`)
    opts.access = 'ro'
  }
  return opts
}

const OPTION_SPEC = {
  options: { type: 'string', short: 'o', multiple: true },
  foreground: { type: 'boolean', short: 'f' },
} as const

interface ParsedMount {
  optionLists: string[]
  opts: MountOptions
  imagePaths: string[]
  mountpoint: string
}

function parseMountArgs(values: { options?: string[] }, positionals: string[]): ParsedMount {
  const optionLists = values.options ?? []
  const opts = parseMountOptions(optionLists)
  if (positionals.length < 2) throw new UsageError('expected IMAGE... MOUNTPOINT')
  const imagePaths = positionals.slice(0, -1).map((p) => resolve(p))
  const mountpoint = resolve(positionals[positionals.length - 1]!)
  return { optionLists, opts, imagePaths, mountpoint }
}

/**
 * Opens one image as the options ask. With access 'auto', an image that refuses a read-write
 * open but opens read-only is served read-only, and `notes` gets a line saying why.
 */
async function openImage(imagePath: string, opts: MountOptions, notes: string[]): Promise<Qcow2Image> {
  const compress = opts.compress ? { stagingBytes: opts.compressStagingBytes, deflate: opts.compressZlib } : undefined
  const open = { snapshot: opts.snapshot, l2CacheBytes: opts.l2CacheBytes, lock: opts.lock, compress, readAhead: true }
  // A read-write open of a dirty image repairs it first and leaves a note in `notes`.
  if (opts.access !== 'auto') return Qcow2Image.open(imagePath, { ...open, readOnly: opts.access === 'ro', notes })
  let writeRefusal: unknown
  try {
    return await Qcow2Image.open(imagePath, { ...open, readOnly: false, notes })
  } catch (err) {
    writeRefusal = err
  }
  // Unreadable images fail here with the read-only open's reason.
  const image = await Qcow2Image.open(imagePath, { ...open, readOnly: true })
  const reason = describeError(writeRefusal)
  notes.push(`${reason.includes(imagePath) ? reason : `'${imagePath}': ${reason}`}: mounted read-only`)
  return image
}

function serverOptions(parsed: ParsedMount, notes: string[]): ServerOptions {
  const { opts } = parsed
  return {
    imagePaths: parsed.imagePaths,
    mountpoint: parsed.mountpoint,
    allowOther: opts.allowOther,
    fixedSize: opts.fixedSize,
    openDisk: (imagePath) => openImage(imagePath, opts, notes),
  }
}

/**
 * Runs the server in this process until it shuts down; `onReady` reports the raw files and
 * the notes of the open (images mounted read-only, and why).
 */
async function serve(parsed: ParsedMount, onReady: (files: string[], notes: string[]) => void, onFailure: (message: string) => void): Promise<number> {
  let server: MountServer
  const notes: string[] = []
  try {
    server = await MountServer.start(serverOptions(parsed, notes))
  } catch (err) {
    log.server('start failed: %O', err)
    onFailure(err instanceof MountFailure ? err.message : describeError(err))
    return EXIT_FAILURE
  }
  for (const note of notes) log.server('note: %s', note)
  onReady(server.files, notes)
  return server.done
}

/** The script this process runs (dist/cli/main.js, or a link to it): the server re-runs it. */
function cliEntry(): string {
  const script = process.argv[1]
  if (!script) throw new Error('cannot tell which script runs qcow2fs')
  return resolve(script)
}

type ReadyMessage = { ok: true; files: string[]; notes?: string[] } | { ok: false; error: string }

function printReady(files: string[], notes: readonly string[]): void {
  for (const note of notes) process.stderr.write(`qcow2fs: note: ${note.replace(/\s*\n\s*/g, ' ')}\n`)
  for (const file of files) process.stdout.write(`${file}\n`)
}

async function mountInBackground(parsed: ParsedMount): Promise<number> {
  await ensureRuntimeDir()
  let logKey = parsed.mountpoint
  try {
    logKey = realpathSync(parsed.mountpoint)
  } catch {
    // A missing mountpoint: the server reports it; its log goes under the path as given.
  }
  const logPath = serverLogPath(logKey)
  // Appended to (a server already running there may still write to it); kept below ~1 MiB by
  // moving a full log aside.
  try {
    if (statSync(logPath).size > LOG_ROTATE_BYTES) renameSync(logPath, `${logPath}.old`)
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err
  }
  const logFd = openSync(logPath, 'a', 0o600)
  const args = [
    cliEntry(),
    serveCommand.name,
    '--ready-fd',
    '3',
    ...parsed.optionLists.flatMap((list) => ['-o', list]),
    '--',
    ...parsed.imagePaths,
    parsed.mountpoint,
  ]
  log.cli('starting server: %s %o (log %s)', process.execPath, args, logPath)
  const child = spawn(process.execPath, [...process.execArgv, ...args], {
    detached: true,
    cwd: '/',
    stdio: ['ignore', 'ignore', logFd, 'pipe'],
  })
  closeSync(logFd)
  const exited = new Promise<number | null>((done) => {
    if (child.exitCode !== null) done(child.exitCode)
    else child.once('exit', (code, signal) => done(code ?? (signal ? 128 : null)))
  })
  const interruptHandlers: Array<[NodeJS.Signals, () => void]> = []
  const message = await new Promise<ReadyMessage | undefined>((done) => {
    const pipe = child.stdio[3] as NodeJS.ReadableStream | null
    let text = ''
    const timer = setTimeout(() => done(undefined), READY_TIMEOUT_MS)
    const finish = (m: ReadyMessage | undefined) => {
      clearTimeout(timer)
      done(m)
    }
    child.once('error', (err) => finish({ ok: false, error: `cannot start the server: ${err.message}` }))
    // Interrupted while waiting: stop the server too, rather than leave a mount nobody saw.
    for (const signal of INTERRUPTS) {
      const onSignal = () => finish({ ok: false, error: `interrupted (${signal})` })
      interruptHandlers.push([signal, onSignal])
      process.once(signal, onSignal)
    }
    if (!pipe) return finish({ ok: false, error: 'cannot start the server: no report pipe' })
    pipe.setEncoding('utf8')
    pipe.on('data', (chunk: string) => {
      text += chunk
      const newline = text.indexOf('\n')
      if (newline < 0) return
      try {
        finish(JSON.parse(text.slice(0, newline)) as ReadyMessage)
      } catch {
        finish({ ok: false, error: 'the server sent a malformed report' })
      }
    })
    pipe.on('end', () => finish(undefined))
  })
  for (const [signal, onSignal] of interruptHandlers) process.off(signal, onSignal)
  const pipe = child.stdio[3] as (NodeJS.ReadableStream & { destroy(): void }) | null
  if (message?.ok) {
    pipe?.destroy()
    child.unref()
    printReady(message.files, message.notes ?? [])
    return EXIT_OK
  }
  if (!message || /^interrupted/.test(message.ok ? '' : message.error)) {
    // Silent (it crashed or hangs), or we were interrupted: ask it to stop cleanly (it unmounts
    // and closes what it opened), then wait for it.
    if (child.exitCode === null) child.kill('SIGTERM')
    const stillThere = setTimeout(() => child.kill('SIGKILL'), STOP_GRACE_MS)
    void exited.then(() => clearTimeout(stillThere))
  }
  const code = await exited
  pipe?.destroy()
  await removeIfEmpty(logPath)
  const reason = message && !message.ok ? message.error : `the mount server exited (status ${code}) before the mount was ready; see ${logPath}`
  process.stderr.write(`qcow2fs: ${reason.replace(/\s*\n\s*/g, ' ')}\n`)
  return EXIT_FAILURE
}

export const mountCommand: Command = {
  name: 'mount',
  summary: 'mount images as MOUNTPOINT/STEM.raw files',
  usage: [
    'Usage: qcow2fs mount [-o OPTIONS] [-f] IMAGE... MOUNTPOINT',
    '',
    'Exposes each qcow2 IMAGE as the raw file MOUNTPOINT/STEM.raw (disk.qcow2 -> disk.raw).',
    'MOUNTPOINT must be an empty directory. The server runs in the background; the command',
    'prints the raw file paths once the mount is live. Stop it with `qcow2fs unmount MOUNTPOINT`',
    '(or umount / fusermount -u / SIGTERM to the server).',
    '',
    'Options:',
    '  -o OPTIONS        comma-separated mount options (may be repeated):',
    '                      rw                    read-write (the default; an image that cannot be',
    '                                            written, e.g. marked corrupt, is then mounted',
    '                                            read-only with a note; with rw it is refused)',
    '                      ro                    read-only: writes fail with EROFS',
    '                      fixed-size            the raw files keep their size: truncate, O_TRUNC',
    '                                            and writes past the end fail with EPERM',
    '                      snapshot=NAME|ID      show an internal snapshot instead (read-only)',
    '                      cache-size=BYTES[K|M|G]  L2 table cache per image',
    '                      allow_other           let other users access the mount',
    "                      nolock                take no image lock: QEMU and other mounts",
    '                                            are not kept off the images (see README)',
    '                      compress              store what is written to unwritten clusters',
    '                                            compressed (zlib or zstd, as the image says),',
    '                                            as qemu-img convert -c would',
    '                      compress-staging=BYTES[K|M|G]  memory for partial writes waiting',
    '                                            for their cluster to fill (default 64M; 0:',
    '                                            partial writes are stored uncompressed)',
    '                      compress-zlib=fast|qemu  deflate for zlib images: fast (the default,',
    "                                            Node's zlib: 1.5-1.8x faster, images 0-3%",
    '                                            larger) or qemu (the system zlib: exactly the',
    '                                            size of qemu-img convert -c)',
    '  -f, --foreground  run the server in the foreground until unmounted',
    '',
    'Server logs: DEBUG=qcow2fs:* qcow2fs mount ...; the background server writes them to a',
    'log file in $XDG_RUNTIME_DIR/qcow2fs-UID/ (or the temp directory).',
  ].join('\n') + '\n',
  async run(argv: string[]): Promise<number> {
    const { values, positionals } = parseCommandArgs(argv, OPTION_SPEC)
    const parsed = parseMountArgs(values, positionals)
    if (!values.foreground) return mountInBackground(parsed)
    return serve(
      parsed,
      (files, notes) => printReady(files, notes),
      (message) => process.stderr.write(`qcow2fs: ${message}\n`),
    )
  },
}

export const serveCommand: Command = {
  name: '__serve',
  summary: 'internal: the background mount server',
  usage: 'Usage: qcow2fs __serve --ready-fd N [-o OPTIONS] IMAGE... MOUNTPOINT (started by qcow2fs mount)\n',
  async run(argv: string[]): Promise<number> {
    const { values, positionals } = parseCommandArgs(argv, { ...OPTION_SPEC, 'ready-fd': { type: 'string' } })
    const readyFd = Number(values['ready-fd'])
    if (!Number.isInteger(readyFd) || readyFd < 3) throw new UsageError('--ready-fd N (N >= 3) is required')
    const report = (message: ReadyMessage) => {
      try {
        writeSync(readyFd, `${JSON.stringify(message)}\n`)
        closeSync(readyFd)
      } catch (err) {
        // `mount` gave up waiting; the server keeps serving, unmount still works.
        log.server('cannot report readiness: %s', describeError(err))
      }
    }
    let parsed: ParsedMount
    try {
      parsed = parseMountArgs(values, positionals)
    } catch (err) {
      report({ ok: false, error: describeError(err) })
      return EXIT_FAILURE
    }
    return serve(
      parsed,
      (files, notes) => report({ ok: true, files, notes }),
      (error) => report({ ok: false, error }),
    )
  },
}

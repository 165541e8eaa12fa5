/*
 * `qcow2fs unmount [--lazy] MOUNTPOINT`: asks the mount server over its control socket to
 * unmount, finish in-flight requests and close every image, then waits for the server process
 * to exit. Exit 0 only once all of that happened.
 *
 * Images mounted with `compress`: when finishing them takes more than a second, the progress
 * (clusters and bytes done, compression so far) is shown on the terminal (stderr, when it is
 * one), and a one-line summary per image is printed at the end (stdout).
 */
import { execFile } from 'node:child_process'
import { readFileSync } from 'node:fs'
import { lstat, realpath } from 'node:fs/promises'
import { basename, dirname, join, resolve } from 'node:path'
import { type CompressionReport, NoServerError, controlSocketPath, sendControlRequest } from '../../lib/fuse/control.js'
import { findMount, readMountTable } from '../../lib/fuse/mountinfo.js'
import { log } from '../../lib/log.js'
import { EXIT_OK, UsageError, parseCommandArgs, type Command } from '../command.js'

/** How long a (non-lazy) unmount may take before we give up waiting for the server. */
const UNMOUNT_TIMEOUT_MS = 120_000
const EXIT_WAIT_MS = 30_000

/**
 * The mountpoint's resolved path, found without looking inside the mount (a hung server must
 * not hang unmount): resolve the parent directory, keep the last component, unless the path
 * itself is a symbolic link.
 */
async function resolveMountpoint(mountpoint: string): Promise<string> {
  const absolute = resolve(mountpoint)
  try {
    if ((await lstat(absolute)).isSymbolicLink()) return await realpath(absolute)
    return join(await realpath(dirname(absolute)), basename(absolute))
  } catch {
    return absolute
  }
}

/** True while `pid` runs (a zombie waiting to be reaped counts as exited). */
function isRunning(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8')
    // "pid (comm) STATE ...": comm may contain spaces and parentheses; STATE follows the last ')'.
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z'
  } catch {
    return false
  }
}

async function waitForExit(pid: number, timeoutMs: number): Promise<boolean> {
  const deadline = Date.now() + timeoutMs
  while (isRunning(pid)) {
    if (Date.now() > deadline) return false
    await new Promise((done) => setTimeout(done, 20))
  }
  return true
}

const MiB = 1024 * 1024

function mebibytes(bytes: number): string {
  return `${(bytes / MiB).toFixed(1)} MiB`
}

/** "42.0%": stored bytes as a share of the guest bytes. */
function ratio(report: CompressionReport): string {
  return report.guestBytes > 0 ? `${((100 * report.storedBytes) / report.guestBytes).toFixed(1)}%` : '-'
}

/** One progress line for all images being finished. */
export function formatProgress(reports: readonly CompressionReport[]): string {
  return reports
    .map((r) => {
      const done = r.compressedClusters + r.uncompressedClusters + r.zeroClusters
      return `${r.image}: ${done} clusters (${mebibytes(r.guestBytes)}) done, ${r.pendingClusters} to go, stored in ${ratio(r)}`
    })
    .join('; ')
}

/** The summary line of one image. */
export function formatSummary(r: CompressionReport): string {
  return (
    `${r.image}: ${r.compressedClusters} clusters compressed, ${r.uncompressedClusters} stored uncompressed, ` +
    `${r.zeroClusters} zero; ${mebibytes(r.guestBytes)} stored in ${mebibytes(r.storedBytes)} (${ratio(r)})`
  )
}

function fusermountLazy(mountpoint: string): Promise<void> {
  return new Promise((done, fail) => {
    execFile('fusermount', ['-uz', mountpoint], (err, _stdout, stderr) => {
      if (err) fail(new Error(String(stderr).trim().split('\n')[0] || err.message))
      else done()
    })
  })
}

export const unmountCommand: Command = {
  name: 'unmount',
  summary: 'unmount a qcow2fs mount and wait until its images are closed',
  usage: [
    'Usage: qcow2fs unmount [--lazy] MOUNTPOINT',
    '',
    'Unmounts MOUNTPOINT, lets the server close every image and exit, and returns when it has.',
    'Refused while a file on the mount is open, unless --lazy.',
    '',
    'Options:',
    '  -l, --lazy  detach now; the server finishes when the last open file is closed',
  ].join('\n') + '\n',
  async run(argv: string[]): Promise<number> {
    const { values, positionals } = parseCommandArgs(argv, { lazy: { type: 'boolean', short: 'l' } })
    if (positionals.length !== 1) throw new UsageError('expected one MOUNTPOINT')
    const given = positionals[0]!
    const mountpoint = await resolveMountpoint(given)
    const lazy = values.lazy ?? false
    const socketPath = controlSocketPath(mountpoint)
    log.cli('unmount %s via %s', mountpoint, socketPath)
    let answer: Awaited<ReturnType<typeof sendControlRequest>>
    // Progress is for a person watching: only on a terminal, rewritten in place.
    let progressShown = false
    const onProgress = process.stderr.isTTY
      ? (reports: CompressionReport[]) => {
          const line = `qcow2fs: finishing ${formatProgress(reports)}`.slice(0, Math.max(20, (process.stderr.columns ?? 80) - 1))
          process.stderr.write(`\r\x1b[K${line}`)
          progressShown = true
        }
      : undefined
    try {
      answer = await sendControlRequest(socketPath, { op: 'unmount', lazy }, lazy ? Infinity : UNMOUNT_TIMEOUT_MS, onProgress)
    } catch (err) {
      if (!(err instanceof NoServerError)) throw err
      const entry = findMount(await readMountTable(), mountpoint)
      if (entry?.fsType !== 'fuse.qcow2fs') throw new Error(`'${given}' is not a qcow2fs mount`)
      // A qcow2fs mount whose server is gone (killed): nothing is open any more; detach it.
      await fusermountLazy(mountpoint)
      process.stderr.write(`qcow2fs: the server of '${given}' was not running; removed its dead mount\n`)
      return EXIT_OK
    }
    const { reply, closed } = answer
    if (progressShown) process.stderr.write('\r\x1b[K')
    if (!reply.ok) throw new Error(reply.error)
    for (const report of reply.compression ?? []) process.stdout.write(`qcow2fs: ${formatSummary(report)}\n`)
    await Promise.race([closed, new Promise((done) => setTimeout(done, EXIT_WAIT_MS).unref())])
    if (!(await waitForExit(reply.pid, EXIT_WAIT_MS))) {
      throw new Error(`'${given}' is unmounted and its images are closed, but the server (pid ${reply.pid}) has not exited`)
    }
    return EXIT_OK
  },
}

/*
 * QEMU tools for interop tests: locating qemu-img / qemu-io, running them, temp directories.
 *
 * requireQemu(suite) is how a test file asks for the tools:
 *   - found: returns their paths;
 *   - missing and process.env.CI === 'true': throws, so the test file fails (CI must have them);
 *   - missing elsewhere: prints why on stderr and returns undefined; the caller then skips its
 *     suite (describe.skipIf(!qemu)), so the skip is visible in the output.
 * QEMU_IMG and QEMU_IO in the environment override the PATH lookup.
 */
import { execFile, execFileSync } from 'node:child_process'
import { accessSync, constants as fsConstants } from 'node:fs'
import { mkdtemp, rm } from 'node:fs/promises'
import * as os from 'node:os'
import * as path from 'node:path'

export interface QemuTools {
  qemuImg: string
  qemuIo: string
  /** First line of `qemu-img --version`, e.g. "qemu-img version 7.2.22 (...)". */
  version: string
}

export function isCi(): boolean {
  return process.env.CI === 'true'
}

/** Absolute path of an executable found on PATH, or undefined. */
export function findExecutable(name: string): string | undefined {
  const dirs = (process.env.PATH ?? '').split(path.delimiter).filter((d) => d.length > 0)
  for (const dir of dirs) {
    const candidate = path.join(dir, name)
    try {
      accessSync(candidate, fsConstants.X_OK)
      return candidate
    } catch {
      // not in this directory
    }
  }
  return undefined
}

function locate(envName: string, name: string): string | undefined {
  const override = process.env[envName]
  if (override !== undefined && override !== '') return override
  return findExecutable(name)
}

let cached: { tools?: QemuTools; problem?: string } | undefined

/** Looks the tools up once per process; `problem` says what is missing. */
export function findQemu(): { tools?: QemuTools; problem?: string } {
  if (cached) return cached
  const qemuImg = locate('QEMU_IMG', 'qemu-img')
  const qemuIo = locate('QEMU_IO', 'qemu-io')
  const missing = [qemuImg ? undefined : 'qemu-img', qemuIo ? undefined : 'qemu-io'].filter(
    (m): m is string => m !== undefined,
  )
  if (!qemuImg || !qemuIo) {
    cached = { problem: `${missing.join(' and ')} not found on PATH (Debian package qemu-utils)` }
    return cached
  }
  let version = 'unknown version'
  try {
    // Synchronous on purpose: requireQemu runs while the test file is being collected.
    version = execFileSync(qemuImg, ['--version'], { encoding: 'utf8' }).split('\n')[0] ?? version
  } catch (err) {
    cached = { problem: `${qemuImg} --version failed: ${err instanceof Error ? err.message : String(err)}` }
    return cached
  }
  cached = { tools: { qemuImg, qemuIo, version } }
  return cached
}

/**
 * The tools, or undefined after printing why `suite` is skipped. Throws when they are missing
 * and CI=true: a CI run must not pass by skipping interop tests.
 */
export function requireQemu(suite: string): QemuTools | undefined {
  const { tools, problem } = findQemu()
  if (tools) return tools
  if (isCi()) {
    throw new Error(`${suite}: ${problem}; CI=true, so this is a failure, not a skip`)
  }
  process.stderr.write(`[skip] ${suite}: ${problem}\n`)
  return undefined
}

export interface RunResult {
  stdout: string
  stderr: string
}

export interface RunOptions {
  cwd?: string
  timeoutMs?: number
  env?: NodeJS.ProcessEnv
}

/** Runs a program; resolves with its output, rejects with a one-paragraph error naming it. */
export function run(file: string, args: readonly string[], options: RunOptions = {}): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    execFile(
      file,
      [...args],
      {
        cwd: options.cwd,
        env: options.env ?? process.env,
        timeout: options.timeoutMs ?? 120_000,
        maxBuffer: 64 * 1024 * 1024,
        encoding: 'utf8',
      },
      (err, stdout, stderr) => {
        if (err) {
          const how = err.killed ? `killed (${err.signal ?? 'timeout'})` : `exit code ${String(err.code)}`
          const detail = stderr.trim() || stdout.trim()
          reject(new Error(`${path.basename(file)} ${args.join(' ')}: ${how}${detail ? `\n${detail}` : ''}`))
          return
        }
        resolve({ stdout, stderr })
      },
    )
  })
}

/** Runs qemu-img with ARGS; resolves with its stdout. */
export async function qemuImg(tools: QemuTools, args: readonly string[], options: RunOptions = {}): Promise<string> {
  return (await run(tools.qemuImg, args, options)).stdout
}

/** Runs each qemu-io command on a qcow2 image in one qemu-io process (exit 1 if one fails). */
export async function qemuIo(
  tools: QemuTools,
  image: string,
  commands: readonly string[],
  options: RunOptions = {},
): Promise<string> {
  const args = ['-f', 'qcow2']
  for (const c of commands) args.push('-c', c)
  args.push(image)
  return (await run(tools.qemuIo, args, options)).stdout
}

/** `qemu-img info --output=json` of an image, parsed. */
export async function qemuInfo(tools: QemuTools, image: string, options: RunOptions = {}): Promise<Record<string, unknown>> {
  return JSON.parse(await qemuImg(tools, ['info', '--output=json', image], options)) as Record<string, unknown>
}

/**
 * `qemu-img convert -O raw` of IMAGE (or of one of its internal snapshots) into RAWPATH, the
 * reference for every comparison.
 */
export async function convertToRaw(
  tools: QemuTools,
  image: string,
  rawPath: string,
  options: RunOptions & { snapshot?: string } = {},
): Promise<void> {
  const args = ['convert']
  if (options.snapshot !== undefined) args.push('-l', `snapshot.name=${options.snapshot}`)
  args.push('-O', 'raw', image, rawPath)
  await qemuImg(tools, args, options)
}

/** A fresh directory under os.tmpdir(), named after LABEL. */
export function makeTempDir(label: string): Promise<string> {
  return mkdtemp(path.join(os.tmpdir(), `qcow2fs-${label.replace(/[^A-Za-z0-9_-]/g, '_')}-`))
}

/** Removes a directory made by makeTempDir, with everything in it. */
export async function removeTempDir(dir: string): Promise<void> {
  if (!path.resolve(dir).startsWith(path.resolve(os.tmpdir()) + path.sep)) {
    throw new Error(`refusing to remove ${dir}: not under the temp directory`)
  }
  await rm(dir, { recursive: true, force: true })
}

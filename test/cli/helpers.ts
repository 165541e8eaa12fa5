/*
 * Helpers of the CLI tests: run the compiled CLI (building it when it is missing or older than
 * the sources), run a program synchronously, make and remove temp dirs, hash files. qemu-img
 * is located by test/helpers/qemu.ts (requireQemu). The set-up of a suite working on images:
 *
 *   qemuToolsFor(suite)           qemu-img and qemu-io, or `available: false` (skip the suite)
 *   useSuiteDir(prefix, setDir)   inside the suite's describe(): before its tests the CLI is
 *                                 built and a temp dir made (given to setDir), after them the
 *                                 dir is removed
 */
import { spawnSync } from 'node:child_process'
import { createHash } from 'node:crypto'
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { afterAll, beforeAll } from 'vitest'
import { requireQemu } from '../helpers/qemu.js'

export const REPO_ROOT = join(dirname(fileURLToPath(import.meta.url)), '..', '..')
export const CLI_PATH = join(REPO_ROOT, 'dist', 'cli', 'main.js')

function newestSourceMtimeMs(dir: string): number {
  let newest = 0
  for (const entry of readdirSync(dir, { withFileTypes: true })) {
    const path = join(dir, entry.name)
    if (entry.isDirectory()) newest = Math.max(newest, newestSourceMtimeMs(path))
    else if (entry.name.endsWith('.ts')) newest = Math.max(newest, statSync(path).mtimeMs)
  }
  return newest
}

/** Compiles the project (tsc) when dist/cli/main.js is missing or older than a source file. */
export function ensureBuilt(): void {
  const sourcesMtimeMs = Math.max(
    newestSourceMtimeMs(join(REPO_ROOT, 'cli')),
    newestSourceMtimeMs(join(REPO_ROOT, 'lib')),
  )
  if (existsSync(CLI_PATH) && statSync(CLI_PATH).mtimeMs >= sourcesMtimeMs) return
  const tsc = join(REPO_ROOT, 'node_modules', 'typescript', 'bin', 'tsc')
  const result = spawnSync(process.execPath, [tsc, '-p', join(REPO_ROOT, 'tsconfig.json')], {
    cwd: REPO_ROOT,
    encoding: 'utf8',
    timeout: 120_000,
  })
  if (result.status !== 0) {
    throw new Error(`tsc failed (status ${result.status}):\n${result.stdout}${result.stderr}`)
  }
}

export interface CliResult {
  /** Exit status; null when the process was killed (e.g. by the timeout). */
  status: number | null
  signal: NodeJS.Signals | null
  stdout: string
  stderr: string
  elapsedMs: number
}

/** Runs `node dist/cli/main.js ARGS...` and collects its output. */
export function runCli(args: string[], options: { cwd?: string; timeoutMs?: number } = {}): CliResult {
  const startedMs = Date.now()
  const env = { ...process.env }
  delete env.DEBUG // debug output on stderr would break the one-line checks
  const result = spawnSync(process.execPath, [CLI_PATH, ...args], {
    cwd: options.cwd ?? REPO_ROOT,
    encoding: 'utf8',
    timeout: options.timeoutMs ?? 30_000,
    env,
  })
  return {
    status: result.status,
    signal: result.signal,
    stdout: result.stdout,
    stderr: result.stderr,
    elapsedMs: Date.now() - startedMs,
  }
}

/** Lines of stderr without the final newline's empty tail. */
export function stderrLines(result: CliResult): string[] {
  return result.stderr.split('\n').filter((line, i, all) => !(i === all.length - 1 && line === ''))
}

/** Runs a program, throws with its stderr when it fails; returns stdout. */
export function run(program: string, args: string[], cwd?: string): string {
  const result = spawnSync(program, args, { cwd, encoding: 'utf8', timeout: 60_000 })
  if (result.error) throw result.error
  if (result.status !== 0) {
    throw new Error(`${program} ${args.join(' ')} failed (${result.status}): ${result.stderr}`)
  }
  return result.stdout
}

export function makeTempDir(prefix: string): string {
  return mkdtempSync(join(tmpdir(), `qcow2fs-${prefix}-`))
}

export function removeTempDir(dir: string): void {
  rmSync(dir, { recursive: true, force: true })
}

export function sha256File(path: string): string {
  return createHash('sha256').update(readFileSync(path)).digest('hex')
}

/** qemu-img and qemu-io for `suite` (requireQemu); when missing, `available` is false and both are undefined. */
export function qemuToolsFor(suite: string): { available: boolean; qemuImg: string | undefined; qemuIo: string | undefined } {
  const tools = requireQemu(suite)
  return { available: tools !== undefined, qemuImg: tools?.qemuImg, qemuIo: tools?.qemuIo }
}

/**
 * Hooks of a suite that works in a temp dir; call inside its describe(), before its own hooks.
 * Before the suite's tests the CLI is built (when stale) and a temp dir named after `prefix`
 * is made and passed to `setDir`; after them the dir is removed.
 */
export function useSuiteDir(prefix: string, setDir: (dir: string) => void): void {
  let made = ''
  beforeAll(() => {
    ensureBuilt()
    made = makeTempDir(prefix)
    setDir(made)
  })
  afterAll(() => {
    if (made) removeTempDir(made)
  })
}

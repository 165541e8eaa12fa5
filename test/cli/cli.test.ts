/*
 * The dispatcher: --help, --version, per-command help, unknown command/option, exit codes,
 * one-line errors. Runs the compiled CLI (dist/cli/main.js), built on demand.
 */
import { spawnSync } from 'node:child_process'
import { cpSync, readFileSync, symlinkSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { beforeAll, describe, expect, it } from 'vitest'
import {
  REPO_ROOT,
  ensureBuilt,
  makeTempDir,
  removeTempDir,
  runCli,
  stderrLines,
  type CliResult,
} from './helpers.js'

const LISTED_COMMANDS = ['mount', 'unmount', 'info', 'create', 'help']

beforeAll(() => {
  ensureBuilt()
})

function expectUsageError(result: CliResult, pattern: RegExp): void {
  expect(result.status).toBe(2)
  expect(result.stdout).toBe('')
  const lines = stderrLines(result)
  expect(lines).toHaveLength(1)
  expect(lines[0]).toMatch(/^qcow2fs: /)
  expect(lines[0]).toMatch(pattern)
}

describe('qcow2fs --help', () => {
  it('lists every command with its summary and exits 0', () => {
    for (const flag of ['--help', '-h']) {
      const result = runCli([flag])
      expect(result.status).toBe(0)
      expect(result.stderr).toBe('')
      expect(result.stdout).toMatch(/^Usage: qcow2fs COMMAND/)
      for (const name of LISTED_COMMANDS) expect(result.stdout).toMatch(new RegExp(`^  ${name} +\\S`, 'm'))
    }
  })

  it('does not list the internal server command', () => {
    expect(runCli(['--help']).stdout).not.toMatch(/__serve/)
  })

  it('prints a command usage for CMD --help, before or after other arguments', () => {
    const plain = runCli(['info', '--help'])
    expect(plain.status).toBe(0)
    expect(plain.stdout).toMatch(/^Usage: qcow2fs info \[--json\] \[-U\] IMAGE/)
    const after = runCli(['info', 'some.qcow2', '-h'])
    expect(after.status).toBe(0)
    expect(after.stdout).toBe(plain.stdout)
    const viaHelp = runCli(['help', 'info'])
    expect(viaHelp.status).toBe(0)
    expect(viaHelp.stdout).toBe(plain.stdout)
  })

  it('every listed command has a usage starting with its synopsis', () => {
    for (const name of LISTED_COMMANDS) {
      const result = runCli([name, '--help'])
      expect(result.status).toBe(0)
      expect(result.stdout).toMatch(new RegExp(`^Usage: qcow2fs ${name}\\b`))
    }
  })

  it('help without a command prints the main help', () => {
    const result = runCli(['help'])
    expect(result.status).toBe(0)
    expect(result.stdout).toBe(runCli(['--help']).stdout)
  })
})

describe('qcow2fs --version', () => {
  it("prints package.json's version", () => {
    const pkg = JSON.parse(readFileSync(join(REPO_ROOT, 'package.json'), 'utf8')) as { version: string }
    for (const flag of ['--version', '-V']) {
      const result = runCli([flag])
      expect(result.status).toBe(0)
      expect(result.stdout).toBe(`${pkg.version}\n`)
    }
  })

  it('reads package.json relative to the compiled file, not the working directory', () => {
    const result = runCli(['--version'], { cwd: '/' })
    expect(result.status).toBe(0)
    expect(result.stdout).toMatch(/^\d+\.\d+\.\d+/)
  })
})

describe('usage errors exit 2 with one line', () => {
  it('no command', () => {
    expectUsageError(runCli([]), /missing command/)
  })

  it('unknown command', () => {
    expectUsageError(runCli(['frobnicate']), /unknown command 'frobnicate'/)
  })

  it('unknown top-level option', () => {
    expectUsageError(runCli(['--frob']), /unknown option '--frob'/)
  })

  it('unknown command option, before or after the arguments', () => {
    expectUsageError(runCli(['info', '--frob', 'x.qcow2']), /unknown option '--frob'.*info --help/)
    expectUsageError(runCli(['info', 'x.qcow2', '-z']), /unknown option '-z'/)
  })

  it('missing or extra arguments', () => {
    expectUsageError(runCli(['info']), /missing IMAGE/)
    expectUsageError(runCli(['info', 'a.qcow2', 'b.qcow2']), /one IMAGE/)
    expectUsageError(runCli(['info', '--json=yes', 'a.qcow2']), /--json/)
  })

  it('a bad mount option or a missing mountpoint', () => {
    expectUsageError(runCli(['mount', '-o', 'frob', 'a.qcow2', 'mnt']), /unknown mount option 'frob'/)
    expectUsageError(runCli(['mount', 'a.qcow2']), /MOUNTPOINT/)
    expectUsageError(runCli(['unmount']), /MOUNTPOINT/)
  })

  it('help for an unknown command', () => {
    expectUsageError(runCli(['help', 'nope']), /unknown command 'nope'/)
  })
})

describe('failures exit 1 with one line', () => {
  it('a missing image', () => {
    const result = runCli(['info', 'no-such-image.qcow2'])
    expect(result.status).toBe(1)
    const lines = stderrLines(result)
    expect(lines).toHaveLength(1)
    expect(lines[0]).toMatch(/^qcow2fs: /)
    expect(lines[0]).toMatch(/no-such-image\.qcow2/)
    expect(result.stderr).not.toMatch(/^\s+at /m)
  })

  it('a build with a broken module: one line, no stack trace, exit 1', () => {
    const copy = makeTempDir('broken-build')
    try {
      cpSync(join(REPO_ROOT, 'dist'), join(copy, 'dist'), { recursive: true })
      cpSync(join(REPO_ROOT, 'package.json'), join(copy, 'package.json'))
      symlinkSync(join(REPO_ROOT, 'node_modules'), join(copy, 'node_modules'))
      writeFileSync(join(copy, 'dist', 'lib', 'image.js'), 'export const half = (\n')
      const result = spawnSync(process.execPath, [join(copy, 'dist', 'cli', 'main.js'), 'info', 'x.qcow2'], {
        encoding: 'utf8',
        timeout: 30_000,
      })
      expect(result.status).toBe(1)
      expect(result.stdout).toBe('')
      expect(result.stderr).toMatch(/^qcow2fs: cannot load the qcow2fs modules .*\n$/)
      expect(result.stderr.split('\n')).toHaveLength(2)
    } finally {
      removeTempDir(copy)
    }
  })

  it('an argument after -- is a positional even if it looks like an option', () => {
    const result = runCli(['info', '--', '--help'])
    expect(result.status).toBe(1)
    expect(stderrLines(result)).toHaveLength(1)
  })
})

#!/usr/bin/env node
/*
 * qcow2fs command line: `qcow2fs COMMAND [OPTIONS] [ARGUMENTS]`. Dispatches to one Command per
 * file in cli/commands/. Every error reaches the user as one line `qcow2fs: <reason>` on
 * stderr, never a stack trace (DEBUG=qcow2fs:cli logs the stack), with the exit codes of
 * cli/command.ts: 0 success, 1 failure, 2 usage error.
 *
 * The process-level handlers are installed before any project module is loaded, and the
 * modules are loaded with import(): a module that cannot be loaded (a broken or half-written
 * install) is then one line too, not Node's report with the source line and a stack.
 */
import { readFileSync } from 'node:fs'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import type { Command } from './command.js'

const PROGRAM = 'qcow2fs'
/** EXIT_FAILURE of cli/command.ts, which may itself be the module that failed to load. */
const EXIT_LOAD_FAILURE = 1

/** One line for any error; lib/errors.ts's describeError once it is loaded. */
let describe = (err: unknown): string => (err instanceof Error ? err.message : String(err))
/** The qcow2fs:cli debug namespace once lib/log.ts is loaded. */
let logCli = (_format: string, ..._args: unknown[]): void => {}

/** Collapses any text to one line so a message can never spill over several. */
function oneLine(text: string): string {
  return text.replace(/\s*\n\s*/g, ' ').trim()
}

function printError(message: string): void {
  process.stderr.write(`${PROGRAM}: ${oneLine(message)}\n`)
}

/** Last resort: an error nobody awaited still ends as one line and exit code 1. */
function fatal(err: unknown): never {
  logCli('fatal: %O', err)
  printError(describe(err))
  process.exit(EXIT_LOAD_FAILURE)
}

process.on('uncaughtException', fatal)
process.on('unhandledRejection', fatal)
// A reader that stops early (`qcow2fs info x | head -1`) is not an error of ours.
process.stdout.on('error', (err: NodeJS.ErrnoException) => {
  if (err.code === 'EPIPE') process.exit(0)
  fatal(err)
})

/** The command modules and the table built from them. */
async function loadCommands() {
  const [errors, logging, command, help, info, mount, unmount, create, check, map] = await Promise.all([
    import('../lib/errors.js'),
    import('../lib/log.js'),
    import('./command.js'),
    import('./commands/help.js'),
    import('./commands/info.js'),
    import('./commands/mount.js'),
    import('./commands/unmount.js'),
    import('./commands/create.js'),
    import('./commands/check.js'),
    import('./commands/map.js'),
  ])
  describe = errors.describeError
  logCli = logging.log.cli
  /** Commands shown by `qcow2fs --help`, in this order. */
  const listed: Command[] = [
    mount.mountCommand,
    unmount.unmountCommand,
    info.infoCommand,
    create.createCommand,
    check.checkCommand,
    map.mapCommand,
  ]
  const helpCommand = help.makeHelpCommand(listed)
  /** Internal commands: dispatched, never listed (`__serve` is the background mount server). */
  const hidden: Command[] = [mount.serveCommand]
  return {
    command,
    formatMainHelp: help.formatMainHelp,
    shown: [...listed, helpCommand],
    all: [...listed, helpCommand, ...hidden],
  }
}

type Commands = Awaited<ReturnType<typeof loadCommands>>

/** node:util parseArgs explains at length how to pass '-x' as a positional; keep the fact. */
function usageMessage(err: Error): string {
  const unknown = /^Unknown option '([^']*)'/.exec(err.message)
  if (unknown) return `unknown option '${unknown[1]}'`
  return err.message
}

/** package.json's version, found upward from this file (dist/cli/main.js or cli/main.ts). */
function readVersion(): string {
  let dir = dirname(fileURLToPath(import.meta.url))
  for (let depth = 0; depth < 4; depth++) {
    try {
      const pkg = JSON.parse(readFileSync(join(dir, 'package.json'), 'utf8')) as {
        name?: unknown
        version?: unknown
      }
      if (pkg.name === PROGRAM && typeof pkg.version === 'string') return pkg.version
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err
    }
    dir = dirname(dir)
  }
  throw new Error(`cannot find the ${PROGRAM} package.json above ${dirname(fileURLToPath(import.meta.url))}`)
}

/** True when the arguments (before a `--` separator) ask for help. */
function wantsHelp(args: readonly string[]): boolean {
  for (const arg of args) {
    if (arg === '--') return false
    if (arg === '--help' || arg === '-h') return true
  }
  return false
}

async function dispatch(commands: Commands, argv: string[]): Promise<number> {
  const { EXIT_FAILURE, EXIT_OK, EXIT_USAGE, UsageError } = commands.command
  logCli('argv %o', argv)
  const first = argv[0]
  if (first === undefined) {
    printError(`missing command (see '${PROGRAM} --help')`)
    return EXIT_USAGE
  }
  if (first === '--help' || first === '-h') {
    process.stdout.write(commands.formatMainHelp(commands.shown))
    return EXIT_OK
  }
  if (first === '--version' || first === '-V') {
    process.stdout.write(`${readVersion()}\n`)
    return EXIT_OK
  }
  if (first.startsWith('-')) {
    printError(`unknown option '${first}' (see '${PROGRAM} --help')`)
    return EXIT_USAGE
  }
  const command = commands.all.find((c) => c.name === first)
  if (!command) {
    printError(`unknown command '${first}' (see '${PROGRAM} --help')`)
    return EXIT_USAGE
  }
  const rest = argv.slice(1)
  if (wantsHelp(rest)) {
    process.stdout.write(command.usage)
    return EXIT_OK
  }
  try {
    return await command.run(rest)
  } catch (err) {
    logCli('%s failed: %O', command.name, err)
    if (err instanceof UsageError) {
      printError(`${usageMessage(err)} (see '${PROGRAM} ${command.name} --help')`)
      return command.usageExitCode ?? EXIT_USAGE
    }
    printError(describe(err))
    return EXIT_FAILURE
  }
}

let commands: Commands
try {
  commands = await loadCommands()
} catch (err) {
  printError(`cannot load the ${PROGRAM} modules (a broken build or install?): ${describe(err)}`)
  process.exit(EXIT_LOAD_FAILURE)
}
const exitCode = await dispatch(commands, process.argv.slice(2))
// Let buffered output reach its pipe before exiting; a command may leave handles behind (a
// detached server's pipe) that must not keep this process alive.
await new Promise<void>((resolve) => process.stdout.write('', () => resolve()))
await new Promise<void>((resolve) => process.stderr.write('', () => resolve()))
process.exit(exitCode)

#!/usr/bin/env node
/*
 * qcow2fs command line: `qcow2fs COMMAND [OPTIONS] [ARGUMENTS]`. Dispatches to one Command per
 * file in cli/commands/. Every error reaches the user as one line `qcow2fs: <reason>` on
 * stderr, never a stack trace (DEBUG=qcow2fs:cli logs the stack), with the exit codes of
 * cli/command.ts: 0 success, 1 failure, 2 usage error.
 */
import { readFileSync } from 'node:fs'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { describeError } from '../lib/errors.js'
import { log } from '../lib/log.js'
import { EXIT_FAILURE, EXIT_OK, EXIT_USAGE, UsageError, type Command } from './command.js'
import { createCommand } from './commands/create.js'
import { PROGRAM, formatMainHelp, makeHelpCommand } from './commands/help.js'
import { infoCommand } from './commands/info.js'
import { mountCommand, serveCommand } from './commands/mount.js'
import { unmountCommand } from './commands/unmount.js'

/** Commands shown by `qcow2fs --help`, in this order. */
const listedCommands: Command[] = [mountCommand, unmountCommand, infoCommand, createCommand]
const helpCommand = makeHelpCommand(listedCommands)
/** Internal commands: dispatched, never listed (`__serve` is the background mount server). */
const hiddenCommands: Command[] = [serveCommand]
const allCommands: Command[] = [...listedCommands, helpCommand, ...hiddenCommands]

/** Collapses any text to one line so a message can never spill over several. */
function oneLine(text: string): string {
  return text.replace(/\s*\n\s*/g, ' ').trim()
}

function printError(message: string): void {
  process.stderr.write(`${PROGRAM}: ${oneLine(message)}\n`)
}

/** node:util parseArgs explains at length how to pass '-x' as a positional; keep the fact. */
function usageMessage(err: UsageError): string {
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

async function dispatch(argv: string[]): Promise<number> {
  log.cli('argv %o', argv)
  const first = argv[0]
  if (first === undefined) {
    printError(`missing command (see '${PROGRAM} --help')`)
    return EXIT_USAGE
  }
  if (first === '--help' || first === '-h') {
    process.stdout.write(formatMainHelp([...listedCommands, helpCommand]))
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
  const command = allCommands.find((c) => c.name === first)
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
    log.cli('%s failed: %O', command.name, err)
    if (err instanceof UsageError) {
      printError(`${usageMessage(err)} (see '${PROGRAM} ${command.name} --help')`)
      return EXIT_USAGE
    }
    printError(describeError(err))
    return EXIT_FAILURE
  }
}

/** Last resort: an error nobody awaited still ends as one line and exit code 1. */
function fatal(err: unknown): never {
  log.cli('fatal: %O', err)
  printError(describeError(err))
  process.exit(EXIT_FAILURE)
}

process.on('uncaughtException', fatal)
process.on('unhandledRejection', fatal)
// A reader that stops early (`qcow2fs info x | head -1`) is not an error of ours.
process.stdout.on('error', (err: NodeJS.ErrnoException) => {
  if (err.code === 'EPIPE') process.exit(EXIT_OK)
  fatal(err)
})

const exitCode = await dispatch(process.argv.slice(2))
// Let buffered output reach its pipe before exiting; a command may leave handles behind (a
// detached server's pipe) that must not keep this process alive.
await new Promise<void>((resolve) => process.stdout.write('', () => resolve()))
await new Promise<void>((resolve) => process.stderr.write('', () => resolve()))
process.exit(exitCode)

/*
 * The shape of a CLI command (one file per command in cli/commands/) and the exit codes.
 * Arguments are parsed with node:util parseArgs, so options may come before or after the
 * positional arguments.
 */
import { parseArgs, type ParseArgsConfig } from 'node:util'

export const EXIT_OK = 0
/** A failure: image cannot be opened, mount failed, I/O error. */
export const EXIT_FAILURE = 1
/** Bad usage: unknown option, missing argument. */
export const EXIT_USAGE = 2

export interface Command {
  name: string
  /** One line for the command list in `qcow2fs --help`. */
  summary: string
  /** Full help text printed by `qcow2fs NAME --help`. */
  usage: string
  /**
   * Exit code of a usage error, when EXIT_USAGE means something else for this command (check:
   * 2 means corruptions found, as in qemu-img check).
   */
  usageExitCode?: number
  /** Runs the command; resolves to the process exit code. Prints its own output. */
  run(argv: string[]): Promise<number>
}

/** A usage error: printed as one line plus a hint to --help, exit code EXIT_USAGE. */
export class UsageError extends Error {
  override name = 'UsageError'
}

export type OptionSpec = NonNullable<ParseArgsConfig['options']>

/** parseArgs with positionals allowed anywhere; turns its errors into UsageError. */
export function parseCommandArgs<O extends OptionSpec>(argv: string[], options: O) {
  try {
    return parseArgs({ args: argv, options, allowPositionals: true, strict: true })
  } catch (err) {
    throw new UsageError(err instanceof Error ? err.message.split('\n')[0]! : String(err))
  }
}

/** The one IMAGE argument of info, check and map; UsageError for none or more than one. */
export function singleImage(positionals: readonly string[]): string {
  if (positionals.length === 0) throw new UsageError('missing IMAGE')
  if (positionals.length > 1) throw new UsageError(`expected one IMAGE, got ${positionals.length}`)
  return positionals[0]!
}

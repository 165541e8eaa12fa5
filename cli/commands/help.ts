/*
 * `qcow2fs help [COMMAND]` and the text of `qcow2fs --help`. The dispatcher (cli/main.ts) owns
 * the command table and hands it in, so this file imports no other command.
 */
import { EXIT_OK, UsageError, parseCommandArgs, type Command } from '../command.js'

export const PROGRAM = 'qcow2fs'

/** The text of `qcow2fs --help`: synopsis, the listed commands with their summaries, options. */
export function formatMainHelp(commands: readonly Command[]): string {
  const nameWidth = Math.max(...commands.map((c) => c.name.length), 'COMMAND'.length) + 2
  const lines = [
    `Usage: ${PROGRAM} COMMAND [OPTIONS] [ARGUMENTS]`,
    `       ${PROGRAM} --help | --version`,
    '',
    'Mount qcow2 disk images as plain raw files through FUSE.',
    '',
    'Commands:',
    ...commands.map((c) => `  ${c.name.padEnd(nameWidth)}${c.summary}`),
    '',
    'Options:',
    `  -h, --help     show this help; '${PROGRAM} COMMAND --help' shows a command's options`,
    '  -V, --version  print the version',
    '',
    'Exit codes: 0 success, 1 failure, 2 usage error.',
    `Debug logs: DEBUG=${PROGRAM}:* ${PROGRAM} ...`,
  ]
  return lines.join('\n') + '\n'
}

/** Builds the `help` command over the dispatcher's table of listed commands. */
export function makeHelpCommand(listed: readonly Command[]): Command {
  const help: Command = {
    name: 'help',
    summary: "show the list of commands, or one command's usage",
    usage: [
      `Usage: ${PROGRAM} help [COMMAND]`,
      '',
      `Without COMMAND, prints the same text as '${PROGRAM} --help'. With COMMAND, prints`,
      `its usage, the same text as '${PROGRAM} COMMAND --help'.`,
    ].join('\n') + '\n',
    async run(argv: string[]): Promise<number> {
      const { positionals } = parseCommandArgs(argv, {})
      if (positionals.length > 1) {
        throw new UsageError(`expected at most one COMMAND, got ${positionals.length}`)
      }
      const wanted = positionals[0]
      if (wanted === undefined) {
        process.stdout.write(formatMainHelp([...listed, help]))
        return EXIT_OK
      }
      const found = [...listed, help].find((c) => c.name === wanted)
      if (!found) throw new UsageError(`unknown command '${wanted}'`)
      process.stdout.write(found.usage)
      return EXIT_OK
    },
  }
  return help
}

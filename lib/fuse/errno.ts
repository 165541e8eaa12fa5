/*
 * The one mapping from an error to the negative errno a FUSE reply carries:
 *  - a Qcow2Error by its `errno` name (ENOTSUP is answered as EOPNOTSUPP, the same number on
 *    Linux and the name fuse-native knows);
 *  - a Node system error by its `code` ('ENOENT', 'EIO', ...);
 *  - anything else, and any name fuse-native has no constant for, as EIO.
 */
import { isQcow2Error } from '../errors.js'
import { log } from '../log.js'
import { fuseErrnoConstant } from './native.js'

const EIO = fuseErrnoConstant('EIO') ?? -5

function byName(name: string): number | undefined {
  return fuseErrnoConstant(name === 'ENOTSUP' ? 'EOPNOTSUPP' : name)
}

/** Negative errno for a FUSE reply. */
export function toFuseErrno(err: unknown): number {
  if (isQcow2Error(err)) return byName(err.errno) ?? EIO
  if (err instanceof Error) {
    const code = (err as NodeJS.ErrnoException).code
    if (typeof code === 'string' && /^E[A-Z0-9]+$/.test(code)) {
      const errno = byName(code)
      if (errno !== undefined) return errno
    }
  }
  log.fuse('answering EIO for unexpected error: %O', err)
  return EIO
}

/** The negative errno constant for a name; throws for a name fuse-native lacks. */
export function errnoOf(name: string): number {
  const errno = byName(name)
  if (errno === undefined) throw new Error(`no errno constant named ${name}`)
  return errno
}

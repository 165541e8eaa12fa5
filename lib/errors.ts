/*
 * Error classes of the engine. Each has a stable `code` (for programs and tests) and a POSIX
 * `errno` name (for the FUSE adapter, which maps it to a negative errno in one place:
 * lib/fuse/errno.ts). Messages are one line, name the problem, and give offsets in hex.
 */

export type ErrnoName =
  | 'EIO'
  | 'ENOTSUP'
  | 'EINVAL'
  | 'EROFS'
  | 'ENOSPC'
  | 'EFBIG'
  | 'EBADF'
  | 'ENOENT'
  | 'EPERM'
  | 'EBUSY'

export type ErrorCode =
  | 'CORRUPT_IMAGE'
  | 'UNSUPPORTED_FEATURE'
  | 'INVALID_REQUEST'
  | 'READ_ONLY'
  | 'NO_SPACE'
  | 'CLOSED'
  | 'NOT_FOUND'
  | 'BUSY'

export class Qcow2Error extends Error {
  readonly code: ErrorCode
  readonly errno: ErrnoName

  constructor(code: ErrorCode, errno: ErrnoName, message: string, options?: { cause?: unknown }) {
    super(message, options)
    this.name = new.target.name
    this.code = code
    this.errno = errno
    Error.captureStackTrace?.(this, new.target)
  }

  toJSON(): { name: string; code: ErrorCode; errno: ErrnoName; message: string } {
    return { name: this.name, code: this.code, errno: this.errno, message: this.message }
  }
}

/** Metadata or data that breaks the spec: bad header, entries past EOF, bad compressed data. */
export class CorruptImageError extends Qcow2Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super('CORRUPT_IMAGE', 'EIO', message, options)
  }
}

/** A valid image that uses something we do not implement or refuse on purpose (encryption...). */
export class UnsupportedFeatureError extends Qcow2Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super('UNSUPPORTED_FEATURE', 'ENOTSUP', message, options)
  }
}

/** A request or option that is wrong before any I/O: bad range, bad option value. */
export class InvalidRequestError extends Qcow2Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super('INVALID_REQUEST', 'EINVAL', message, options)
  }
}

/** A write to an image opened read-only (or turned read-only because it was found corrupt). */
export class ReadOnlyError extends Qcow2Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super('READ_ONLY', 'EROFS', message, options)
  }
}

/** Out of host space, or a table would grow past its limit. */
export class NoSpaceError extends Qcow2Error {
  constructor(message: string, errno: 'ENOSPC' | 'EFBIG' = 'ENOSPC', options?: { cause?: unknown }) {
    super('NO_SPACE', errno, message, options)
  }
}

/** Use of an image after close. */
export class ClosedError extends Qcow2Error {
  constructor(message = 'image is closed') {
    super('CLOSED', 'EBADF', message)
  }
}

/** A file the user named (image, backing file, snapshot) does not exist. */
export class NotFoundError extends Qcow2Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super('NOT_FOUND', 'ENOENT', message, options)
  }
}

/** The image is in use by someone else (another mount, a lock). */
export class BusyError extends Qcow2Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super('BUSY', 'EBUSY', message, options)
  }
}

export function isQcow2Error(err: unknown): err is Qcow2Error {
  return err instanceof Qcow2Error
}

/** The one-line text a user sees for any error: our own message, or a Node system error's. */
export function describeError(err: unknown): string {
  if (err instanceof Qcow2Error) return err.message
  if (err instanceof Error) {
    const sys = err as NodeJS.ErrnoException
    if (sys.code && sys.syscall) {
      const where = sys.path ? ` '${sys.path}'` : ''
      return `${sys.code}: ${sys.syscall}${where} failed`.replace(/\s+/g, ' ')
    }
    return err.message.split('\n')[0] ?? String(err)
  }
  return String(err)
}

/*
 * Image locks, the way QEMU takes them, so that QEMU and qcow2fs (and two qcow2fs mounts) see
 * each other's opens and refuse what would corrupt an image.
 *
 * QEMU's scheme (block/file-posix.c; permission bits from include/block/block-common.h): every
 * user of an image file holds shared open-file-description locks (fcntl F_OFD_SETLK, l_type
 * F_RDLCK) on single bytes of the file:
 *  - byte 100 + i for each permission i it holds,
 *  - byte 200 + i for each permission i it does not share with other users.
 * The permissions are 0 consistent-read, 1 write, 2 write-unchanged, 3 resize (QEMU 6.1 and
 * older also knew 4 graph-mod, now unused). Before using the image it checks, with F_OFD_GETLK
 * for an exclusive lock, that nobody else holds byte 200 + i for a permission i it wants, nor
 * byte 100 + i for a permission i it does not share; the locks are taken first and the checks
 * made after, so of two users opening at once at least one sees the other.
 *
 * What qcow2fs takes: exactly what QEMU 7.2 takes for the same open, measured in /proc/locks
 * (qemu-io on an image, and on an overlay for its backing file):
 *  - 'write' (read-write image): holds consistent-read, write and resize (bytes 100, 101, 103)
 *    and shares consistent-read and write-unchanged only (bytes 201, 203). QEMU then refuses
 *    to open the image at all, even read-only, unless forced (-U / force-share), as it does
 *    while another QEMU writes it.
 *  - 'read' (read-only image, backing files, data files): holds consistent-read (100) and
 *    shares everything but write and resize (201, 203). Other readers, QEMU's or ours, and
 *    other overlays of the same backing file go on; a writer is refused.
 *  - 'none': no lock and no check (QEMU's locking=off).
 * OFD locks belong to one open file description: two opens in one process conflict like two
 * processes, and closing the descriptor releases them, also when the process dies.
 */
import { constants } from 'node:os'
import { BusyError } from '../errors.js'
import { ioAddonFile, loadIoAddon } from './native-addon.js'

export type LockMode = 'write' | 'read' | 'none'

/** QEMU's permission bits (BLK_PERM_*), as bit numbers. */
const PERM_CONSISTENT_READ = 0
const PERM_WRITE = 1
const PERM_RESIZE = 3
/** RAW_LOCK_PERM_BASE and RAW_LOCK_SHARED_BASE of QEMU's file-posix driver. */
const PERM_LOCK_BASE = 100
const SHARED_LOCK_BASE = 200

interface Permissions {
  /** Permissions held: byte PERM_LOCK_BASE + i is locked for each. */
  held: readonly number[]
  /** Permissions not shared: byte SHARED_LOCK_BASE + i is locked for each. */
  unshared: readonly number[]
}

const PERMISSIONS: Record<Exclude<LockMode, 'none'>, Permissions> = {
  write: { held: [PERM_CONSISTENT_READ, PERM_WRITE, PERM_RESIZE], unshared: [PERM_WRITE, PERM_RESIZE] },
  read: { held: [PERM_CONSISTENT_READ], unshared: [PERM_WRITE, PERM_RESIZE] },
}

/** The bytes a lock mode holds, in order (for tests and messages). */
export function lockedBytes(mode: LockMode): number[] {
  if (mode === 'none') return []
  const { held, unshared } = PERMISSIONS[mode]
  return [...held.map((i) => PERM_LOCK_BASE + i), ...unshared.map((i) => SHARED_LOCK_BASE + i)]
}

/** The addon's calls (lib/io/native/ofd_lock.c); each returns 0 or an errno value. */
interface OfdLockAddon {
  lockByte(fd: number, offset: number): number
  testByte(fd: number, offset: number): number
}

let addon: OfdLockAddon | undefined

/** Loads the addon on first use (lib/io/native-addon.ts says from where). */
function ofdLocks(): OfdLockAddon {
  if (addon) return addon
  try {
    addon = loadIoAddon<OfdLockAddon>('ofd_lock')
  } catch (err) {
    const file = ioAddonFile('ofd_lock')
    throw new Error(`cannot load the image locking addon '${file}' (build it with 'make build'): ${(err as Error).message}`, { cause: err })
  }
  return addon
}

const { EAGAIN, EACCES } = constants.errno

/** Name of an errno value for messages (ENOLCK, EINVAL...). */
function errnoName(errno: number): string {
  for (const [name, value] of Object.entries(constants.errno)) if (value === errno) return name
  return `errno ${errno}`
}

function cannotLock(filePath: string, what: string, errno: number): Error {
  return new Error(
    `cannot ${what} QEMU's image lock on '${filePath}' (${errnoName(errno)}); to go without locking: mount -o nolock, info -U`,
  )
}

/**
 * Takes the locks of `mode` on the file open as `fd` (opened for reading at least), then checks
 * that no other open of the file holds locks that forbid this one. Throws BusyError naming the
 * file and who is in the way, or an Error when the file system refuses locks. On a throw some
 * bytes may be locked already: the caller closes `fd`, which releases them.
 */
export function lockImageFile(fd: number, filePath: string, mode: LockMode): void {
  if (mode === 'none') return
  const locks = ofdLocks()
  for (const offset of lockedBytes(mode)) {
    const errno = locks.lockByte(fd, offset)
    // A shared lock fails only against an exclusive one, which QEMU never takes: someone else's
    // lock, but in use all the same.
    if (errno === EAGAIN || errno === EACCES) throw inUse(filePath, 'locked by another program')
    if (errno !== 0) throw cannotLock(filePath, 'take', errno)
  }
  /** True when another open holds a lock on byte `offset`. */
  const heldElsewhere = (offset: number): boolean => {
    const errno = locks.testByte(fd, offset)
    if (errno === EAGAIN || errno === EACCES) return true
    if (errno !== 0) throw cannotLock(filePath, 'test', errno)
    return false
  }
  const { held, unshared } = PERMISSIONS[mode]
  // Someone who does not share a permission we take, or who holds one we do not share.
  const refused = held.some((i) => heldElsewhere(SHARED_LOCK_BASE + i)) || unshared.some((i) => heldElsewhere(PERM_LOCK_BASE + i))
  if (!refused) return
  if (heldElsewhere(PERM_LOCK_BASE + PERM_WRITE) || heldElsewhere(PERM_LOCK_BASE + PERM_RESIZE)) {
    throw inUse(filePath, 'locked for writing by QEMU or a qcow2fs mount')
  }
  if (mode === 'write' && (heldElsewhere(SHARED_LOCK_BASE + PERM_WRITE) || heldElsewhere(SHARED_LOCK_BASE + PERM_RESIZE))) {
    throw inUse(filePath, 'open read-only in QEMU or a qcow2fs mount, which do not share writing', 'open it read-only, or close it there first')
  }
  throw inUse(filePath, `locked by QEMU or a qcow2fs mount against ${mode === 'write' ? 'writers' : 'readers'}`)
}

function inUse(filePath: string, how: string, advice = 'close it there first'): BusyError {
  return new BusyError(`'${filePath}' is in use by another process (${how}); ${advice}`)
}

#!/usr/bin/env node
/*
 * The "no-I/O" benchmark baseline: a fuse-native server exposing one file, MOUNTPOINT/zero.raw,
 * whose reads are answered with zeros without touching any file. Measured with the same dd/fio
 * commands as the real targets, it shows what the FUSE binding and the kernel round trip cost on
 * their own, i.e. the ceiling for qcow2fs.
 *
 * The file is read-only when the option string contains `ro` (the default one does). Without
 * `ro` it is writable (mode 0644): writes are answered as fully written and their data is
 * dropped, fsync and flush succeed at once, and the size never changes (a truncate to another
 * size fails with EPERM). bench/write.sh measures the write ceiling this way.
 *
 * Usage: node bench/zero-fuse.mjs MOUNTPOINT SIZE_BYTES [FUSE_OPTION_STRING]
 * Prints the file path once mounted; unmounts on SIGINT/SIGTERM.
 *
 * FUSE_OPTION_STRING is the '-o...' string given to libfuse; bench/run.sh passes the one
 * qcow2fs builds for its own mounts (buildOptionString with DEFAULT_KERNEL_TUNING), so both
 * servers run with the same kernel settings. Without it, DEFAULT_OPTIONS below is used.
 *
 * With ZERO_FUSE_STATS=1 it also counts what reaches the read handler: request sizes, and how
 * many requests do not start where the previous one ended (requests reordered between the
 * kernel and JavaScript). SIGUSR2 prints the counts to stderr and resets them.
 */
import Fuse from 'fuse-native'

const FILE_NAME = 'zero.raw'
/** 128 KiB requests and readahead, page cache kept across opens, read-only. */
const DEFAULT_OPTIONS =
  '-ofsname=zero-fuse,subtype=zero-fuse,default_permissions,max_read=131072,max_readahead=131072,kernel_cache,ro'

/** fuse-native builds its option string from a fixed set of flags; this takes a whole string. */
class ZeroFuse extends Fuse {
  constructor(mountpoint, ops, optionString) {
    // No per-operation reply timers: qcow2fs runs reads without them too (lib/fuse/adapter.ts),
    // and fuse-native's default arms and clears a timer for every request.
    super(mountpoint, ops, { force: true, timeout: false })
    this.optionString = optionString
  }

  _fuseOptions() {
    return this.optionString
  }
}

function fail(message, exitCode = 1) {
  process.stderr.write(`zero-fuse: ${message}\n`)
  process.exit(exitCode)
}

const [mountpoint, sizeArg, optionArg] = process.argv.slice(2)
if (!mountpoint || !sizeArg) fail('usage: node bench/zero-fuse.mjs MOUNTPOINT SIZE_BYTES [FUSE_OPTION_STRING]', 2)
const optionString = optionArg || DEFAULT_OPTIONS
if (!optionString.startsWith('-o')) fail(`FUSE_OPTION_STRING must start with -o: ${optionString}`, 2)
const sizeBytes = Number(sizeArg)
if (!Number.isSafeInteger(sizeBytes) || sizeBytes < 0) fail(`bad SIZE_BYTES: ${sizeArg}`, 2)
/** Writable unless the kernel options mount it read-only. */
const writable = !optionString.slice(2).split(',').includes('ro')

const stats = process.env.ZERO_FUSE_STATS === '1' ? { requests: 0, notContinuing: 0, nextOffset: 0, sizes: new Map() } : undefined
if (stats) {
  process.on('SIGUSR2', () => {
    const sizes = [...stats.sizes].sort((a, b) => a[0] - b[0]).map(([bytes, count]) => `${bytes} B x ${count}`)
    process.stderr.write(
      `zero-fuse: ${stats.requests} read requests (${sizes.join(', ') || 'none'}), ` +
        `${stats.notContinuing} not starting where the previous one ended\n`,
    )
    stats.requests = 0
    stats.notContinuing = 0
    stats.sizes.clear()
  })
}

const mountTime = new Date()
const uid = process.getuid?.() ?? 0
const gid = process.getgid?.() ?? 0

function stat(mode, size, nlink) {
  return { mtime: mountTime, atime: mountTime, ctime: mountTime, size, mode, uid, gid, nlink, blksize: 4096, blocks: Math.ceil(size / 512) }
}

const ops = {
  getattr(path, cb) {
    if (path === '/') return cb(0, stat(0o40555, 4096, 2))
    if (path === `/${FILE_NAME}`) return cb(0, stat(writable ? 0o100644 : 0o100444, sizeBytes, 1))
    return cb(Fuse.ENOENT)
  },
  readdir(path, cb) {
    if (path === '/') return cb(0, [FILE_NAME])
    return cb(Fuse.ENOENT)
  },
  open(path, flags, cb) {
    if (path !== `/${FILE_NAME}`) return cb(Fuse.ENOENT)
    // O_ACCMODE: only read-only opens are allowed on a read-only mount.
    if (!writable && (flags & 3) !== 0) return cb(Fuse.EACCES)
    return cb(0, 1)
  },
  release(path, fd, cb) {
    return cb(0)
  },
  write(path, fd, buf, len, guestOffset, cb) {
    if (!writable) return cb(Fuse.EROFS)
    return cb(len)
  },
  flush(path, fd, cb) {
    return cb(0)
  },
  fsync(path, datasync, fd, cb) {
    return cb(0)
  },
  truncate(path, size, cb) {
    if (path !== `/${FILE_NAME}`) return cb(Fuse.ENOENT)
    if (!writable) return cb(Fuse.EROFS)
    return cb(size === sizeBytes ? 0 : Fuse.EPERM)
  },
  ftruncate(path, fd, size, cb) {
    if (!writable) return cb(Fuse.EROFS)
    return cb(size === sizeBytes ? 0 : Fuse.EPERM)
  },
  read(path, fd, buf, len, guestOffset, cb) {
    if (stats) {
      stats.requests++
      if (guestOffset !== stats.nextOffset) stats.notContinuing++
      stats.nextOffset = guestOffset + len
      stats.sizes.set(len, (stats.sizes.get(len) ?? 0) + 1)
    }
    if (guestOffset >= sizeBytes) return cb(0)
    const byteCount = Math.min(len, sizeBytes - guestOffset)
    buf.fill(0, 0, byteCount)
    return cb(byteCount)
  },
}

const fuse = new ZeroFuse(mountpoint, ops, optionString)

fuse.mount((err) => {
  if (err) fail(`mount failed: ${err.message}`)
  process.stdout.write(`${fuse.mnt}/${FILE_NAME}\n`)
})

let stopping = false
function stop() {
  if (stopping) return
  stopping = true
  fuse.unmount((err) => {
    if (err) fail(`unmount failed: ${err.message}`)
    process.exit(0)
  })
}
process.on('SIGINT', stop)
process.on('SIGTERM', stop)

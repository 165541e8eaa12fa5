#!/usr/bin/env node
/*
 * The "no-I/O" benchmark baseline: a fuse-native server exposing one read-only file,
 * MOUNTPOINT/zero.raw, whose reads are answered with zeros without touching any file.
 * Measured with the same dd/fio commands as the real targets, it shows what the FUSE
 * binding and the kernel round trip cost on their own, i.e. the ceiling for qcow2fs.
 *
 * Usage: node bench/zero-fuse.mjs MOUNTPOINT SIZE_BYTES
 * Prints the file path once mounted; unmounts on SIGINT/SIGTERM.
 */
import Fuse from 'fuse-native'

const FILE_NAME = 'zero.raw'

function fail(message, exitCode = 1) {
  process.stderr.write(`zero-fuse: ${message}\n`)
  process.exit(exitCode)
}

const [mountpoint, sizeArg] = process.argv.slice(2)
if (!mountpoint || !sizeArg) fail('usage: node bench/zero-fuse.mjs MOUNTPOINT SIZE_BYTES', 2)
const sizeBytes = Number(sizeArg)
if (!Number.isSafeInteger(sizeBytes) || sizeBytes < 0) fail(`bad SIZE_BYTES: ${sizeArg}`, 2)

const mountTime = new Date()
const uid = process.getuid?.() ?? 0
const gid = process.getgid?.() ?? 0

function stat(mode, size, nlink) {
  return { mtime: mountTime, atime: mountTime, ctime: mountTime, size, mode, uid, gid, nlink, blksize: 4096, blocks: Math.ceil(size / 512) }
}

const ops = {
  getattr(path, cb) {
    if (path === '/') return cb(0, stat(0o40555, 4096, 2))
    if (path === `/${FILE_NAME}`) return cb(0, stat(0o100444, sizeBytes, 1))
    return cb(Fuse.ENOENT)
  },
  readdir(path, cb) {
    if (path === '/') return cb(0, [FILE_NAME])
    return cb(Fuse.ENOENT)
  },
  open(path, flags, cb) {
    if (path !== `/${FILE_NAME}`) return cb(Fuse.ENOENT)
    // O_ACCMODE: only read-only opens are allowed.
    if ((flags & 3) !== 0) return cb(Fuse.EACCES)
    return cb(0, 1)
  },
  release(path, fd, cb) {
    return cb(0)
  },
  read(path, fd, buf, len, guestOffset, cb) {
    if (guestOffset >= sizeBytes) return cb(0)
    const byteCount = Math.min(len, sizeBytes - guestOffset)
    buf.fill(0, 0, byteCount)
    return cb(byteCount)
  },
}

const fuse = new Fuse(mountpoint, ops, { force: true, fsname: 'zero-fuse', subtype: 'zero-fuse' })

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

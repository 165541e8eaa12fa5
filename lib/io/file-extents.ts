/*
 * Data and holes of a host file, the way QEMU's file-posix driver finds them (lseek with
 * SEEK_DATA, then SEEK_HOLE), through the small addon lib/io/native/file_extents.c (Node has no
 * lseek). Used by `qcow2fs map` to report holes as qemu-img map does.
 */
import { constants } from 'node:os'
import { optionalIoAddon } from './native-addon.js'

/**
 * The extent of a file at some offset: data or a hole, up to `end` (exclusive). `end` is
 * Infinity for a hole that runs to the end of the file, and for data when the file system
 * cannot tell (QEMU then takes everything as data).
 */
export interface FileExtent {
  hole: boolean
  end: number
}

interface FileExtentsAddon {
  seek(fd: number, offset: number, wantHole: boolean): number
}

/** The addon (lib/io/native-addon.ts says from where); null when it cannot be loaded. */
const extentsAddon = optionalIoAddon<FileExtentsAddon>('file_extents', 'holes are guessed from the bytes')

/**
 * The extent at hostOffset of the file open as `fd`, as QEMU's find_allocation sees it; or
 * undefined when the addon is not built (callers then guess from the bytes).
 */
export function fileExtentAt(fd: number, hostOffset: number): FileExtent | undefined {
  const lib = extentsAddon()
  if (lib === null) return undefined
  const noInfo: FileExtent = { hole: false, end: Infinity }
  const data = lib.seek(fd, hostOffset, false)
  if (data === -constants.errno.ENXIO) return { hole: true, end: Infinity }
  if (data < 0 || data < hostOffset) return noInfo
  if (data > hostOffset) return { hole: true, end: data }
  const hole = lib.seek(fd, hostOffset, true)
  if (hole <= hostOffset) return noInfo
  return { hole: false, end: hole }
}

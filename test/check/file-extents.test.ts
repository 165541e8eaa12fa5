/*
 * Holes of host files: the file system's answer through the addon (lib/io/file-extents.ts,
 * QEMU's find_allocation outcomes), and the guess `map` falls back on without it (4 KiB zero
 * blocks of a file that has holes), which it never makes for an external data file.
 */
import { closeSync, openSync, truncateSync, writeFileSync, writeSync } from 'node:fs'
import * as path from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { FileExtents } from '../../lib/check/map.js'
import { type BlockFile, NodeBlockFile } from '../../lib/io/block-file.js'
import { fileExtentAt } from '../../lib/io/file-extents.js'
import { MemoryBlockFile } from '../helpers/memory-file.js'
import { makeTempDir, removeTempDir } from '../helpers/qemu.js'

const KiB = 1024

let dir = ''

beforeAll(async () => {
  dir = await makeTempDir('file-extents')
})
afterAll(async () => {
  if (dir) await removeTempDir(dir)
})

describe('fileExtentAt (lseek SEEK_DATA / SEEK_HOLE)', () => {
  it('finds a data extent between holes, and the trailing hole', () => {
    const file = path.join(dir, 'sparse.raw')
    writeFileSync(file, '')
    truncateSync(file, 1024 * KiB)
    const fd = openSync(file, 'r+')
    try {
      writeSync(fd, Buffer.alloc(8 * KiB, 1), 0, 8 * KiB, 256 * KiB)
      expect(fileExtentAt(fd, 0)).toEqual({ hole: true, end: 256 * KiB })
      expect(fileExtentAt(fd, 100 * KiB)).toEqual({ hole: true, end: 256 * KiB })
      expect(fileExtentAt(fd, 256 * KiB)).toEqual({ hole: false, end: 264 * KiB })
      expect(fileExtentAt(fd, 260 * KiB)).toEqual({ hole: false, end: 264 * KiB })
      expect(fileExtentAt(fd, 300 * KiB)).toEqual({ hole: true, end: Infinity })
      // Past the end of the file: no data after it either.
      expect(fileExtentAt(fd, 2048 * KiB)).toEqual({ hole: true, end: Infinity })
    } finally {
      closeSync(fd)
    }
  })

  it('a file without holes is one data extent up to its end', () => {
    const file = path.join(dir, 'dense.raw')
    writeFileSync(file, Buffer.alloc(64 * KiB, 0))
    const f = NodeBlockFile.open(file, { readOnly: true, lock: 'none' })
    try {
      expect(f.extentAt(0)).toEqual({ hole: false, end: 64 * KiB })
      expect(f.extentAt(10 * KiB)).toEqual({ hole: false, end: 64 * KiB })
    } finally {
      f.close()
    }
  })
})

describe('FileExtents without lseek (a file held in memory)', () => {
  /** 64 KiB: data, 8 KiB of zeros, data, then zeros to the end. */
  function content(): Uint8Array {
    const bytes = new Uint8Array(64 * KiB)
    bytes.fill(7, 0, 16 * KiB)
    bytes.fill(9, 24 * KiB, 32 * KiB)
    return bytes
  }

  it('takes no holes in a file that occupies its whole length', () => {
    const extents = new FileExtents(MemoryBlockFile.fromBytes('m', content()))
    expect(extents.extentAt(0, 64 * KiB)).toEqual({ hole: false, end: 64 * KiB })
    expect(extents.extentAt(20 * KiB, 64 * KiB)).toEqual({ hole: false, end: 64 * KiB })
  })

  /** The bytes of content(), occupying less than their length on the host. */
  function sparseFile(): BlockFile {
    const memory = MemoryBlockFile.fromBytes('m', content())
    return {
      path: 'm',
      size: memory.size,
      writable: false,
      pread: (buf, hostOffset) => memory.pread(buf, hostOffset),
      pwrite: () => {
        throw new Error('read-only')
      },
      sync: () => {},
      truncate: () => {},
      allocatedBytes: () => 32 * KiB,
      close: () => memory.close(),
    }
  }

  it('takes zero blocks as holes in a file that has holes', () => {
    const extents = new FileExtents(sparseFile())
    expect(extents.extentAt(0, 64 * KiB)).toEqual({ hole: false, end: 16 * KiB })
    expect(extents.extentAt(16 * KiB, 64 * KiB)).toEqual({ hole: true, end: 24 * KiB })
    expect(extents.extentAt(24 * KiB, 64 * KiB)).toEqual({ hole: false, end: 32 * KiB })
    expect(extents.extentAt(40 * KiB, 48 * KiB)).toEqual({ hole: true, end: 48 * KiB })
  })

  it('without guessing (an external data file), the same file is all data, as QEMU takes a file it cannot ask', () => {
    const extents = new FileExtents(sparseFile(), { guess: false })
    expect(extents.extentAt(0, 64 * KiB)).toEqual({ hole: false, end: 64 * KiB })
    expect(extents.extentAt(16 * KiB, 64 * KiB)).toEqual({ hole: false, end: 64 * KiB })
    expect(extents.extentAt(40 * KiB, 48 * KiB)).toEqual({ hole: false, end: 48 * KiB })
  })
})

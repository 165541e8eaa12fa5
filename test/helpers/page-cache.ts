/*
 * dropFromPageCache(file): rewrites a file with O_DIRECT so that the page cache holds none of
 * it, as if it had been written long ago. The read-ahead of read-only images
 * (lib/io/read-ahead.ts) leaves ranges the page cache holds to the plain reads, and a file
 * qemu-img has just written is cached: tests of the read-ahead need files that are not.
 */
import * as fs from 'node:fs'
import { readAheadCalls } from '../../lib/io/read-ahead.js'

const PAGE = 4096

export function dropFromPageCache(file: string): void {
  const calls = readAheadCalls()
  if (calls === null) throw new Error('the read_ahead addon is not built (make build)')
  const bytes = fs.readFileSync(file)
  // O_DIRECT writes whole pages from aligned memory; the file is cut back to its length after.
  const aligned = calls.alloc(Math.max(PAGE, Math.ceil(bytes.length / PAGE) * PAGE))
  aligned.fill(0)
  aligned.set(bytes)
  const fd = fs.openSync(file, fs.constants.O_WRONLY | fs.constants.O_TRUNC | fs.constants.O_DIRECT)
  try {
    fs.writeSync(fd, aligned, 0, aligned.length, 0)
    fs.ftruncateSync(fd, bytes.length)
  } finally {
    fs.closeSync(fd)
  }
}

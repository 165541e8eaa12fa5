/*
 * The file locks the kernel lists in /proc/locks for one file: how the tests see which of
 * QEMU's lock bytes a process (ours or QEMU's) holds, without going through our own addon.
 */
import { readFileSync, statSync } from 'node:fs'

export interface HeldLock {
  /** OFDLCK for open file description locks, POSIX for process-associated ones, FLOCK... */
  kind: string
  /** READ or WRITE. */
  type: string
  start: number
  end: number
}

/** Every lock on `file`, sorted by start (each line of /proc/locks is one lock of one holder). */
export function locksOn(file: string): HeldLock[] {
  // By inode number alone: the device field is the file system's internal one, which differs
  // from stat's st_dev on some file systems (overlayfs, btrfs subvolumes).
  const ino = String(statSync(file).ino)
  const out: HeldLock[] = []
  for (const line of readFileSync('/proc/locks', 'utf8').split('\n')) {
    // "1: OFDLCK ADVISORY  READ -1 fe:00:2148400 201 201"; blocked waiters start with "->".
    const fields = line.trim().split(/\s+/)
    if (fields[1] === '->' || fields[5]?.split(':')[2] !== ino) continue
    out.push({ kind: fields[1]!, type: fields[3]!, start: Number(fields[6]), end: fields[7] === 'EOF' ? Infinity : Number(fields[7]) })
  }
  return out.sort((a, b) => a.start - b.start || a.end - b.end)
}

/** The single bytes locked on `file`, one entry per holder and byte, sorted. */
export function lockedBytesOn(file: string): number[] {
  const bytes: number[] = []
  for (const lock of locksOn(file)) for (let b = lock.start; b <= lock.end; b++) bytes.push(b)
  return bytes.sort((a, b) => a - b)
}

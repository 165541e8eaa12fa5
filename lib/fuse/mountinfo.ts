/*
 * This process's mount table (/proc/self/mountinfo): is a directory a mount point, of what type,
 * and which device number does a mount have. Reading it never touches a FUSE file system, so it
 * is safe even when a server hangs.
 */
import { readFileSync } from 'node:fs'
import { readFile } from 'node:fs/promises'

export interface MountEntry {
  mountId: number
  /** "major:minor" of the mounted file system. */
  device: string
  mountPoint: string
  /** e.g. "ext4", "fuse.qcow2fs". */
  fsType: string
  source: string
}

const MOUNTINFO_PATH = '/proc/self/mountinfo'

/** mountinfo escapes space, tab, newline and backslash as \ooo (octal). */
function unescapeField(field: string): string {
  return field.replace(/\\([0-7]{3})/g, (_, octal: string) => String.fromCharCode(parseInt(octal, 8)))
}

export function parseMountInfo(text: string): MountEntry[] {
  const entries: MountEntry[] = []
  for (const line of text.split('\n')) {
    if (!line) continue
    const fields = line.split(' ')
    const separator = fields.indexOf('-', 6)
    const [mountId, , device, , mountPoint] = fields
    const fsType = fields[separator + 1]
    const source = fields[separator + 2]
    if (separator < 0 || !mountId || !device || !mountPoint || !fsType || source === undefined) continue
    entries.push({
      mountId: Number(mountId),
      device,
      mountPoint: unescapeField(mountPoint),
      fsType,
      source: unescapeField(source),
    })
  }
  return entries
}

export function readMountTableSync(): MountEntry[] {
  return parseMountInfo(readFileSync(MOUNTINFO_PATH, 'utf8'))
}

export async function readMountTable(): Promise<MountEntry[]> {
  return parseMountInfo(await readFile(MOUNTINFO_PATH, 'utf8'))
}

/** The topmost mount at exactly `mountPoint` (an absolute, resolved path), if any. */
export function findMount(table: readonly MountEntry[], mountPoint: string): MountEntry | undefined {
  let found: MountEntry | undefined
  for (const entry of table) if (entry.mountPoint === mountPoint) found = entry
  return found
}

/*
 * Dirty images: an image with lazy refcounts that was not closed cleanly (its writer crashed)
 * has the dirty bit set and refcounts that lag behind its L2 tables. Like QEMU, a read-write
 * open repairs such an image first (`check --repair all`: refcounts rebuilt or fixed, leaks
 * freed, COPIED flags set, the dirty bit cleared), and says so once.
 *
 * Only an open that would otherwise be allowed to write repairs: a read-only open, a snapshot
 * view, an image marked corrupt or one with an external data file (both refused read-write)
 * never modify the image here.
 */
import { CorruptImageError, Qcow2Error } from '../errors.js'
import { HEADER_PROBE_SIZE, checkIncompatibleFeatures, headerFlags, parseHeader, parseHeaderExtensions } from '../format/header.js'
import type { BlockFile } from '../io/block-file.js'
import { log } from '../log.js'
import { readPadded } from './layout.js'
import { repairImage } from './repair.js'

/**
 * Repairs the image in `file` (open for writing) when its dirty bit is set and a read-write
 * open would otherwise accept it. Returns a one-line note for the user when it repaired, else
 * undefined. Throws CorruptImageError when the repair could not be done.
 */
export function repairDirtyImage(file: BlockFile, imagePath: string, options: { snapshot?: string }): string | undefined {
  if (!file.writable || options.snapshot !== undefined) return undefined
  try {
    const header = parseHeader(readPadded(file, 0, Math.min(HEADER_PROBE_SIZE, file.size)))
    if (!headerFlags.dirty(header) || headerFlags.corrupt(header) || headerFlags.externalDataFile(header)) return undefined
    checkIncompatibleFeatures(header, parseHeaderExtensions(header, readPadded(file, 0, Math.min(2 ** header.clusterBits, file.size))))
  } catch (err) {
    // A header the open refuses: the open says why.
    if (err instanceof Qcow2Error) return undefined
    throw err
  }
  let result
  try {
    result = repairImage(file, imagePath, 'all', (line) => log.open('%s: repair: %s', imagePath, line))
  } catch (err) {
    throw new CorruptImageError(`'${imagePath}' has the dirty bit set and could not be repaired: ${(err as Error).message}`, { cause: err })
  }
  const pass = result.repairPass
  if (pass.checkErrors > 0) {
    throw new CorruptImageError(`'${imagePath}' has the dirty bit set and could not be repaired (${pass.checkErrors} check errors; see 'qcow2fs check')`)
  }
  const note =
    `'${imagePath}' had the dirty bit set (refcounts not updated after a crash): repaired ` +
    `${pass.leaksFixed} leaked clusters and ${pass.corruptionsFixed} corruptions` +
    (pass.corruptions > 0 ? `; ${pass.corruptions} corruptions remain (see 'qcow2fs check')` : '')
  log.open('%s', note)
  return note
}

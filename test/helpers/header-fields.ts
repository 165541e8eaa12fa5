/*
 * The qcow2 header fields the test helpers need, decoded from the spec independently of the
 * engine (not with lib/format, whose parser the tests check): used by the damage helpers and
 * by the ordering checks' layout reader.
 *
 * No check is made here (not even of the magic): damaged images must still be readable.
 */

export interface HeaderFields {
  version: number
  clusterBits: number
  clusterSize: number
  virtualSize: number
  l1Size: number
  l1TableOffset: number
  refcountTableOffset: number
  refcountTableClusters: number
  snapshotCount: number
  snapshotsOffset: number
  /** incompatible_features (0 for version 2). */
  incompatibleFeatures: bigint
  /** refcount_order (4 for version 2). */
  refcountOrder: number
  extendedL2: boolean
  /** Bytes per L2 entry: 16 with extended L2, else 8. */
  l2EntryBytes: number
}

/** How many bytes from the start of the file parseHeaderFields reads (up to refcount_order). */
export const HEADER_FIELDS_BYTES = 104

const EXTENDED_L2_INCOMPAT_BIT = 1n << 4n

/** Decodes the header fields from the first HEADER_FIELDS_BYTES bytes of an image. */
export function parseHeaderFields(bytes: Uint8Array): HeaderFields {
  if (bytes.length < HEADER_FIELDS_BYTES) throw new Error(`parseHeaderFields needs ${HEADER_FIELDS_BYTES} bytes, got ${bytes.length}`)
  const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength)
  const u64 = (at: number): number => Number(v.getBigUint64(at))
  const version = v.getUint32(4)
  const clusterBits = v.getUint32(20)
  const incompatibleFeatures = version >= 3 ? v.getBigUint64(72) : 0n
  const extendedL2 = (incompatibleFeatures & EXTENDED_L2_INCOMPAT_BIT) !== 0n
  return {
    version,
    clusterBits,
    clusterSize: 2 ** clusterBits,
    virtualSize: u64(24),
    l1Size: v.getUint32(36),
    l1TableOffset: u64(40),
    refcountTableOffset: u64(48),
    refcountTableClusters: v.getUint32(56),
    snapshotCount: v.getUint32(60),
    snapshotsOffset: u64(64),
    incompatibleFeatures,
    refcountOrder: version >= 3 ? v.getUint32(96) : 4,
    extendedL2,
    l2EntryBytes: extendedL2 ? 16 : 8,
  }
}

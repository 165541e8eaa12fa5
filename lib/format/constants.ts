/*
 * Every number the qcow2 specification (QEMU docs/interop/qcow2.txt) defines, once, with the
 * spec's name in its comment. 64-bit masks are split in two uint32 halves (HI = bits 32-63,
 * LO = bits 0-31) because JS bitwise operators work on signed 32-bit integers; combine results
 * with `>>> 0`.
 */

// ---- Header ("Header" section) ----

/** Byte offsets of the header fields (spec: "Header"). */
export const HeaderOffset = {
  magic: 0,
  version: 4,
  backingFileOffset: 8,
  backingFileSize: 16,
  clusterBits: 20,
  size: 24,
  cryptMethod: 32,
  l1Size: 36,
  l1TableOffset: 40,
  refcountTableOffset: 48,
  refcountTableClusters: 56,
  snapshotCount: 60,
  snapshotsOffset: 64,
  incompatibleFeatures: 72,
  compatibleFeatures: 80,
  autoclearFeatures: 88,
  refcountOrder: 96,
  headerLength: 100,
  compressionType: 104,
} as const

/** magic: "QFI\xfb". */
export const QCOW_MAGIC = 0x514649fb
/** version: 2 (compat 0.10) or 3 (compat 1.1). */
export const QCOW_VERSION_2 = 2
export const QCOW_VERSION_3 = 3
/** header_length of a version 2 image (fixed, no header_length field). */
export const V2_HEADER_LENGTH = 72
/** Minimum header_length of a version 3 image (the field itself ends at byte 104). */
export const V3_MIN_HEADER_LENGTH = 104
/** header_length must be a multiple of 8 (spec: "Must be a multiple of 8"). */
export const HEADER_LENGTH_ALIGNMENT = 8

/** cluster_bits: at least 9 (512 B); QEMU's upper limit is 21 (2 MiB, MAX_CLUSTER_BITS). */
export const MIN_CLUSTER_BITS = 9
export const MAX_CLUSTER_BITS = 21
/** With extended L2 entries, cluster_bits >= 14 (subclusters of at least 512 bytes). */
export const MIN_CLUSTER_BITS_EXTENDED_L2 = 14

/** backing_file_size: "Must not be longer than 1023 bytes". */
export const MAX_BACKING_FILE_NAME_SIZE = 1023

/** crypt_method values. */
export const CRYPT_NONE = 0
export const CRYPT_AES = 1
export const CRYPT_LUKS = 2

/** refcount_order: refcount_bits = 1 << refcount_order, at most 6 (64 bits). */
export const MAX_REFCOUNT_ORDER = 6
/** Version 2 images have 16-bit refcounts (refcount_order 4). */
export const V2_REFCOUNT_ORDER = 4

/** compression_type values. */
export const COMPRESSION_TYPE_ZLIB = 0
export const COMPRESSION_TYPE_ZSTD = 1

// ---- Feature bits ----

/** incompatible_features bit 0: dirty bit (refcounts may be inconsistent). */
export const INCOMPAT_DIRTY_BIT = 0
/** incompatible_features bit 1: corrupt bit (image must not be written). */
export const INCOMPAT_CORRUPT_BIT = 1
/** incompatible_features bit 2: external data file. */
export const INCOMPAT_DATA_FILE_BIT = 2
/** incompatible_features bit 3: compression type field present and non-zero. */
export const INCOMPAT_COMPRESSION_BIT = 3
/** incompatible_features bit 4: extended L2 entries (subclusters). */
export const INCOMPAT_EXTL2_BIT = 4
/** The incompatible bits this implementation understands. */
export const KNOWN_INCOMPAT_BITS = [
  INCOMPAT_DIRTY_BIT,
  INCOMPAT_CORRUPT_BIT,
  INCOMPAT_DATA_FILE_BIT,
  INCOMPAT_COMPRESSION_BIT,
  INCOMPAT_EXTL2_BIT,
] as const

/** compatible_features bit 0: lazy refcounts. */
export const COMPAT_LAZY_REFCOUNTS_BIT = 0

/** autoclear_features bit 0: bitmaps extension data is consistent. */
export const AUTOCLEAR_BITMAPS_BIT = 0
/** autoclear_features bit 1: raw external data (data file is a valid raw image). */
export const AUTOCLEAR_DATA_FILE_RAW_BIT = 1

/** Feature name table entry "type" byte values. */
export const FEATURE_TYPE_INCOMPATIBLE = 0
export const FEATURE_TYPE_COMPATIBLE = 1
export const FEATURE_TYPE_AUTOCLEAR = 2
/** Feature name table entry: 1 byte type, 1 byte bit number, 46 bytes name. */
export const FEATURE_NAME_ENTRY_SIZE = 48
export const FEATURE_NAME_MAX_LENGTH = 46

// ---- Header extensions ("Header extensions" section) ----

export const EXT_END = 0x00000000
/** Backing file format name string. */
export const EXT_BACKING_FORMAT = 0xe2792aca
/** Feature name table. */
export const EXT_FEATURE_NAME_TABLE = 0x6803f857
/** Bitmaps extension. */
export const EXT_BITMAPS = 0x23852875
/** Full disk encryption header pointer. */
export const EXT_CRYPTO_HEADER = 0x0537be77
/** External data file name string. */
export const EXT_DATA_FILE = 0x44415441
/** Extension data is padded to a multiple of 8 bytes. */
export const EXT_ALIGNMENT = 8
/** Extension header: u32 type, u32 length. */
export const EXT_HEADER_SIZE = 8

// ---- L1 / L2 tables ----

/** Size of an L1 entry, a standard L2 entry and a refcount table entry. */
export const TABLE_ENTRY_SIZE = 8
/** Size of an extended L2 entry (standard entry + 64-bit subcluster bitmap). */
export const EXTENDED_L2_ENTRY_SIZE = 16

/** Bit 63 of L1 and standard L2 entries: "COPIED" (refcount is exactly one). */
export const OFLAG_COPIED_HI = 0x80000000
/** Bit 62 of an L2 entry: 1 = compressed cluster. */
export const OFLAG_COMPRESSED_HI = 0x40000000
/** Bit 0 of a standard cluster descriptor: "reads as zeros" (v3, not with extended L2). */
export const OFLAG_ZERO_LO = 0x00000001

/** L1 entry bits 9-55: L2 table offset (L1E_OFFSET_MASK). */
export const L1E_OFFSET_MASK_HI = 0x00ffffff
export const L1E_OFFSET_MASK_LO = 0xfffffe00
/** L1 entry reserved bits 0-8 and 56-62 (L1E_RESERVED_MASK). */
export const L1E_RESERVED_MASK_HI = 0x7f000000
export const L1E_RESERVED_MASK_LO = 0x000001ff

/** Standard cluster descriptor bits 9-55: host cluster offset (L2E_OFFSET_MASK). */
export const L2E_OFFSET_MASK_HI = 0x00ffffff
export const L2E_OFFSET_MASK_LO = 0xfffffe00
/** Standard cluster descriptor reserved bits 1-8 and 56-61 (L2E_STD_RESERVED_MASK). */
export const L2E_STD_RESERVED_MASK_HI = 0x3f000000
export const L2E_STD_RESERVED_MASK_LO = 0x000001fe

/** Highest offset bit any host offset may use (bits above 55 are reserved). */
export const MAX_HOST_OFFSET_BITS = 56

/** QEMU's block layer unit: virtual sizes are whole 512-byte sectors. */
export const SECTOR_SIZE = 512

/** Compressed cluster descriptor: sizes counted in 512-byte sectors. */
export const COMPRESSED_SECTOR_SIZE = 512
export const COMPRESSED_SECTOR_BITS = 9

/** Extended L2: every cluster has 32 subclusters. */
export const SUBCLUSTERS_PER_CLUSTER = 32

/** Refcount table entry bits 9-63: refcount block offset (REFT_OFFSET_MASK). */
export const REFT_OFFSET_MASK_HI = 0xffffffff
export const REFT_OFFSET_MASK_LO = 0xfffffe00

// ---- Snapshot table ("Snapshots" section) ----

/** Fixed part of a snapshot table entry, before extra data, ID and name. */
export const SNAPSHOT_ENTRY_FIXED_SIZE = 40
/** Snapshot entries are padded to a multiple of 8 bytes. */
export const SNAPSHOT_ENTRY_ALIGNMENT = 8
/** v3 images: extra data holds at least vm_state_size_large (8) and disk_size (8). */
export const SNAPSHOT_EXTRA_DATA_MIN_V3 = 16

// ---- Implementation limits (QEMU's, so both accept the same images) ----

/** QCOW_MAX_L1_SIZE: the active L1 table is at most 32 MiB. */
export const MAX_L1_TABLE_BYTES = 32 * 1024 * 1024
/** QCOW_MAX_REFTABLE_SIZE: the refcount table is at most 8 MiB. */
export const MAX_REFCOUNT_TABLE_BYTES = 8 * 1024 * 1024
/** QCOW_MAX_SNAPSHOTS: at most 65536 internal snapshots. */
export const MAX_SNAPSHOTS = 65536
/** Extra data of one snapshot entry is at most 1 KiB (QCOW_MAX_SNAPSHOT_EXTRA_DATA). */
export const MAX_SNAPSHOT_EXTRA_DATA = 1024
/** The whole snapshot table is at most 64 MiB (QCOW_MAX_SNAPSHOTS_SIZE). */
export const MAX_SNAPSHOT_TABLE_BYTES = 64 * 1024 * 1024
/** Our limit on backing chain depth (a deeper chain is refused as probably looping). */
export const MAX_BACKING_CHAIN_DEPTH = 64

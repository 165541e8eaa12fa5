/*
 * VirtualDisk: what the FUSE adapter and the CLI need from an opened image. Qcow2Image
 * (lib/image.ts) implements it; tests may use an in-memory implementation.
 *
 * Contract:
 *  - `virtualSize` is the guest-visible size in bytes.
 *  - `read(buf, guestOffset)` fills all of `buf` with guest bytes starting at guestOffset;
 *    the caller clamps the range to [0, virtualSize). It rejects with a Qcow2Error (errno EIO
 *    for damaged regions) and leaves the disk usable for other ranges.
 *  - `write(buf, guestOffset)` stores all of `buf` (caller clamps); rejects with ReadOnlyError
 *    on a read-only disk.
 *  - `writeZeroes(guestOffset, byteCount)` makes a range read as zeros (caller clamps), without
 *    writing zero-filled data where the format can say "zeros" instead.
 *  - `resize(sizeBytes)` changes the virtual size: a shrink frees what lies past the new end,
 *    a grown range reads as zeros. A disk may round the size up to its granularity (qcow2:
 *    512 bytes) and may refuse (e.g. an image with internal snapshots: UnsupportedFeatureError).
 *  - `flush()` makes everything written so far durable.
 *  - `close()` flushes and releases the image; afterwards every call rejects with ClosedError.
 *  - `writeAtOnce(buf, guestOffset)` (optional): stores `buf` synchronously and returns true,
 *    or returns false without doing anything when it cannot right now (a write would have to
 *    wait). Throws what write() rejects with. Once it returns, `buf` is no longer referenced.
 *  - `compressionProgress()` (optional): what compressed writes (the `compress` mount option)
 *    did so far and how many clusters are still waiting; undefined without them. A server
 *    shows it while an unmount finishes the image.
 */
export interface VirtualDisk {
  readonly virtualSize: number
  readonly readOnly: boolean
  read(buf: Uint8Array, guestOffset: number): Promise<void>
  write(buf: Uint8Array, guestOffset: number): Promise<void>
  writeAtOnce?(buf: Uint8Array, guestOffset: number): boolean
  writeZeroes(guestOffset: number, byteCount: number): Promise<void>
  resize(sizeBytes: number): Promise<void>
  flush(): Promise<void>
  close(): Promise<void>
  compressionProgress?(): CompressionProgress | undefined
}

/** Counters of compressed writes (lib/engine/compress/pipeline.ts). */
export interface CompressionProgress {
  /** Clusters stored compressed, stored as normal clusters (they did not shrink), as zeros. */
  compressedClusters: number
  uncompressedClusters: number
  zeroClusters: number
  /** Guest bytes of the compressed and uncompressed clusters, and the host bytes they take. */
  guestBytes: number
  storedBytes: number
  /** Clusters staged or queued for compression: work left before the image is closed. */
  pendingClusters: number
}

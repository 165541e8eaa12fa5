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
 *  - `flush()` makes everything written so far durable.
 *  - `close()` flushes and releases the image; afterwards every call rejects with ClosedError.
 */
export interface VirtualDisk {
  readonly virtualSize: number
  readonly readOnly: boolean
  read(buf: Uint8Array, guestOffset: number): Promise<void>
  write(buf: Uint8Array, guestOffset: number): Promise<void>
  flush(): Promise<void>
  close(): Promise<void>
}

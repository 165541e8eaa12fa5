/*
 * RecordingFile: a BlockFile that passes every call to another one (a NodeBlockFile or a
 * MemoryBlockFile) and logs, in order, every change it makes to the file and every sync:
 *
 *   { kind: 'write', tag, hostOffset, bytes }   bytes is a copy taken at the time of the call
 *   { kind: 'truncate', size }
 *   { kind: 'sync' }
 *   { kind: 'mark', label }                     added by the test (mark()), e.g. around flush()
 *
 * Every event carries `seq` (its index in the log) and `change`: how many writes and truncates
 * came before it. A crash after change k leaves the file as the first k changes made it, which
 * is what replayChanges() rebuilds.
 *
 * Calls that throw are not logged. Reads are passed through and not logged.
 */
import type { BlockFile, WriteTag } from '../../lib/io/block-file.js'

export interface WriteEvent {
  kind: 'write'
  seq: number
  change: number
  tag: WriteTag
  hostOffset: number
  bytes: Uint8Array
}

export interface TruncateEvent {
  kind: 'truncate'
  seq: number
  change: number
  size: number
}

export interface SyncEvent {
  kind: 'sync'
  seq: number
  change: number
}

export interface MarkEvent {
  kind: 'mark'
  seq: number
  change: number
  label: string
}

export type FileChange = WriteEvent | TruncateEvent
export type RecordedEvent = FileChange | SyncEvent | MarkEvent

export class RecordingFile implements BlockFile {
  readonly #inner: BlockFile
  readonly #events: RecordedEvent[] = []
  readonly #changes: FileChange[] = []

  constructor(inner: BlockFile) {
    this.#inner = inner
  }

  get path(): string {
    return this.#inner.path
  }
  get size(): number {
    return this.#inner.size
  }
  get writable(): boolean {
    return this.#inner.writable
  }

  /** Every event so far, in order (the array itself: do not modify). */
  get events(): readonly RecordedEvent[] {
    return this.#events
  }

  /** The writes and truncates so far, in order. */
  get changes(): readonly FileChange[] {
    return this.#changes
  }

  /** Writes and truncates so far. */
  get changeCount(): number {
    return this.#changes.length
  }

  /** Adds a label to the log (no file operation). */
  mark(label: string): void {
    this.#events.push({ kind: 'mark', seq: this.#events.length, change: this.#changes.length, label })
  }

  pread(buf: Uint8Array, hostOffset: number): number {
    return this.#inner.pread(buf, hostOffset)
  }

  pwrite(buf: Uint8Array, hostOffset: number, tag: WriteTag): void {
    this.#inner.pwrite(buf, hostOffset, tag)
    const event: WriteEvent = {
      kind: 'write',
      seq: this.#events.length,
      change: this.#changes.length,
      tag,
      hostOffset,
      bytes: Uint8Array.from(buf),
    }
    this.#events.push(event)
    this.#changes.push(event)
  }

  sync(): void {
    this.#inner.sync()
    this.#events.push({ kind: 'sync', seq: this.#events.length, change: this.#changes.length })
  }

  truncate(size: number): void {
    this.#inner.truncate(size)
    const event: TruncateEvent = { kind: 'truncate', seq: this.#events.length, change: this.#changes.length, size }
    this.#events.push(event)
    this.#changes.push(event)
  }

  allocatedBytes(): number {
    return this.#inner.allocatedBytes()
  }

  close(): void {
    this.#inner.close()
  }
}

/** Applies one change to a writable BlockFile (a replay target). */
export function applyChange(target: BlockFile, change: FileChange): void {
  if (change.kind === 'write') target.pwrite(change.bytes, change.hostOffset, change.tag)
  else target.truncate(change.size)
}

/** Applies changes [from, to) of a log to target, in order. */
export function replayChanges(target: BlockFile, changes: readonly FileChange[], from: number, to: number): void {
  for (let i = from; i < to; i++) applyChange(target, changes[i]!)
}

/*
 * The shape `qcow2fs info --json` prints: the keys of `qemu-img info --output=json`, so scripts
 * written for one work with the other. Optional keys are absent when qemu-img omits them.
 */
export interface SnapshotInfo {
  id: string
  name: string
  'vm-state-size': number
  'date-sec': number
  'date-nsec': number
  'vm-clock-sec': number
  'vm-clock-nsec': number
  icount?: number
}

export interface ImageInfo {
  filename: string
  format: 'qcow2'
  'virtual-size': number
  'cluster-size': number
  /** Bytes the image file occupies on the host (st_blocks * 512). */
  'actual-size': number
  'dirty-flag': boolean
  'backing-filename'?: string
  'full-backing-filename'?: string
  'backing-filename-format'?: string
  snapshots?: SnapshotInfo[]
  'format-specific': {
    type: 'qcow2'
    data: {
      compat: '0.10' | '1.1'
      'compression-type'?: 'zlib' | 'zstd'
      'lazy-refcounts'?: boolean
      'refcount-bits': number
      corrupt?: boolean
      'extended-l2'?: boolean
      'data-file'?: string
      'data-file-raw'?: boolean
    }
  }
}

/*
 * Staging of partial writes to fresh clusters (docs/COMPRESSION.md, "Staging"): compression
 * needs whole clusters, but dd bs=4k, cp of a small file or a file system write a fresh
 * cluster a piece at a time. The pieces are kept here, one cluster-sized buffer per guest
 * cluster with the byte ranges written so far ("filled"), until the cluster is complete. Reads
 * see the filled ranges over what the image returns underneath.
 *
 * The memory is bounded: `boundBytes` is rounded down to whole clusters (at least one); the
 * caller completes and compresses the oldest staged cluster before staging one more past the
 * bound. Insertion order is the eviction order (a Map iterates in insertion order).
 */

/** One staged guest cluster. */
export class StagedCluster {
  /** Guest cluster index (guest offset / cluster size). */
  readonly index: number
  /** The cluster's bytes: the filled ranges are the written data; the rest is zero until completed. */
  readonly data: Uint8Array
  /** Filled ranges as sorted, disjoint, non-adjacent [start, end) pairs, flattened. */
  #filled: number[] = []

  /** `data` holds the whole cluster when `filled`; otherwise it must be zeros. */
  constructor(index: number, data: Uint8Array, filled: boolean) {
    this.index = index
    this.data = data
    if (filled) this.#filled = [0, data.length]
  }

  /** Copies chunk in at offsetInCluster and marks it filled. */
  fill(offsetInCluster: number, chunk: Uint8Array): void {
    this.data.set(chunk, offsetInCluster)
    this.markFilled(offsetInCluster, offsetInCluster + chunk.length)
  }

  /** Zeros [start, end) and marks it filled. */
  fillZeros(start: number, end: number): void {
    this.data.fill(0, start, end)
    this.markFilled(start, end)
  }

  markFilled(start: number, end: number): void {
    if (start >= end) return
    const out: number[] = []
    const f = this.#filled
    let i = 0
    while (i < f.length && f[i + 1]! < start) {
      out.push(f[i]!, f[i + 1]!)
      i += 2
    }
    let s = start
    let e = end
    while (i < f.length && f[i]! <= e) {
      s = Math.min(s, f[i]!)
      e = Math.max(e, f[i + 1]!)
      i += 2
    }
    out.push(s, e)
    while (i < f.length) {
      out.push(f[i]!, f[i + 1]!)
      i += 2
    }
    this.#filled = out
  }

  /** True when [0, clusterSize) is filled. */
  get complete(): boolean {
    return this.#filled.length === 2 && this.#filled[0] === 0 && this.#filled[1] === this.data.length
  }

  /** True when no byte of [start, end) is filled. */
  unfilled(start: number, end: number): boolean {
    const f = this.#filled
    for (let i = 0; i < f.length; i += 2) if (f[i]! < end && f[i + 1]! > start) return false
    return true
  }

  /** The filled ranges, [start, end) pairs. */
  filledRanges(): [number, number][] {
    const out: [number, number][] = []
    for (let i = 0; i < this.#filled.length; i += 2) out.push([this.#filled[i]!, this.#filled[i + 1]!])
    return out
  }

  /** The ranges not filled, [start, end) pairs. */
  gaps(): [number, number][] {
    const out: [number, number][] = []
    let at = 0
    for (const [s, e] of this.filledRanges()) {
      if (s > at) out.push([at, s])
      at = e
    }
    if (at < this.data.length) out.push([at, this.data.length])
    return out
  }

  /** Copies the filled bytes of the cluster range [from, from + out.length) into out. */
  overlay(out: Uint8Array, from: number): void {
    const to = from + out.length
    for (let i = 0; i < this.#filled.length; i += 2) {
      const s = Math.max(from, this.#filled[i]!)
      const e = Math.min(to, this.#filled[i + 1]!)
      if (s < e) out.set(this.data.subarray(s, e), s - from)
    }
  }
}

export class Staging {
  readonly clusterSize: number
  /** Clusters that may be staged at once (0: staging is off). */
  readonly maxClusters: number
  #clusters = new Map<number, StagedCluster>()
  /** A zeroed cluster-sized buffer for a new staged cluster. */
  #blank: () => Uint8Array

  /**
   * `blank` gives the buffer of each new staged cluster (zeros; the compressed-write pipeline
   * gives recycled shared memory, which the compression workers read in place).
   */
  constructor(clusterSize: number, boundBytes: number, blank: () => Uint8Array) {
    this.clusterSize = clusterSize
    this.maxClusters = boundBytes <= 0 ? 0 : Math.max(1, Math.floor(boundBytes / clusterSize))
    this.#blank = blank
  }

  get count(): number {
    return this.#clusters.size
  }

  get bytes(): number {
    return this.#clusters.size * this.clusterSize
  }

  /** True when one more cluster would go past the bound. */
  get full(): boolean {
    return this.#clusters.size >= this.maxClusters
  }

  get(index: number): StagedCluster | undefined {
    return this.#clusters.get(index)
  }

  /** Stages a new cluster (the caller made room); `data` makes it complete from the start. */
  add(index: number, data?: Uint8Array): StagedCluster {
    const staged = data ? new StagedCluster(index, data, true) : new StagedCluster(index, this.#blank(), false)
    this.#clusters.set(index, staged)
    return staged
  }

  remove(index: number): StagedCluster | undefined {
    const staged = this.#clusters.get(index)
    this.#clusters.delete(index)
    return staged
  }

  /** The cluster staged longest ago. */
  oldest(): StagedCluster | undefined {
    return this.#clusters.values().next().value
  }

  /** Every staged cluster index, ascending. */
  indexes(): number[] {
    return [...this.#clusters.keys()].sort((a, b) => a - b)
  }
}

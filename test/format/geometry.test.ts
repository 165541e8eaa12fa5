/*
 * lib/format/geometry.ts: sizes derived from cluster_bits and extended L2, and the
 * guest-offset -> (L1 index, L2 index, offset in cluster, subcluster) arithmetic, against
 * BigInt shift-and-mask oracles from the spec ("Cluster mapping").
 */
import { describe, expect, test } from 'vitest'
import {
  l1EntriesFor,
  l1IndexOf,
  l2IndexOf,
  makeGeometry,
  offsetIntoCluster,
  sizeToClusters,
  subclusterIndexOf,
} from '../../lib/format/geometry.js'
import { Rng } from './bytes.js'

const CLUSTER_BITS = Array.from({ length: 13 }, (_, i) => 9 + i) // 9..21
const LAYOUTS = CLUSTER_BITS.flatMap((clusterBits) => [
  { clusterBits, extendedL2: false },
  // Extended L2 needs cluster_bits >= 14 in images; the arithmetic is defined for all.
  { clusterBits, extendedL2: true },
])

/** Spec: l2_bits = cluster_bits - 3 (8-byte entries) or - 4 (16-byte entries). */
function oracle(clusterBits: number, extendedL2: boolean, guestOffset: bigint) {
  const cb = BigInt(clusterBits)
  const l2Bits = cb - (extendedL2 ? 4n : 3n)
  const scBits = extendedL2 ? cb - 5n : cb
  const inCluster = guestOffset & ((1n << cb) - 1n)
  return {
    l1Index: Number(guestOffset >> (cb + l2Bits)),
    l2Index: Number((guestOffset >> cb) & ((1n << l2Bits) - 1n)),
    offsetInCluster: Number(inCluster),
    subcluster: Number(inCluster >> scBits),
  }
}

function actual(clusterBits: number, extendedL2: boolean, guestOffset: number) {
  const g = makeGeometry(clusterBits, extendedL2)
  const offsetInCluster = offsetIntoCluster(g, guestOffset)
  return {
    l1Index: l1IndexOf(g, guestOffset),
    l2Index: l2IndexOf(g, guestOffset),
    offsetInCluster,
    subcluster: subclusterIndexOf(g, offsetInCluster),
  }
}

describe('geometry', () => {
  test.each(LAYOUTS)('sizes for cluster_bits $clusterBits, extended L2 $extendedL2', ({ clusterBits, extendedL2 }) => {
    const g = makeGeometry(clusterBits, extendedL2)
    const entryBytes = extendedL2 ? 16 : 8
    expect(g).toEqual({
      clusterBits,
      clusterSize: 2 ** clusterBits,
      extendedL2,
      l2EntrySize: entryBytes,
      l2Entries: 2 ** clusterBits / entryBytes,
      l2CoverageBytes: (2 ** clusterBits / entryBytes) * 2 ** clusterBits,
      subclusterSize: extendedL2 ? 2 ** clusterBits / 32 : 2 ** clusterBits,
      subclusterBits: extendedL2 ? clusterBits - 5 : clusterBits,
    })
  })

  test.each([
    // cluster_bits, extended L2, bytes one L2 table maps
    [9, false, 32 * 1024],
    [12, false, 2 * 1024 * 1024],
    [16, false, 512 * 1024 * 1024],
    [16, true, 256 * 1024 * 1024],
    [21, false, 2 ** 39],
    [21, true, 2 ** 38],
  ])('cluster_bits %i, extended L2 %s: one L2 table maps %i bytes', (clusterBits, extendedL2, coverage) => {
    expect(makeGeometry(clusterBits, extendedL2).l2CoverageBytes).toBe(coverage)
  })

  test.each(LAYOUTS)('indexes at L2 table boundaries: cluster_bits $clusterBits, extended L2 $extendedL2', ({ clusterBits, extendedL2 }) => {
    const g = makeGeometry(clusterBits, extendedL2)
    const coverage = BigInt(g.l2CoverageBytes)
    const cluster = BigInt(g.clusterSize)
    const points: bigint[] = [0n, 1n, cluster - 1n, cluster, cluster + 1n]
    for (const k of [1n, 2n, 3n, 1000n]) {
      for (const delta of [-cluster - 1n, -cluster, -1n, 0n, 1n, cluster, cluster + 1n]) points.push(k * coverage + delta)
    }
    for (const base of [1n << 31n, 1n << 32n, 1n << 40n, 1n << 48n, 1n << 52n]) {
      for (const delta of [-cluster, -1n, 0n, 1n, cluster - 1n, cluster]) points.push(base + delta)
    }
    points.push((1n << 53n) - 1n, (1n << 53n) - cluster)
    for (const p of points) {
      expect(actual(clusterBits, extendedL2, Number(p)), `guest offset ${p}`).toEqual(oracle(clusterBits, extendedL2, p))
    }
  })

  test('the last byte of one L2 table and the first of the next (64 KiB clusters)', () => {
    const g = makeGeometry(16, false)
    const coverage = 512 * 1024 * 1024
    expect([l1IndexOf(g, coverage - 1), l2IndexOf(g, coverage - 1), offsetIntoCluster(g, coverage - 1)]).toEqual([0, 8191, 65535])
    expect([l1IndexOf(g, coverage), l2IndexOf(g, coverage), offsetIntoCluster(g, coverage)]).toEqual([1, 0, 0])
  })

  test('offsets above 2^32 and 2^40 (64 KiB clusters, extended L2)', () => {
    const g = makeGeometry(16, true)
    // 2^32 + 3 clusters + 5 subclusters + 7 bytes
    const offset = 2 ** 32 + 3 * 65536 + 5 * 2048 + 7
    expect(l1IndexOf(g, offset)).toBe(16) // 2^32 / 2^28
    expect(l2IndexOf(g, offset)).toBe(3)
    expect(offsetIntoCluster(g, offset)).toBe(5 * 2048 + 7)
    expect(subclusterIndexOf(g, offsetIntoCluster(g, offset))).toBe(5)
    const far = 2 ** 40 + 4095 * 65536 + 31 * 2048 + 2047
    expect(l1IndexOf(g, far)).toBe(4096)
    expect(l2IndexOf(g, far)).toBe(4095)
    expect(subclusterIndexOf(g, offsetIntoCluster(g, far))).toBe(31)
  })

  test('subcluster index of the first and last byte of each subcluster', () => {
    for (const clusterBits of CLUSTER_BITS) {
      const g = makeGeometry(clusterBits, true)
      for (let sc = 0; sc < 32; sc++) {
        expect(subclusterIndexOf(g, sc * g.subclusterSize)).toBe(sc)
        expect(subclusterIndexOf(g, (sc + 1) * g.subclusterSize - 1)).toBe(sc)
      }
      // Without extended L2 the whole cluster is subcluster 0.
      const std = makeGeometry(clusterBits, false)
      expect(subclusterIndexOf(std, std.clusterSize - 1)).toBe(0)
    }
  })

  test.each(LAYOUTS)('random offsets below 2^53: cluster_bits $clusterBits, extended L2 $extendedL2', ({ clusterBits, extendedL2 }) => {
    const rng = new Rng(0x300 + clusterBits * 2 + (extendedL2 ? 1 : 0))
    for (let i = 0; i < 1000; i++) {
      const p = rng.bits(1 + rng.below(53))
      expect(actual(clusterBits, extendedL2, Number(p)), `guest offset ${p}`).toEqual(oracle(clusterBits, extendedL2, p))
    }
  })

  test.each(LAYOUTS)('sizeToClusters and l1EntriesFor: cluster_bits $clusterBits, extended L2 $extendedL2', ({ clusterBits, extendedL2 }) => {
    const g = makeGeometry(clusterBits, extendedL2)
    const ceilDiv = (a: bigint, b: bigint): number => Number((a + b - 1n) / b)
    const cluster = BigInt(g.clusterSize)
    const coverage = BigInt(g.l2CoverageBytes)
    const sizes = [0n, 1n, 511n, 512n, cluster - 1n, cluster, cluster + 1n, coverage - 1n, coverage, coverage + 1n]
    sizes.push(1n << 32n, (1n << 32n) + 1n, 1n << 40n, (1n << 40n) + 512n, (1n << 53n) - cluster)
    for (const size of sizes) {
      expect(sizeToClusters(g, Number(size)), `size ${size}`).toBe(ceilDiv(size, cluster))
      expect(l1EntriesFor(g, Number(size)), `size ${size}`).toBe(ceilDiv(size, coverage))
    }
  })
})

/*
 * Crash safety of the repair: the repair of a damaged image runs on a RecordingFile over an
 * in-memory copy, and the image is rebuilt as a crash after every one of its writes would
 * leave it. For every such state:
 *   - the guest data reads as before the damage (through the engine);
 *   - the check finds no more corruptions and check errors than before the repair: a crash
 *     can leave leaks, never new damage;
 *   - a second repair from there ends clean.
 * And before the header switches to a rebuilt refcount structure, the repair writes nothing
 * that the image uses or that the old refcount table names (the old structure stays whole).
 */
import { closeSync, copyFileSync, openSync, readFileSync, readSync } from 'node:fs'
import * as path from 'node:path'
import { spawnSync } from 'node:child_process'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { CheckPass, NO_FIX, checkImage } from '../../lib/check/check.js'
import { repairImage } from '../../lib/check/repair.js'
import { HeaderOffset } from '../../lib/format/constants.js'
import { Qcow2Image } from '../../lib/image.js'
import { MemoryBlockFile } from '../helpers/memory-file.js'
import { RecordingFile, replayChanges } from '../helpers/recording-file.js'
import {
  DIRTY_BIT,
  appendCluster,
  hostClusterOf,
  readHeader,
  readL2Entry,
  setIncompatibleBits,
  setRefcount,
  shrinkFirstSnapshotExtraData,
  writeBigEndian,
} from '../helpers/damage.js'
import { makeTempDir, removeTempDir, requireQemu } from '../helpers/qemu.js'

const qemu = requireQemu('repair crash safety')

let dir = ''

function run(program: string, args: string[]): void {
  const r = spawnSync(program, args, { cwd: dir, encoding: 'utf8', timeout: 60_000 })
  if (r.status !== 0) throw new Error(`${program} ${args.join(' ')}: ${r.stderr}`)
}

/** The whole guest disk of an image held in memory, read through the engine. */
function guestBytes(file: MemoryBlockFile, name: string): Buffer {
  const image = Qcow2Image.openFile(file.readOnlyView(name), path.join(dir, name), { readOnly: true })
  try {
    const out = Buffer.alloc(image.virtualSize)
    image.readSync(out, 0)
    return out
  } finally {
    image.closeSync()
  }
}

interface CrashCase {
  name: string
  /** The image damaged (default base.qcow2). */
  base?: string
  damage(image: string): void
}

const dataCluster = (image: string, guestCluster: number): number => hostClusterOf(image, readL2Entry(image, guestCluster).descriptor)

/** Refcount table entry 0 (the first refcount block's offset). */
function firstBlockEntry(image: string): bigint {
  const buf = Buffer.alloc(8)
  const fd = openSync(image, 'r')
  try {
    readSync(fd, buf, 0, 8, readHeader(image).refcountTableOffset)
  } finally {
    closeSync(fd)
  }
  return buf.readBigUInt64BE(0)
}

const crashCases: CrashCase[] = [
  { name: 'refcount 0 on a data cluster (rebuild)', damage: (image) => setRefcount(image, dataCluster(image, 0), 0) },
  {
    name: 'refcount table entry with reserved bits (rebuild around the named block)',
    damage: (image) => writeBigEndian(image, readHeader(image).refcountTableOffset, 8, firstBlockEntry(image) | 1n),
  },
  {
    name: 'refcount block at an unaligned offset (rebuild around it)',
    damage: (image) => writeBigEndian(image, readHeader(image).refcountTableOffset, 8, firstBlockEntry(image) + 0x200n),
  },
  {
    name: 'refcounts too high and too low (in place)',
    damage: (image) => {
      setRefcount(image, dataCluster(image, 0), 3)
      setRefcount(image, appendCluster(image), 1)
    },
  },
  {
    name: 'snapshot table entry without its extra data (the table is rewritten)',
    base: 'snap-base.qcow2',
    damage: (image) => shrinkFirstSnapshotExtraData(image, 8),
  },
  {
    name: 'dirty lazy-refcounts image with refcounts never written',
    damage: (image) => {
      setRefcount(image, dataCluster(image, 0), 0)
      setRefcount(image, dataCluster(image, 1), 0)
      setIncompatibleBits(image, DIRTY_BIT)
    },
  },
]

describe.skipIf(!qemu)('repair crash safety', () => {
  beforeAll(async () => {
    dir = await makeTempDir('repair-crash')
    run(qemu!.qemuImg, ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096,lazy_refcounts=on', 'base.qcow2', '2M'])
    run(qemu!.qemuIo, ['-f', 'qcow2', '-c', 'write -P 1 0 64k', '-c', 'write -P 2 1M 12k', '-c', 'write -c -P 3 512k 4k', 'base.qcow2'])
    run(qemu!.qemuImg, ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', 'snap-base.qcow2', '2M'])
    run(qemu!.qemuIo, ['-f', 'qcow2', '-c', 'write -P 1 0 64k', 'snap-base.qcow2'])
    run(qemu!.qemuImg, ['snapshot', '-c', 'one', 'snap-base.qcow2'])
    run(qemu!.qemuIo, ['-f', 'qcow2', '-c', 'write -P 2 8k 8k', 'snap-base.qcow2'])
  })
  afterAll(async () => {
    if (dir) await removeTempDir(dir)
  })

  for (const c of crashCases) {
    it(c.name, () => {
      const imagePath = path.join(dir, `${c.name.replace(/[^a-z0-9]+/gi, '-')}.qcow2`)
      copyFileSync(path.join(dir, c.base ?? 'base.qcow2'), imagePath)
      const guest = guestBytes(MemoryBlockFile.fromFile(imagePath), 'base.qcow2')
      c.damage(imagePath)
      const damagedBytes = readFileSync(imagePath)
      const damaged = MemoryBlockFile.fromBytes(imagePath, damagedBytes, { readOnly: true })
      const before = checkImage(damaged, imagePath)
      expect(before.corruptions + before.checkErrors + before.leaks).toBeGreaterThan(0)

      // Clusters the image uses, and clusters the old refcount table names.
      const pass = new CheckPass(damaged, imagePath, () => {})
      pass.calculate(NO_FIX)
      const clusterSize = pass.layout.geometry.clusterSize
      const protectedClusters = new Set<number>()
      for (let cluster = 0; cluster < pass.clusterCount; cluster++) if (pass.computed[cluster]! > 0) protectedClusters.add(cluster)
      for (let i = 0; i < pass.onDisk.tableEntries; i++) {
        const blockOffset = pass.onDisk.blockOffset(i)
        if (blockOffset !== 0) protectedClusters.add(Math.floor(blockOffset / clusterSize))
      }

      const recording = new RecordingFile(MemoryBlockFile.fromBytes(imagePath, damagedBytes))
      const result = repairImage(recording, imagePath, 'all')
      expect(result.counts.corruptions + result.counts.leaks + result.counts.checkErrors).toBe(0)
      const changes = recording.changes
      expect(changes.length).toBeGreaterThan(0)

      const switchIndex = changes.findIndex((ch) => ch.kind === 'write' && ch.tag === 'header' && ch.hostOffset === HeaderOffset.refcountTableOffset)
      for (const change of changes.slice(0, switchIndex < 0 ? 0 : switchIndex)) {
        expect(change.kind).toBe('write')
        if (change.kind !== 'write') continue
        const first = Math.floor(change.hostOffset / clusterSize)
        const last = Math.floor((change.hostOffset + change.bytes.length - 1) / clusterSize)
        for (let cluster = first; cluster <= last; cluster++) {
          expect(protectedClusters.has(cluster), `write to cluster ${cluster} (${change.tag}) before the switch`).toBe(false)
        }
      }

      for (let k = 0; k <= changes.length; k++) {
        const crashed = MemoryBlockFile.fromBytes(imagePath, damagedBytes)
        replayChanges(crashed, changes, 0, k)
        const after = checkImage(crashed, imagePath)
        expect(after.corruptions, `crash after change ${k}`).toBeLessThanOrEqual(before.corruptions)
        // Refcounts under an unreadable block are check errors: more of them only as the file grows.
        const clustersAdded = Math.ceil(crashed.size / clusterSize) - Math.ceil(damaged.size / clusterSize)
        expect(after.checkErrors, `crash after change ${k}`).toBeLessThanOrEqual(before.checkErrors + clustersAdded)
        expect(guestBytes(crashed, path.basename(imagePath)).equals(guest), `guest data after change ${k}`).toBe(true)
        if (k === Math.floor(changes.length / 2) || k === switchIndex) {
          const again = repairImage(crashed, imagePath, 'all').counts
          expect(again.corruptions + again.leaks + again.checkErrors, `second repair after change ${k}`).toBe(0)
        }
      }
    })
  }
})

/*
 * The checker against `qemu-img check` on images damaged in known ways.
 *
 * Each case copies a base image made by qemu-img/qemu-io, damages it (test/helpers/damage.ts)
 * and requires:
 *   1. our counts equal qemu-img's: every key of `qemu-img check --output=json` (leaks,
 *      corruptions, check-errors, allocated/fragmented/compressed clusters, image end offset,
 *      total clusters) and the exit code; the problem lines too, where the case lists them;
 *   2. for each repair mode, our repair of one copy and `qemu-img check -r MODE` of another
 *      end alike: the same leaks-fixed / corruptions-fixed and the same result of a plain
 *      `qemu-img check` afterwards (clean, or the same corruptions left where qemu-img cannot
 *      repair them either), unless the case documents why not;
 *   3. after the repair, `qemu-img compare` with the raw contents from before the damage says
 *      identical, when the damage did not destroy data.
 */
import { closeSync, copyFileSync, openSync, readSync, writeFileSync } from 'node:fs'
import * as path from 'node:path'
import { spawnSync } from 'node:child_process'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { checkImage, type CheckCounts } from '../../lib/check/check.js'
import { repairImage, type RepairMode } from '../../lib/check/repair.js'
import { NodeBlockFile } from '../../lib/io/block-file.js'
import { checkExitCode, checkJson } from '../../cli/commands/check.js'
import {
  CORRUPT_BIT,
  appendCluster,
  hostClusterOf,
  readHeader,
  readL1Entry,
  readL2Entry,
  refcountOf,
  setIncompatibleBits,
  setRefcount,
  shrinkFirstSnapshotExtraData,
  writeBigEndian,
  writeL1Entry,
  writeL2Entry,
} from '../helpers/damage.js'
import { makeTempDir, removeTempDir, requireQemu } from '../helpers/qemu.js'

const qemu = requireQemu('qcow2fs check vs qemu-img check')

const KiB = 1024
const MiB = 1024 * KiB
const COPIED = 1n << 63n

let dir = ''

function inDir(name: string): string {
  return path.join(dir, name)
}

/** Runs qemu-img (or qemu-io) in the temp dir; returns status and output. */
function tool(program: string, args: string[]): { status: number; stdout: string; stderr: string } {
  const r = spawnSync(program, args, { cwd: dir, encoding: 'utf8', timeout: 60_000 })
  if (r.error) throw r.error
  return { status: r.status ?? -1, stdout: r.stdout, stderr: r.stderr }
}

function img(...args: string[]): string {
  const r = tool(qemu!.qemuImg, args)
  if (r.status !== 0) throw new Error(`qemu-img ${args.join(' ')}: ${r.stderr}`)
  return r.stdout
}

function io(image: string, ...commands: string[]): void {
  const r = tool(qemu!.qemuIo, ['-f', 'qcow2', ...commands.flatMap((c) => ['-c', c]), image])
  if (r.status !== 0) throw new Error(`qemu-io ${commands.join('; ')}: ${r.stderr}`)
}

/** qemu-img check [-r MODE] --output=json: the parsed keys (filename removed) and the status. */
function qemuCheck(image: string, repair?: RepairMode): { status: number; json: Record<string, unknown> | undefined; stderr: string } {
  const r = tool(qemu!.qemuImg, ['check', ...(repair ? ['-r', repair] : []), '--output=json', image])
  let json: Record<string, unknown> | undefined
  if (r.stdout.trim() !== '') {
    json = JSON.parse(r.stdout) as Record<string, unknown>
    delete json.filename
  }
  return { status: r.status, json, stderr: r.stderr }
}

function ourJson(counts: CheckCounts): Record<string, unknown> {
  const json: Record<string, unknown> = checkJson(counts, 'x')
  delete json.filename
  return json
}

/** Our check of an image (the library, as the CLI runs it), with its problem lines. */
function ourCheck(image: string): { counts: CheckCounts; lines: string[] } {
  const lines: string[] = []
  const file = NodeBlockFile.open(inDir(image), { readOnly: true })
  try {
    return { counts: checkImage(file, image, (line) => lines.push(line)), lines }
  } finally {
    file.close()
  }
}

function ourRepair(image: string, mode: RepairMode): { counts?: CheckCounts; error?: string } {
  const file = NodeBlockFile.open(inDir(image), { readOnly: false })
  try {
    return { counts: repairImage(file, image, mode).counts }
  } catch (err) {
    return { error: (err as Error).message }
  } finally {
    file.close()
  }
}

// ---- base images ------------------------------------------------------------------------------

interface Base {
  image: string
  /** Raw contents before any damage. */
  raw: string
}

const bases = new Map<string, Base>()

function makeBase(name: string, build: (image: string) => void): void {
  const image = `${name}.qcow2`
  build(image)
  const raw = `${name}.raw`
  img('convert', '-O', 'raw', image, raw)
  bases.set(name, { image, raw })
}

function buildBases(): void {
  // 64 KiB clusters: data over two clusters, a partial cluster, a zero cluster, a compressed one.
  makeBase('std', (image) => {
    img('create', '-q', '-f', 'qcow2', image, '4M')
    io(image, 'write -P 1 0 128k', 'write -P 2 256k 64k', 'write -z 512k 64k', 'write -c -P 3 1M 64k', 'write -P 4 2M 4k')
  })
  // Extended L2: allocated, zero and unallocated subclusters, a compressed cluster.
  makeBase('el2', (image) => {
    img('create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on', image, '4M')
    io(image, 'write -P 1 0 128k', 'write -P 2 256k 8k', 'write -z 264k 4k', 'write -z 512k 64k', 'write -c -P 3 1M 64k')
  })
  // Two internal snapshots sharing clusters with the active image (refcount 2 is right).
  makeBase('snap', (image) => {
    img('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=16384', image, '2M')
    io(image, 'write -P 1 0 256k', 'write -c -P 5 512k 16k')
    img('snapshot', '-c', 'one', image)
    io(image, 'write -P 2 16k 16k')
    img('snapshot', '-c', 'two', image)
    io(image, 'write -P 3 64k 4k')
  })
  // Version 2 (compat 0.10) with a snapshot and a compressed cluster.
  makeBase('v2', (image) => {
    img('create', '-q', '-f', 'qcow2', '-o', 'compat=0.10,cluster_size=4096', image, '2M')
    io(image, 'write -P 1 0 64k', 'write -c -P 7 128k 4k')
    img('snapshot', '-c', 'a', image)
    io(image, 'write -P 2 8k 8k')
  })
  // Every refcount width (4 KiB clusters: several refcount blocks for the narrow ones).
  for (const bits of [1, 2, 4, 8, 16, 32, 64]) {
    makeBase(`r${bits}`, (image) => {
      img('create', '-q', '-f', 'qcow2', '-o', `cluster_size=4096,refcount_bits=${bits}`, image, '8M')
      io(image, 'write -P 1 0 64k', 'write -P 2 1M 12k', 'write -P 3 6M 200k')
      if (bits > 1) io(image, 'write -c -P 7 512k 4k', 'write -c -P 8 516k 4k')
    })
  }
  // An overlay over `std` (its own clusters only are counted).
  makeBase('overlay', (image) => {
    img('create', '-q', '-f', 'qcow2', '-b', 'std.qcow2', '-F', 'qcow2', image)
    io(image, 'write -P 9 64k 64k', 'write -z 256k 64k')
  })
  // External data file: data clusters are not refcounted.
  makeBase('datafile', (image) => {
    img('create', '-q', '-f', 'qcow2', '-o', 'data_file=datafile.data', image, '4M')
    io(image, 'write -P 9 64k 128k', 'write -z 1M 64k')
  })
  // Persistent dirty bitmaps (their directory, tables and data clusters are counted).
  makeBase('bitmaps', (image) => {
    img('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', image, '64M')
    io(image, 'write -P 1 0 64k')
    img('bitmap', '--add', image, 'b0')
    img('bitmap', '--add', '-g', '512', image, 'b1')
    io(image, 'write -P 5 3M 64k', 'write -P 6 40M 8k')
  })
}

// ---- damage -----------------------------------------------------------------------------------

/** Host cluster of guest cluster `guestCluster`'s data. */
function dataCluster(image: string, guestCluster: number): number {
  return hostClusterOf(image, readL2Entry(image, guestCluster).descriptor)
}

interface Case {
  name: string
  base: string
  damage(image: string): void
  /** Problem lines our check must print (in order, a subset of all lines). */
  lines?: string[]
  /** The damage leaves the guest data as it was (so the repaired image must read the same). */
  dataIntact: boolean
  /**
   * Known differences of the repair from qemu-img's, per mode: 'repairs' when qemu-img's
   * repair fails but ours works (the result must then be clean), or a note explaining why the
   * fixed counts differ (then only the final state is compared).
   */
  repairDiffers?: Partial<Record<RepairMode, { ours: 'repairs' | 'same-result'; why: string }>>
}

const cases: Case[] = [
  { name: 'clean', base: 'std', damage: () => {}, dataIntact: true },
  {
    name: 'refcount too high (a leak and a wrong COPIED flag)',
    base: 'std',
    damage: (image) => setRefcount(image, dataCluster(image, 0), 2),
    lines: ['Leaked cluster 5 refcount=2 reference=1', 'ERROR OFLAG_COPIED data cluster: l2_entry=8000000000050000 refcount=2'],
    dataIntact: true,
  },
  {
    name: 'refcount too low (0: the refcount structure must be rebuilt)',
    base: 'std',
    damage: (image) => setRefcount(image, dataCluster(image, 0), 0),
    lines: ['ERROR cluster 5 refcount=0 reference=1'],
    dataIntact: true,
  },
  {
    name: 'refcount too low on a cluster shared with snapshots',
    base: 'snap',
    damage: (image) => setRefcount(image, dataCluster(image, 8), 1),
    dataIntact: true,
  },
  {
    name: 'leaked cluster',
    base: 'std',
    damage: (image) => setRefcount(image, appendCluster(image), 1),
    lines: ['Leaked cluster 10 refcount=1 reference=0'],
    dataIntact: true,
  },
  {
    name: 'a cluster referenced by two L2 entries',
    base: 'std',
    damage: (image) => writeL2Entry(image, 3, readL2Entry(image, 0)),
    lines: ['ERROR cluster 5 refcount=1 reference=2'],
    dataIntact: false,
  },
  {
    name: 'L2 entry past the end of the file',
    base: 'std',
    damage: (image) => writeL2Entry(image, 0, { descriptor: COPIED | 0x1000_0000n, bitmap: 0n }),
    lines: ['ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x10000000 size 0x10000'],
    dataIntact: false,
  },
  {
    name: 'misaligned data cluster (qemu-img does not repair it)',
    base: 'std',
    damage: (image) => writeL2Entry(image, 0, { descriptor: readL2Entry(image, 0).descriptor + 0x200n, bitmap: 0n }),
    lines: ['ERROR offset=50200: Data cluster is not properly aligned; L2 entry corrupted.'],
    dataIntact: false,
  },
  {
    name: 'misaligned preallocated zero cluster (repair makes it a plain zero cluster)',
    base: 'std',
    damage: (image) => writeL2Entry(image, 8, { descriptor: COPIED | 0x70201n, bitmap: 0n }),
    lines: ['ERROR offset=70200: Preallocated cluster is not properly aligned; L2 entry corrupted.'],
    dataIntact: true,
  },
  {
    name: 'L2 table overlapping the refcount table',
    base: 'std',
    damage: (image) => writeL1Entry(image, 0, COPIED | BigInt(readHeader(image).refcountTableOffset)),
    lines: [
      'ERROR refcount block 0 refcount=2',
      'Overlap: cluster 1 is used as an L2 table and as the refcount table',
      'ERROR cluster 1 refcount=1 reference=2',
    ],
    dataIntact: false,
  },
  {
    name: 'L1 and L2 entries with reserved bits',
    base: 'std',
    damage: (image) => {
      writeL1Entry(image, 0, readL1Entry(image, 0) | 1n)
      writeL2Entry(image, 0, { descriptor: readL2Entry(image, 0).descriptor | 2n, bitmap: 0n })
    },
    lines: ['ERROR found L1 entry with reserved bits set: 8000000000040001', 'ERROR found l2 entry with reserved bits set: 8000000000050002'],
    dataIntact: true,
  },
  {
    name: 'compressed descriptor with COPIED set',
    base: 'std',
    damage: (image) => writeL2Entry(image, 16, { descriptor: readL2Entry(image, 16).descriptor | COPIED, bitmap: 0n }),
    lines: ['ERROR: coffset=0x80000: copied flag must never be set for compressed clusters'],
    dataIntact: true,
  },
  {
    name: 'compressed descriptor past the end of the file',
    base: 'std',
    damage: (image) => writeL2Entry(image, 16, { descriptor: (1n << 62n) | 0x1000_0000n, bitmap: 0n }),
    dataIntact: false,
  },
  {
    name: 'refcount table entry with reserved bits',
    base: 'std',
    damage: (image) => writeBigEndian(image, readHeader(image).refcountTableOffset, 8, 0x20001n),
    lines: ['ERROR refcount table entry 0 has reserved bits set'],
    dataIntact: true,
    repairDiffers: {
      all: {
        ours: 'repairs',
        why: "qemu-img's rebuild puts the new block on the cluster the broken entry still names, which its overlap check refuses",
      },
    },
  },
  {
    name: 'refcount block at an unaligned offset (check errors)',
    base: 'std',
    damage: (image) => writeBigEndian(image, readHeader(image).refcountTableOffset, 8, 0x20200n),
    lines: ['ERROR refcount block 0 is not cluster aligned; refcount table entry corrupted', "Can't get refcount for cluster 0: Input/output error"],
    dataIntact: true,
    repairDiffers: {
      all: { ours: 'repairs', why: "qemu-img's rebuild fails: its overlap check cannot read the unaligned block (Check failed: Input/output error)" },
    },
  },
  {
    name: 'refcount block outside the image',
    base: 'std',
    damage: (image) => writeBigEndian(image, readHeader(image).refcountTableOffset, 8, 0x1000_0000n),
    lines: ['ERROR refcount block 0 is outside image'],
    dataIntact: true,
    repairDiffers: {
      all: {
        ours: 'same-result',
        why: 'qemu-img grows the file to take the block in and counts that as one more fix; ours rebuilds the structure without it',
      },
    },
  },
  {
    name: 'refcount block shared by two table entries',
    base: 'std',
    damage: (image) => writeBigEndian(image, readHeader(image).refcountTableOffset + 8, 8, 0x20000n),
    lines: ['ERROR refcount block 1 refcount=2'],
    dataIntact: true,
  },
  {
    name: 'extended L2: a subcluster both allocated and zero',
    base: 'el2',
    damage: (image) => writeL2Entry(image, 4, { descriptor: readL2Entry(image, 4).descriptor, bitmap: 0x0000_0003_0000_0003n }),
    lines: ['ERROR offset=70000: Allocated cluster has corrupted subcluster allocation bitmap'],
    dataIntact: false,
  },
  {
    name: 'extended L2: allocation bits without a host cluster',
    base: 'el2',
    damage: (image) => writeL2Entry(image, 5, { descriptor: 0n, bitmap: 1n }),
    lines: ['ERROR: Unallocated cluster has non-zero subcluster allocation map'],
    dataIntact: false,
  },
  {
    name: 'extended L2: compressed cluster with subcluster bits',
    base: 'el2',
    damage: (image) => writeL2Entry(image, 16, { descriptor: readL2Entry(image, 16).descriptor, bitmap: 1n << 32n }),
    lines: ['ERROR compressed cluster 16 with non-zero subcluster allocation bitmap, entry=0x4000000000080000'],
    dataIntact: false,
  },
  { name: 'snapshots sharing clusters (refcount 2 is right)', base: 'snap', damage: () => {}, dataIntact: true },
  {
    name: 'snapshot: refcount of a shared cluster too high',
    base: 'snap',
    damage: (image) => setRefcount(image, dataCluster(image, 8), refcountOf(image, dataCluster(image, 8)) + 1),
    dataIntact: true,
  },
  {
    name: 'version 3 snapshot table entry without its 16 bytes of extra data (repair rewrites the table)',
    base: 'snap',
    damage: (image) => shrinkFirstSnapshotExtraData(image, 8),
    lines: ['ERROR snapshot table entry 0 is incomplete'],
    dataIntact: true,
  },
  { name: 'version 2 image with a snapshot', base: 'v2', damage: () => {}, dataIntact: true },
  {
    name: 'version 2 image: shared cluster refcount too low',
    base: 'v2',
    damage: (image) => setRefcount(image, dataCluster(image, 0), 1),
    dataIntact: true,
  },
  ...[1, 2, 4, 8, 16, 32, 64].flatMap((bits): Case[] => [
    { name: `refcount_bits=${bits}: clean`, base: `r${bits}`, damage: () => {}, dataIntact: true },
    {
      name: `refcount_bits=${bits}: leaked cluster and a refcount too low`,
      base: `r${bits}`,
      damage: (image) => {
        setRefcount(image, appendCluster(image), 1)
        const cluster = dataCluster(image, 1536)
        setRefcount(image, cluster, refcountOf(image, cluster) - 1)
      },
      dataIntact: true,
    },
  ]),
  { name: 'backing file: the overlay alone is counted', base: 'overlay', damage: () => {}, dataIntact: true },
  {
    name: 'backing file: leak in the overlay',
    base: 'overlay',
    damage: (image) => setRefcount(image, appendCluster(image), 1),
    dataIntact: true,
  },
  { name: 'external data file', base: 'datafile', damage: () => {}, dataIntact: true },
  {
    name: 'external data file: data cluster entry without COPIED',
    base: 'datafile',
    damage: (image) => writeL2Entry(image, 1, { descriptor: readL2Entry(image, 1).descriptor & ~COPIED, bitmap: 0n }),
    dataIntact: true,
  },
  { name: 'persistent bitmaps', base: 'bitmaps', damage: () => {}, dataIntact: true },
  {
    name: 'persistent bitmaps: a bitmap data cluster with refcount 0',
    base: 'bitmaps',
    damage: (image) => setRefcount(image, bitmapDataCluster(image), 0),
    dataIntact: true,
  },
  {
    name: 'image marked corrupt, nothing else wrong (repair clears the bit)',
    base: 'std',
    damage: (image) => setIncompatibleBits(image, CORRUPT_BIT),
    dataIntact: true,
  },
]

/** A host cluster holding bitmap data: the first non-zero entry of the first bitmap table. */
function bitmapDataCluster(image: string): number {
  const { clusterSize } = readHeader(image)
  // Header extensions start at header_length; the bitmaps extension names the directory.
  const fd = openSync(image, 'r')
  try {
    const head = Buffer.alloc(clusterSize)
    readSync(fd, head, 0, clusterSize, 0)
    let at = head.readUInt32BE(100)
    for (;;) {
      const type = head.readUInt32BE(at)
      const length = head.readUInt32BE(at + 4)
      if (type === 0) throw new Error('no bitmaps extension')
      if (type === 0x23852875) {
        const directoryOffset = Number(head.readBigUInt64BE(at + 8 + 16))
        const dirEntry = Buffer.alloc(24)
        readSync(fd, dirEntry, 0, 24, directoryOffset)
        const tableOffset = Number(dirEntry.readBigUInt64BE(0))
        const tableEntries = dirEntry.readUInt32BE(8)
        const table = Buffer.alloc(tableEntries * 8)
        readSync(fd, table, 0, table.length, tableOffset)
        for (let i = 0; i < tableEntries; i++) {
          const offset = Number(table.readBigUInt64BE(i * 8) & 0x00ff_ffff_ffff_fe00n)
          if (offset !== 0) return offset / clusterSize
        }
        throw new Error('bitmap has no data cluster')
      }
      at += 8 + Math.ceil(length / 8) * 8
    }
  } finally {
    closeSync(fd)
  }
}

describe.skipIf(!qemu)('qcow2fs check against qemu-img check', () => {
  beforeAll(async () => {
    dir = await makeTempDir('check')
    buildBases()
  })
  afterAll(async () => {
    if (dir) await removeTempDir(dir)
  })

  for (const c of cases) {
    const slug = c.name.replace(/[^A-Za-z0-9]+/g, '-').toLowerCase()
    it(c.name, () => {
      const base = bases.get(c.base)!
      const damaged = `${slug}.qcow2`
      copyFileSync(inDir(base.image), inDir(damaged))
      c.damage(inDir(damaged))

      // 1. The same counts and exit code as qemu-img check.
      const theirs = qemuCheck(damaged)
      const ours = ourCheck(damaged)
      expect(ourJson(ours.counts), `qemu-img said:\n${theirs.stderr}\nwe said:\n${ours.lines.join('\n')}`).toEqual(theirs.json)
      expect(checkExitCode(ours.counts)).toBe(theirs.status)
      for (const line of c.lines ?? []) expect(ours.lines).toContain(line)

      // 2. and 3. Each repair mode against qemu-img's repair of the same damage.
      for (const mode of ['leaks', 'all'] as const) {
        const oursRepaired = `${slug}-ours-${mode}.qcow2`
        const theirsRepaired = `${slug}-qemu-${mode}.qcow2`
        copyFileSync(inDir(damaged), inDir(oursRepaired))
        copyFileSync(inDir(damaged), inDir(theirsRepaired))
        const repaired = ourRepair(oursRepaired, mode)
        const theirRepair = qemuCheck(theirsRepaired, mode)
        const after = qemuCheck(oursRepaired)
        const differs = c.repairDiffers?.[mode]
        const where = `${mode} repair; qemu-img -r said:\n${theirRepair.stderr}`
        if (differs?.ours === 'repairs') {
          // qemu-img cannot; ours must leave a clean image.
          expect(theirRepair.status, where).toBe(1)
          expect(repaired.error, where).toBeUndefined()
          expect(after.status, where).toBe(0)
        } else if (theirRepair.json === undefined) {
          // qemu-img's repair failed (the structure needs `all`): ours must fail too, unchanged.
          expect(repaired.error, where).toBeDefined()
          expect(qemuCheck(oursRepaired).json).toEqual(theirs.json)
          continue
        } else {
          expect(repaired.error, where).toBeUndefined()
          const ourResult = ourJson(repaired.counts!)
          if (differs === undefined) {
            expect(ourResult, where).toEqual(theirRepair.json)
          } else {
            expect(ourResult['corruptions'], where).toEqual(theirRepair.json['corruptions'])
            expect(ourResult['leaks'], where).toEqual(theirRepair.json['leaks'])
          }
          // A plain qemu-img check afterwards finds what it finds after its own repair.
          expect(after.status, where).toBe(qemuCheck(theirsRepaired).status)
          expect(after.json?.['corruptions'], where).toEqual(qemuCheck(theirsRepaired).json?.['corruptions'])
          expect(after.json?.['leaks'], where).toEqual(qemuCheck(theirsRepaired).json?.['leaks'])
        }
        if (c.dataIntact && after.status === 0) {
          const compare = tool(qemu!.qemuImg, ['compare', '-f', 'qcow2', '-F', 'raw', oursRepaired, base.raw])
          expect(compare.status, `${mode}: ${compare.stdout}${compare.stderr}`).toBe(0)
        }
      }
    })
  }

  it('repair clears the dirty bit of a lazy-refcounts image killed while writing', () => {
    const image = 'lazy.qcow2'
    img('create', '-q', '-f', 'qcow2', '-o', 'lazy_refcounts=on', image, '4M')
    // qemu-io dies by SIGKILL after the write: the dirty bit stays, refcounts were never written.
    const killed = tool(qemu!.qemuIo, ['-f', 'qcow2', '-c', 'write -P 0x61 0 192k', '-c', 'sigraise 9', image])
    expect(killed.status).not.toBe(0)
    expect(readHeader(inDir(image)).incompatibleFeatures & 1n).toBe(1n)
    const before = ourCheck(image)
    expect(ourJson(before.counts)).toEqual(qemuCheck(image).json)
    expect(before.counts.corruptions).toBeGreaterThan(0)
    copyFileSync(inDir(image), inDir('lazy-qemu.qcow2'))
    const repaired = ourRepair(image, 'all')
    expect(ourJson(repaired.counts!)).toEqual(qemuCheck('lazy-qemu.qcow2', 'all').json)
    expect(readHeader(inDir(image)).incompatibleFeatures & 1n).toBe(0n)
    expect(qemuCheck(image).status).toBe(0)
    writeFileSync(inDir('lazy-expected.raw'), Buffer.concat([Buffer.alloc(192 * KiB, 0x61), Buffer.alloc(4 * MiB - 192 * KiB)]))
    expect(tool(qemu!.qemuImg, ['compare', '-f', 'qcow2', '-F', 'raw', image, 'lazy-expected.raw']).status).toBe(0)
  })
})

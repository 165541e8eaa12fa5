/*
 * Extended L2 entries (subcluster bitmaps): the scenarios of qemu-iotests 271, replayed through
 * our engine (Qcow2Image.write / writeZeroes) on images made by
 * `qemu-img create -f qcow2 -o extended_l2=on`, with and without a raw backing file of 0xff.
 *
 * Every step runs three ways at once:
 *   - on our image, through the engine;
 *   - on a twin image, through qemu-io with 271's own command (the oracle);
 *   - on a raw model in memory (a Buffer).
 * After each step (our image flushed, still open) the test reads the 16-byte L2 entries of the
 * clusters the step names straight from the file (test/helpers/l2-inspect.ts, not the engine)
 * and compares their alloc and zero bitmaps with the expected ones: ours, and QEMU's for the
 * twin (the 271 values). Where the two differ the table says so, and why. Then, for both
 * images: `qemu-img compare` with the model, `qemu-img check` (no errors, no corruptions, no
 * leaks), and `qemu-img map --output=json` against the bitmaps on disk and the model (a zero
 * subcluster maps as zero and the model is zero there, an allocated one maps as data at its
 * host offset and the file holds the model's bytes there, an unallocated one maps to the
 * backing file or as an unallocated zero); our engine must also read the whole disk as the
 * model.
 *
 * Our engine has no discard/unmap and no compressed writes (FUSE has no fallocate):
 *   - "unmap" (qemu-io write -z -u) and "discard" steps use writeZeroes on our image. Our
 *     documented semantics (lib/engine/write-path.ts): zero writes covering whole subclusters
 *     set their zero bits and clear their alloc bits; a cluster whose 32 subclusters all end
 *     up zero releases its host cluster (offset 0, zero bits 0-31). QEMU keeps the host
 *     cluster after write -z without -u; discard and write -z -u release it as we do.
 *   - "compress" steps close our image, run qemu-io write -c on it, and reopen it.
 *
 * The corrupted-entry group works on images written by qemu-io and then poked by hand (as 271
 * does); it reads and writes them through our engine only.
 */
import { execFile } from 'node:child_process'
import { createHash } from 'node:crypto'
import * as fs from 'node:fs'
import * as path from 'node:path'
import { afterAll, beforeAll, describe, expect, test } from 'vitest'
import { CorruptImageError, ReadOnlyError } from '../../lib/errors.js'
import { Qcow2Image } from '../../lib/image.js'
import { type BlockFile, NodeBlockFile } from '../../lib/io/block-file.js'
import { CountingFile } from '../helpers/counting-file.js'
import {
  type L2EntryOnDisk,
  entryFileOffset,
  formatBits,
  isMarkedCorrupt,
  parseBits,
  pokeFile,
  pokeFileBigEndian,
  readEntries,
  readEntry,
  subclusterKind,
} from '../helpers/l2-inspect.js'
import { type QemuTools, makeTempDir, qemuInfo, qemuImg as runQemuImg, qemuIo as runQemuIo, removeTempDir, requireQemu } from '../helpers/qemu.js'

const KiB = 1024
const CLUSTER = 64 * KiB
const SUBCLUSTER = 2 * KiB

const qemu = requireQemu('extended L2 subclusters (qemu-iotests 271)')
const describeQemu = describe.skipIf(!qemu)
const tools = (): QemuTools => qemu as QemuTools
const qemuImg = (args: string[]): Promise<string> => runQemuImg(tools(), args)
const qemuIo = (image: string, commands: string[]): Promise<string> => runQemuIo(tools(), image, commands)

let dir: string
beforeAll(async () => {
  dir = await makeTempDir('subclusters')
})
afterAll(async () => {
  await removeTempDir(dir)
})

/** qemu-img with its exit code and both outputs (check exits 2 or 3 when it finds problems). */
function qemuImgStatus(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(tools().qemuImg, args, { encoding: 'utf8', maxBuffer: 16 * 1024 * 1024, timeout: 60_000 }, (err, stdout, stderr) => {
      const code = err ? (typeof err.code === 'number' ? err.code : -1) : 0
      resolve({ code, stdout, stderr })
    })
  })
}

// ---- the steps ----

/** 271's commands: write -P n, write -z, write -z -u, write -c -P n, discard. */
type Command = 'write' | 'zero' | 'unmap' | 'compress' | 'discard'

interface Bits {
  /** Subclusters with the allocation bit, in 271's list notation ('0-9,16'). */
  alloc: string
  /** Subclusters with the "reads as zeros" bit. */
  zero: string
}

interface ClusterExpectation extends Bits {
  /** Guest cluster whose entry is checked. */
  c: number
  /** The entry is a compressed descriptor (bitmap 0), on both images. */
  compressed?: boolean
  /** Our entry has (true) or has no (false) host cluster offset; unchecked when absent. */
  host?: boolean
  /** QEMU's bitmaps (271's expectation) when they differ from ours; the twin is checked against them. */
  qemu?: Bits
  /** QEMU's entry has (true) or has no (false) host cluster offset; unchecked when absent. */
  qemuHost?: boolean
}

interface Step {
  cmd: Command
  /** 271's offset notation: cluster c, subcluster sc (2 KiB), plus off KiB. */
  c?: number
  sc?: number
  off?: number
  len: number
  expect: ClusterExpectation[]
}

function stepOffset(step: Step): number {
  return (step.c ?? 0) * CLUSTER + (step.sc ?? 0) * SUBCLUSTER + (step.off ?? 0) * KiB
}

function describeStep(step: Step): string {
  return `${step.cmd} c=${step.c ?? 0} sc=${step.sc ?? 0} off=${step.off ?? 0}k len=${step.len}`
}

const ALL = '0-31'
const each = (clusters: number[], bits: Omit<ClusterExpectation, 'c'>): ClusterExpectation[] => clusters.map((c) => ({ c, ...bits }))

/**
 * 271 "Standard write tests": cluster 0 of a 1M image. Ours and QEMU's bitmaps agree on every
 * step, with and without the backing file.
 */
const standardSteps: Step[] = [
  { cmd: 'write', sc: 0, len: 1 * KiB, expect: [{ c: 0, alloc: '0', zero: '', host: true }] },
  { cmd: 'write', sc: 1, off: 1, len: 512, expect: [{ c: 0, alloc: '0-1', zero: '' }] },
  { cmd: 'write', sc: 2, off: 1, len: 1 * KiB, expect: [{ c: 0, alloc: '0-2', zero: '' }] },
  { cmd: 'write', sc: 3, len: 2 * KiB, expect: [{ c: 0, alloc: '0-3', zero: '' }] },
  { cmd: 'write', sc: 4, len: 6 * KiB, expect: [{ c: 0, alloc: '0-6', zero: '' }] },
  { cmd: 'write', sc: 7, off: 1, len: 4 * KiB, expect: [{ c: 0, alloc: '0-9', zero: '' }] },
  { cmd: 'write', sc: 16, len: 1 * KiB, expect: [{ c: 0, alloc: '0-9,16', zero: '' }] },
  // Crosses into cluster 1.
  { cmd: 'write', sc: 31, off: 1, len: 4 * KiB, expect: [{ c: 0, alloc: '0-9,16,31', zero: '' }, { c: 1, alloc: '0-1', zero: '' }] },
  { cmd: 'zero', sc: 1, len: 2 * KiB, expect: [{ c: 0, alloc: '0,2-9,16,31', zero: '1', host: true }] },
  // QEMU keeps the host cluster here (write -z without -u); ours releases it (all 32 zero).
  { cmd: 'zero', sc: 0, len: 64 * KiB, expect: [{ c: 0, alloc: '', zero: ALL, host: false, qemuHost: true }] },
  { cmd: 'write', sc: 0, len: 64 * KiB, expect: [{ c: 0, alloc: ALL, zero: '', host: true }] },
  // "this won't unmap it": half a cluster keeps the host cluster, in both engines.
  { cmd: 'unmap', sc: 0, len: 32 * KiB, expect: [{ c: 0, alloc: '16-31', zero: '0-15', host: true, qemuHost: true }] },
  { cmd: 'unmap', sc: 0, len: 64 * KiB, expect: [{ c: 0, alloc: '', zero: ALL, host: false, qemuHost: false }] },
  // Into an all-zero cluster without host offset: the partial subcluster is completed with zeros.
  { cmd: 'write', sc: 1, off: 1, len: 512, expect: [{ c: 0, alloc: '1', zero: '0,2-31', host: true }] },
  { cmd: 'write', sc: 0, len: 64 * KiB, expect: [{ c: 0, alloc: ALL, zero: '' }] },
  { cmd: 'discard', sc: 0, len: 64 * KiB, expect: [{ c: 0, alloc: '', zero: ALL, host: false, qemuHost: false }] },
  // XL-9: a compressed cluster has bitmap 0.
  { cmd: 'compress', sc: 0, len: 64 * KiB, expect: [{ c: 0, alloc: '', zero: '', compressed: true }] },
  // XL-9 / CW-9: a partial write into a compressed cluster makes a normal cluster, all allocated.
  { cmd: 'write', sc: 1, off: 1, len: 512, expect: [{ c: 0, alloc: ALL, zero: '', host: true }] },
]

/** 271 "Overwriting several clusters without COW" (no backing file). */
const severalClustersSetup: Step[] = [
  { cmd: 'write', sc: 12, len: 40 * KiB, expect: [{ c: 0, alloc: '12-31', zero: '' }] },
  { cmd: 'write', c: 1, sc: 13, len: 2 * KiB, expect: [{ c: 1, alloc: '13', zero: '' }] },
  { cmd: 'write', c: 2, sc: 14, len: 2 * KiB, expect: [{ c: 2, alloc: '14', zero: '' }] },
  { cmd: 'zero', c: 2, sc: 14, len: 2 * KiB, expect: [{ c: 2, alloc: '', zero: '14', host: true }] },
  { cmd: 'write', c: 3, sc: 0, len: 34 * KiB, expect: [{ c: 3, alloc: '0-16', zero: '' }] },
]
const severalClustersOverwrite: Step = {
  cmd: 'write',
  sc: 12,
  len: 192 * KiB,
  expect: [
    { c: 0, alloc: '12-31', zero: '' },
    { c: 1, alloc: ALL, zero: '' },
    { c: 2, alloc: ALL, zero: '' },
    { c: 3, alloc: '0-16', zero: '' },
  ],
}

/**
 * 271 "Writing zeroes 1-4" on a 2083k image (not a multiple of the cluster size).
 *
 * Where ours differs from QEMU, the cause is one rule of our zero writes: a subcluster only
 * partly covered by the zero write keeps its bits if it already reads as zeros, and otherwise
 * (data there, or the backing file showing through) the whole part of the request in that
 * cluster is written as data (zeros, plus COW of the partial subclusters). QEMU instead writes
 * data only in the partial subclusters and sets zero bits on the whole ones, and without a
 * backing file sets the zero bit of a partial subcluster that reads as zeros.
 */
function zeroSteps(backing: boolean, zeroCmd: 'zero' | 'unmap'): Step[] {
  // Whole allocated clusters zeroed: QEMU keeps the host cluster without -u.
  const keptByQemu = zeroCmd === 'zero'
  const groups1And4: Step[] = [
    // Group 1: unallocated clusters. Cluster-aligned, c0-c2.
    { cmd: zeroCmd, c: 0, sc: 0, len: 192 * KiB, expect: each([0, 1, 2], { alloc: '', zero: ALL }) },
    // Subcluster-aligned, c3 sc16 to c5 sc15.
    {
      cmd: zeroCmd,
      c: 3,
      sc: 16,
      len: 128 * KiB,
      expect: [
        { c: 3, alloc: '', zero: '16-31' },
        { c: 4, alloc: '', zero: ALL },
        { c: 5, alloc: '', zero: '0-15' },
      ],
    },
    // Unaligned, c6 sc15 +1k to c8 sc15 +1k (half of sc15 in c6 and c8).
    {
      cmd: zeroCmd,
      c: 6,
      sc: 15,
      off: 1,
      len: 128 * KiB,
      expect: backing
        ? [
            // The backing file shows through the other half of sc15: ours writes c6 sc15-31 as
            // data; QEMU COWs sc15 only and zero-flags sc16-31.
            { c: 6, alloc: '15-31', zero: '', host: true, qemu: { alloc: '15', zero: '16-31' } },
            { c: 7, alloc: '', zero: ALL },
            { c: 8, alloc: '0-15', zero: '', host: true, qemu: { alloc: '15', zero: '0-14' } },
          ]
        : [
            // sc15 already reads as zeros: ours leaves it unallocated, QEMU zero-flags it.
            { c: 6, alloc: '', zero: '16-31', qemu: { alloc: '', zero: '15-31' } },
            { c: 7, alloc: '', zero: ALL },
            { c: 8, alloc: '', zero: '0-14', qemu: { alloc: '', zero: '0-15' } },
          ],
    },
  ]
  const group2: Step[] = [
    // Group 2: allocated clusters c9-c17.
    { cmd: 'write', c: 9, sc: 0, len: 576 * KiB, expect: each([9, 10, 11, 12, 13, 14, 15, 16, 17], { alloc: ALL, zero: '', host: true }) },
    // Whole clusters zeroed: ours releases their host clusters, QEMU only with -u.
    { cmd: zeroCmd, c: 9, sc: 0, len: 192 * KiB, expect: each([9, 10, 11], { alloc: '', zero: ALL, host: false, qemuHost: keptByQemu }) },
    {
      cmd: zeroCmd,
      c: 12,
      sc: 16,
      len: 128 * KiB,
      expect: [
        { c: 12, alloc: '0-15', zero: '16-31', host: true },
        { c: 13, alloc: '', zero: ALL, host: false, qemuHost: keptByQemu },
        { c: 14, alloc: '16-31', zero: '0-15', host: true },
      ],
    },
    {
      cmd: zeroCmd,
      c: 15,
      sc: 15,
      off: 1,
      len: 128 * KiB,
      expect: [
        // sc15 of c15 and c17 holds data: ours writes zeros in place over the cluster's part of
        // the request, so the bitmap stays all-allocated; QEMU zero-flags the whole subclusters.
        { c: 15, alloc: ALL, zero: '', host: true, qemu: { alloc: '0-15', zero: '16-31' } },
        { c: 16, alloc: '', zero: ALL, host: false, qemuHost: keptByQemu },
        { c: 17, alloc: ALL, zero: '', host: true, qemu: { alloc: '15-31', zero: '0-14' } },
      ],
    },
  ]
  const group3: Step[] = [
    // Group 3: compressed clusters c18-c28 (made by qemu-io write -c on both images).
    ...[18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28].map(
      (c): Step => ({ cmd: 'compress', c, sc: 0, len: 64 * KiB, expect: [{ c, alloc: '', zero: '', compressed: true }] }),
    ),
    { cmd: zeroCmd, c: 18, sc: 0, len: 192 * KiB, expect: each([18, 19, 20], { alloc: '', zero: ALL, host: false }) },
    {
      cmd: zeroCmd,
      c: 21,
      sc: 16,
      len: 128 * KiB,
      expect: [
        // A compressed cluster cannot be zeroed in part: decompressed, COWed, all allocated (XL-8).
        { c: 21, alloc: ALL, zero: '', host: true },
        // Wholly covered: ours uses the zero bits; QEMU COWs it (271's own comment says cluster
        // #22 should use the 'all zeroes' bits).
        { c: 22, alloc: '', zero: ALL, host: false, qemu: { alloc: ALL, zero: '' } },
        { c: 23, alloc: ALL, zero: '', host: true },
      ],
    },
    {
      cmd: zeroCmd,
      c: 24,
      sc: 15,
      off: 1,
      len: 129 * KiB,
      expect: [
        { c: 24, alloc: ALL, zero: '', host: true },
        // As c22: QEMU COWs a wholly covered compressed cluster here, ours zero-flags it.
        { c: 25, alloc: '', zero: ALL, host: false, qemu: { alloc: ALL, zero: '' } },
        { c: 26, alloc: ALL, zero: '', host: true },
      ],
    },
    {
      cmd: zeroCmd,
      c: 27,
      sc: 15,
      off: 1,
      len: 128 * KiB,
      expect: [
        // QEMU decompresses c27 and then zero-flags sc16-31; ours writes the whole cluster as data.
        { c: 27, alloc: ALL, zero: '', host: true, qemu: { alloc: '0-15', zero: '16-31' } },
        { c: 28, alloc: '', zero: ALL, host: false },
        // c29 is unallocated; its sc15 is half covered (see the c8 case of group 1).
        backing
          ? { c: 29, alloc: '0-15', zero: '', host: true, qemu: { alloc: '15', zero: '0-14' } }
          : { c: 29, alloc: '', zero: '0-14', qemu: { alloc: '', zero: '0-15' } },
      ],
    },
  ]
  const group4: Step[] = [
    // Group 4: unaligned, in the middle of c30 (sc15 and sc19 half covered).
    {
      cmd: zeroCmd,
      c: 30,
      sc: 15,
      off: 1,
      len: 8 * KiB,
      expect: [
        backing
          ? { c: 30, alloc: '15-19', zero: '', host: true, qemu: { alloc: '15,19', zero: '16-18' } }
          : { c: 30, alloc: '', zero: '16-18', qemu: { alloc: '', zero: '15-19' } },
      ],
    },
    // The last cluster, up to the end of the image (35k: sc17 is half inside the disk). QEMU
    // zero-flags sc17 since its other half lies past the end; ours treats it like any
    // partial subcluster (data when the backing file shows through, left alone otherwise).
    {
      cmd: zeroCmd,
      c: 32,
      sc: 0,
      len: 35 * KiB,
      expect: [
        backing
          ? { c: 32, alloc: '0-17', zero: '', host: true, qemu: { alloc: '', zero: '0-17' } }
          : { c: 32, alloc: '', zero: '0-16', qemu: { alloc: '', zero: '0-17' } },
      ],
    },
  ]
  // 271 runs groups 1-4 with write -z, and the "Zero + unmap" groups (2 and 3 again) with -u.
  return zeroCmd === 'zero' ? [...groups1And4.slice(0, 3), ...group2, ...group3, ...group4] : [...group2, ...group3]
}

// ---- the bench: our image, QEMU's twin, the raw model ----

class Bench {
  img: Qcow2Image | undefined
  /** 271 bumps the pattern byte on every data write. */
  pattern = 0
  steps = 0

  private constructor(
    readonly name: string,
    readonly image: string,
    readonly twin: string,
    readonly backing: boolean,
    readonly model: Buffer,
  ) {}

  /** Two fresh extended-L2 images of `size` bytes (optionally over a raw backing file of 0xff). */
  static async create(name: string, size: number, backing: boolean): Promise<Bench> {
    const image = path.join(dir, `${name}.qcow2`)
    const twin = path.join(dir, `${name}.qemu.qcow2`)
    const args = ['create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on']
    if (backing) {
      const base = path.join(dir, `${name}.base.raw`)
      fs.writeFileSync(base, Buffer.alloc(size, 0xff))
      args.push('-b', path.basename(base), '-F', 'raw')
    }
    await qemuImg([...args, image, String(size)])
    await qemuImg([...args, twin, String(size)])
    const bench = new Bench(name, image, twin, backing, Buffer.alloc(size, backing ? 0xff : 0))
    await bench.open()
    return bench
  }

  async open(file?: BlockFile): Promise<Qcow2Image> {
    this.img = file ? Qcow2Image.openFile(file, this.image, { readOnly: false }) : await Qcow2Image.open(this.image, { readOnly: false })
    return this.img
  }

  async close(): Promise<void> {
    await this.img?.close()
    this.img = undefined
  }

  get disk(): Qcow2Image {
    if (!this.img) throw new Error(`${this.name}: image is not open`)
    return this.img
  }

  /** Runs one step on all three, flushes ours, and checks everything. */
  async run(step: Step): Promise<void> {
    this.steps++
    await this.apply(step)
    await this.verify(`${this.name} step ${this.steps} (${describeStep(step)})`, step.expect)
  }

  async apply(step: Step): Promise<void> {
    const offset = stepOffset(step)
    const { len } = step
    switch (step.cmd) {
      case 'write': {
        const pattern = ++this.pattern
        await this.disk.write(Buffer.alloc(len, pattern), offset)
        await qemuIo(this.twin, [`write -q -P ${pattern} ${offset} ${len}`])
        this.model.fill(pattern, offset, offset + len)
        break
      }
      case 'compress': {
        const pattern = ++this.pattern
        await this.close()
        await qemuIo(this.image, [`write -q -c -P ${pattern} ${offset} ${len}`])
        await qemuIo(this.twin, [`write -q -c -P ${pattern} ${offset} ${len}`])
        await this.open()
        this.model.fill(pattern, offset, offset + len)
        break
      }
      case 'zero':
      case 'unmap':
      case 'discard': {
        // No unmap or discard in our engine: all three are zero writes here.
        await this.disk.writeZeroes(offset, len)
        const twinCommand = { zero: 'write -q -z', unmap: 'write -q -z -u', discard: 'discard -q' }[step.cmd]
        await qemuIo(this.twin, [`${twinCommand} ${offset} ${len}`])
        this.model.fill(0, offset, offset + len)
        break
      }
    }
    await this.disk.flush()
  }

  /** Bitmaps of the named clusters on both images, then each image against the model. */
  async verify(label: string, expectations: ClusterExpectation[]): Promise<void> {
    for (const e of expectations) {
      const ours = readEntry(this.image, e.c)
      expect(bitsOf(ours), `${label}: our cluster ${e.c}`).toEqual(canonical(e))
      expect(ours.compressed, `${label}: our cluster ${e.c} compressed`).toBe(e.compressed ?? false)
      if (e.host !== undefined) expect(ours.hostOffset !== 0, `${label}: our cluster ${e.c} has a host cluster`).toBe(e.host)
      const theirs = readEntry(this.twin, e.c)
      expect(bitsOf(theirs), `${label}: QEMU's cluster ${e.c}`).toEqual(canonical(e.qemu ?? e))
      expect(theirs.compressed, `${label}: QEMU's cluster ${e.c} compressed`).toBe(e.compressed ?? false)
      if (e.qemuHost !== undefined) expect(theirs.hostOffset !== 0, `${label}: QEMU's cluster ${e.c} has a host cluster`).toBe(e.qemuHost)
    }
    const all = Buffer.alloc(this.disk.virtualSize)
    await this.disk.read(all, 0)
    expect(firstDifference(all, this.model), `${label}: our engine reads the disk as the model`).toBe(-1)
    await verifyAgainstModel(`${label}, our image`, this.image, this.model, this.backing)
    await verifyAgainstModel(`${label}, QEMU's image`, this.twin, this.model, this.backing)
  }
}

function bitsOf(entry: L2EntryOnDisk): Bits {
  return { alloc: formatBits(entry.alloc), zero: formatBits(entry.zero) }
}

function canonical(bits: Bits): Bits {
  return { alloc: formatBits(parseBits(bits.alloc)), zero: formatBits(parseBits(bits.zero)) }
}

function firstDifference(a: Uint8Array, b: Uint8Array): number {
  if (Buffer.compare(a, b) === 0) return -1
  let i = 0
  while (i < a.length && i < b.length && a[i] === b[i]) i++
  return i
}

const isAll = (buf: Uint8Array, byte: number): boolean => buf.every((x) => x === byte)

/** qemu-img check: no errors, no corruptions, no leaks. */
async function expectCleanCheck(label: string, image: string): Promise<void> {
  const { stdout, stderr } = await qemuImgStatus(['check', '-U', '--output=json', image])
  const start = stdout.indexOf('{')
  expect(start, `${label}: qemu-img check printed no report: ${stderr}`).toBeGreaterThanOrEqual(0)
  const report = JSON.parse(stdout.slice(start)) as Record<string, unknown>
  const problems = { 'check-errors': report['check-errors'] ?? 0, corruptions: report['corruptions'] ?? 0, leaks: report['leaks'] ?? 0 }
  expect(problems, `${label}: qemu-img check ${stdout} ${stderr}`).toEqual({ 'check-errors': 0, corruptions: 0, leaks: 0 })
}

interface MapExtent {
  start: number
  length: number
  depth: number
  present: boolean
  zero: boolean
  data: boolean
  offset?: number
}

/**
 * qemu-img compare and check, then qemu-img map piece by piece (cut at subcluster boundaries)
 * against what the bitmaps on disk say and what the model holds. With -U (force-share): our
 * engine keeps the image open read-write, and holds QEMU's write lock on it meanwhile.
 */
async function verifyAgainstModel(label: string, image: string, model: Buffer, backing: boolean): Promise<void> {
  const raw = path.join(dir, 'model.raw')
  fs.writeFileSync(raw, model)
  const cmp = await qemuImgStatus(['compare', '-U', '-f', 'raw', '-F', 'qcow2', raw, image])
  expect(`${cmp.stdout}${cmp.stderr}`.trim(), `${label}: qemu-img compare with the model`).toBe('Images are identical.')
  await expectCleanCheck(label, image)

  const extents = JSON.parse(await qemuImg(['map', '-U', '--output=json', image])) as MapExtent[]
  const entries = readEntries(image, Math.ceil(model.length / CLUSTER))
  const fd = fs.openSync(image, 'r')
  const problems: string[] = []
  let covered = 0
  try {
    for (const extent of extents) {
      if (extent.start !== covered) problems.push(`map has a gap or overlap at ${covered} (next extent at ${extent.start})`)
      covered = extent.start + extent.length
      for (let pos = extent.start; pos < extent.start + extent.length; ) {
        const pieceEnd = Math.min(extent.start + extent.length, (Math.floor(pos / SUBCLUSTER) + 1) * SUBCLUSTER)
        const c = Math.floor(pos / CLUSTER)
        const sc = Math.floor((pos % CLUSTER) / SUBCLUSTER)
        const entry = entries[c]
        if (!entry) throw new Error(`${label}: no L2 entry read for cluster ${c}`)
        const kind = subclusterKind(entry, sc)
        const where = `[${pos}, ${pieceEnd}) cluster ${c} sc ${sc} (${kind})`
        const got = { depth: extent.depth, present: extent.present, zero: extent.zero, data: extent.data }
        const modelPiece = model.subarray(pos, pieceEnd)
        let want: typeof got
        switch (kind) {
          case 'data': {
            want = { depth: 0, present: true, zero: false, data: true }
            const hostOffset = entry.hostOffset + (pos % CLUSTER)
            if (extent.offset === undefined || extent.offset + (pos - extent.start) !== hostOffset) {
              problems.push(`${where}: map offset ${String(extent.offset)} (+${pos - extent.start}), bitmap says host ${hostOffset}`)
            }
            const onDisk = Buffer.alloc(pieceEnd - pos)
            fs.readSync(fd, onDisk, 0, onDisk.length, hostOffset)
            if (!onDisk.equals(modelPiece)) problems.push(`${where}: host bytes at ${hostOffset} differ from the model`)
            break
          }
          case 'zero':
            want = { depth: 0, present: true, zero: true, data: false }
            if (!isAll(modelPiece, 0)) problems.push(`${where}: zero subcluster, but the model is not zero there`)
            break
          case 'compressed':
            want = { depth: 0, present: true, zero: false, data: true }
            break
          case 'unallocated':
            if (backing) {
              want = { depth: 1, present: true, zero: false, data: true }
              if (!isAll(modelPiece, 0xff)) problems.push(`${where}: reads the backing file, but the model is not 0xff there`)
            } else {
              want = { depth: 0, present: false, zero: true, data: false }
              if (!isAll(modelPiece, 0)) problems.push(`${where}: unallocated without backing, but the model is not zero there`)
            }
            break
          case 'invalid':
            problems.push(`${where}: invalid bitmap ${entry.bitmap.toString(16)}`)
            want = got
            break
        }
        if (JSON.stringify(got) !== JSON.stringify(want)) problems.push(`${where}: map says ${JSON.stringify(got)}, expected ${JSON.stringify(want)}`)
        pos = pieceEnd
      }
    }
  } finally {
    fs.closeSync(fd)
  }
  if (covered !== model.length) problems.push(`map covers ${covered} bytes of ${model.length}`)
  expect(problems, `${label}: qemu-img map against the bitmaps and the model`).toEqual([])
}

// ---- the scenarios ----

describeQemu('qemu-iotests 271 through our engine: standard write tests', () => {
  test.each([true, false])('backing file: %s', async (backing) => {
    const bench = await Bench.create(`standard-${backing ? 'backing' : 'plain'}`, 1024 * KiB, backing)
    try {
      for (const step of standardSteps) await bench.run(step)
    } finally {
      await bench.close()
    }
  })
})

describeQemu('qemu-iotests 271 through our engine: overwriting several clusters without COW', () => {
  test('only clusters 1 and 2 change; no COW bytes are written', async () => {
    const bench = await Bench.create('several-clusters', 1024 * KiB, false)
    try {
      for (const step of severalClustersSetup) await bench.run(step)
      const before = [0, 1, 2, 3].map((c) => readEntry(bench.image, c))
      await bench.close()
      const counting = new CountingFile(NodeBlockFile.open(bench.image, { readOnly: false }))
      await bench.open(counting)
      await bench.run(severalClustersOverwrite)
      const after = [0, 1, 2, 3].map((c) => readEntry(bench.image, c))
      // Clusters 0 and 3 are overwritten in allocated subclusters only: entries untouched.
      expect(after[0]).toEqual(before[0])
      expect(after[3]).toEqual(before[3])
      // Clusters 1 and 2 are written in place (same host cluster), only their bitmaps change.
      expect(after[1]?.hostOffset).toBe(before[1]?.hostOffset)
      expect(after[2]?.hostOffset).toBe(before[2]?.hostOffset)
      // Every written subcluster is covered whole by the request: exactly its bytes go out.
      expect(counting.written.get('data')).toBe(192 * KiB)
      expect(counting.written.get('cow') ?? 0).toBe(0)
    } finally {
      await bench.close()
    }
  })
})

describeQemu('qemu-iotests 271 through our engine: writing zeroes', () => {
  test.each([true, false])('groups 1-4 (write -z), backing file: %s', async (backing) => {
    const bench = await Bench.create(`zeroes-${backing ? 'backing' : 'plain'}`, 2083 * KiB, backing)
    try {
      for (const step of zeroSteps(backing, 'zero')) await bench.run(step)
    } finally {
      await bench.close()
    }
  })

  test.each([true, false])('zero + unmap 1-2 (write -z -u), backing file: %s', async (backing) => {
    const bench = await Bench.create(`unmap-${backing ? 'backing' : 'plain'}`, 2083 * KiB, backing)
    try {
      for (const step of zeroSteps(backing, 'unmap')) await bench.run(step)
    } finally {
      await bench.close()
    }
  })
})

describeQemu('qemu-iotests 271 through our engine: discarding clusters with non-zero bitmaps', () => {
  // QEMU's discard (qemu-io discard) and the full discard of a shrink; ours: writeZeroes and
  // resize. Zero writes always set the zero bits of whole subclusters, so where QEMU's normal
  // discard leaves bits alone (no backing file: they read as zeros anyway) ours sets them.
  test.each([true, false])('backing file: %s', async (backing) => {
    const bench = await Bench.create(`discard-${backing ? 'backing' : 'plain'}`, 1024 * KiB, backing)
    try {
      await bench.run({ cmd: 'write', c: 0, len: 128 * KiB, expect: each([0, 1], { alloc: ALL, zero: '' }) })
      await bench.run({ cmd: 'discard', c: 0, len: 128 * KiB, expect: each([0, 1], { alloc: '', zero: ALL, host: false }) })
      // Clear the zero bits of c0's subclusters 16-31 (bytes 8-9 of the entry: bitmap bits 48-63).
      await bench.close()
      for (const image of [bench.image, bench.twin]) pokeFile(image, entryAt(image, 0) + 8, [0x00, 0x00])
      await bench.open()
      if (backing) bench.model.fill(0xff, 32 * KiB, 64 * KiB)
      await bench.verify('after clearing zero bits 16-31 of c0', [{ c: 0, alloc: '', zero: '0-15' }])
      await bench.run({
        cmd: 'discard',
        c: 0,
        len: 64 * KiB,
        expect: [backing ? { c: 0, alloc: '', zero: ALL } : { c: 0, alloc: '', zero: ALL, qemu: { alloc: '', zero: '0-15' } }],
      })
      // A full discard of c1: shrink to 64k, grow back to 1M. Growing over a backing file makes
      // the new range zero (in both engines), so the backing file's bytes stay hidden.
      await bench.disk.resize(64 * KiB)
      await bench.disk.resize(1024 * KiB)
      await bench.disk.flush()
      await qemuImg(['resize', '-q', '--shrink', bench.twin, String(64 * KiB)])
      await qemuImg(['resize', '-q', bench.twin, String(1024 * KiB)])
      bench.model.fill(0, 64 * KiB)
      await bench.verify('after shrinking to 64k and growing to 1M', [
        { c: 0, alloc: '', zero: ALL, qemu: backing ? undefined : { alloc: '', zero: '0-15' } },
        backing ? { c: 1, alloc: '', zero: ALL, host: false } : { c: 1, alloc: '', zero: '', host: false },
      ])
      expect(readEntry(bench.image, 1).descriptor).toBe(0n)
    } finally {
      await bench.close()
    }
  })
})

describeQemu('qemu-iotests 271 through our engine: copy-on-write with an internal snapshot', () => {
  test('clusters shared with snapshot snap1', async () => {
    const bench = await Bench.create('snapshot-cow', 1024 * KiB, false)
    try {
      // For c0-c9: zero sc7, write sc13 and sc18 (ours through the engine, QEMU's with qemu-io).
      for (let c = 0; c < 10; c++) {
        await bench.disk.writeZeroes(c * CLUSTER + 14 * KiB, 2 * KiB)
        await bench.disk.write(Buffer.alloc(2 * KiB, 0xd0 + c), c * CLUSTER + 26 * KiB)
        await bench.disk.write(Buffer.alloc(2 * KiB, 0xe0 + c), c * CLUSTER + 36 * KiB)
        await qemuIo(bench.twin, [
          `write -q -z ${c * CLUSTER + 14 * KiB} ${2 * KiB}`,
          `write -q -P ${0xd0 + c} ${c * CLUSTER + 26 * KiB} ${2 * KiB}`,
          `write -q -P ${0xe0 + c} ${c * CLUSTER + 36 * KiB} ${2 * KiB}`,
        ])
        bench.model.fill(0, c * CLUSTER + 14 * KiB, c * CLUSTER + 16 * KiB)
        bench.model.fill(0xd0 + c, c * CLUSTER + 26 * KiB, c * CLUSTER + 28 * KiB)
        bench.model.fill(0xe0 + c, c * CLUSTER + 36 * KiB, c * CLUSTER + 38 * KiB)
      }
      await bench.disk.flush()
      await bench.verify('before the snapshot', each([0, 1, 2, 3, 4, 5, 6, 7, 8, 9], { alloc: '13,18', zero: '7' }))

      await bench.close()
      await qemuImg(['snapshot', '-c', 'snap1', bench.image])
      await qemuImg(['snapshot', '-c', 'snap1', bench.twin])
      const snapshotModel = Buffer.from(bench.model)
      await bench.open()
      const l2Before = entryFileOffset(bench.image, 0)

      // One write or zero write per cluster. Ours copies a shared cluster whole (all its bytes,
      // as reads return them) and sets the alloc bits of the written subclusters only; QEMU
      // copies the range from the first to the last allocated or written subcluster and marks
      // all of it allocated. A zero write of whole subclusters needs no copy in either engine
      // (zero bits in the copied L2 table); a partial one over subclusters that read as zeros
      // changes nothing in ours, while QEMU zero-flags the partial subcluster.
      const steps: Step[] = [
        { cmd: 'write', c: 0, sc: 15, len: 1 * KiB, expect: [{ c: 0, alloc: '13,15,18', zero: '7', qemu: { alloc: '13-18', zero: '7' } }] },
        { cmd: 'write', c: 1, sc: 10, len: 1 * KiB, expect: [{ c: 1, alloc: '10,13,18', zero: '7', qemu: { alloc: '10-18', zero: '7' } }] },
        { cmd: 'write', c: 2, sc: 20, len: 1 * KiB, expect: [{ c: 2, alloc: '13,18,20', zero: '7', qemu: { alloc: '13-20', zero: '7' } }] },
        { cmd: 'write', c: 3, sc: 13, len: 1 * KiB, expect: [{ c: 3, alloc: '13,18', zero: '7', qemu: { alloc: '13-18', zero: '7' } }] },
        { cmd: 'write', c: 4, sc: 7, len: 1 * KiB, expect: [{ c: 4, alloc: '7,13,18', zero: '', qemu: { alloc: '7-18', zero: '' } }] },
        { cmd: 'write', c: 5, sc: 0, off: 1, len: 1 * KiB, expect: [{ c: 5, alloc: '0,13,18', zero: '7', qemu: { alloc: '0-18', zero: '' } }] },
        { cmd: 'zero', c: 6, sc: 15, len: 3 * KiB, expect: [{ c: 6, alloc: '13,18', zero: '7,15', qemu: { alloc: '13,18', zero: '7,15,16' } }] },
        { cmd: 'zero', c: 7, sc: 13, len: 2 * KiB, expect: [{ c: 7, alloc: '18', zero: '7,13' }] },
        { cmd: 'zero', c: 8, sc: 13, len: 1 * KiB, expect: [{ c: 8, alloc: '13,18', zero: '7', qemu: { alloc: '13-18', zero: '7' } }] },
        { cmd: 'zero', c: 9, sc: 6, len: 1 * KiB, expect: [{ c: 9, alloc: '13,18', zero: '7', qemu: { alloc: '13,18', zero: '6,7' } }] },
      ]
      const hostsBefore = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9].map((c) => readEntry(bench.image, c).hostOffset)
      for (const step of steps) await bench.run(step)

      // The active L2 table was copied away from the snapshot's.
      expect(entryFileOffset(bench.image, 0)).not.toBe(l2Before)
      // Data writes moved their clusters to new host clusters with COPIED; zero-bit-only
      // changes kept the shared host cluster (COPIED clear, refcount 2: qemu-img check agrees).
      for (let c = 0; c < 10; c++) {
        const entry = readEntry(bench.image, c)
        const dataWritten = c <= 5 || c === 8
        expect(entry.hostOffset !== hostsBefore[c], `cluster ${c} moved`).toBe(dataWritten)
        expect(entry.copied, `cluster ${c} COPIED`).toBe(dataWritten)
      }
      await bench.close()
      // The snapshot still shows what it showed when taken, through QEMU and through us.
      for (const image of [bench.image, bench.twin]) {
        const snapRaw = path.join(dir, 'snap1.raw')
        await qemuImg(['convert', '-l', 'snapshot.name=snap1', '-O', 'raw', image, snapRaw])
        expect(firstDifference(fs.readFileSync(snapRaw), snapshotModel), `${image}: snapshot view`).toBe(-1)
      }
      const snap = await Qcow2Image.open(bench.image, { snapshot: 'snap1' })
      try {
        const view = Buffer.alloc(snap.virtualSize)
        await snap.read(view, 0)
        expect(firstDifference(view, snapshotModel), 'our engine reads snap1 as taken').toBe(-1)
      } finally {
        await snap.close()
      }
    } finally {
      await bench.close()
    }
  })
})

// ---- corrupted L2 entries ----

function sha256(file: string): string {
  return createHash('sha256').update(fs.readFileSync(file)).digest('hex')
}

/** A fresh 1M extended-L2 image with qemu-io commands run on it. */
async function makeImage(name: string, commands: string[]): Promise<string> {
  const image = path.join(dir, `${name}.qcow2`)
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on', image, String(1024 * KiB)])
  if (commands.length > 0) await qemuIo(image, commands)
  return image
}

function entryAt(image: string, c: number): number {
  const at = entryFileOffset(image, c)
  if (at === undefined) throw new Error(`${image}: cluster ${c} has no L2 table`)
  return at
}

async function expectReadFails(image: string, guestOffset: number, length: number, readOnly: boolean): Promise<void> {
  const img = await Qcow2Image.open(image, { readOnly })
  try {
    const err = await img.read(Buffer.alloc(length), guestOffset).then(
      () => undefined,
      (e: unknown) => e,
    )
    expect(err, `read ${guestOffset}+${length} of an invalid entry`).toBeInstanceOf(CorruptImageError)
    expect((err as CorruptImageError).errno).toBe('EIO')
  } finally {
    await img.close()
  }
}

/**
 * A write into an INVALID entry: EIO, the image is marked corrupt (QEMU does the same), the
 * open image turns read-only, a read-write reopen is refused and qemu-img info shows it.
 */
async function expectWriteMarksCorrupt(image: string, guestOffset: number, length: number): Promise<void> {
  const img = await Qcow2Image.open(image, { readOnly: false })
  try {
    const err = await img.write(Buffer.alloc(length, 0x5a), guestOffset).then(
      () => undefined,
      (e: unknown) => e,
    )
    expect(err, `write ${guestOffset}+${length} into an invalid entry`).toBeInstanceOf(CorruptImageError)
    expect((err as CorruptImageError).errno).toBe('EIO')
    expect(img.readOnly).toBe(true)
    await expect(img.write(Buffer.alloc(512, 1), 512 * KiB)).rejects.toBeInstanceOf(ReadOnlyError)
  } finally {
    await img.close()
  }
  expect(isMarkedCorrupt(image)).toBe(true)
  await expect(Qcow2Image.open(image, { readOnly: false })).rejects.toBeInstanceOf(CorruptImageError)
  const info = await qemuInfo(tools(), image)
  const data = (info['format-specific'] as { data: Record<string, unknown> }).data
  expect(data['corrupt']).toBe(true)
}

describeQemu('qemu-iotests 271 through our engine: corrupted L2 entries', () => {
  /** Allocated c0..c2 data, then zero bit 0 set in c1's fully allocated bitmap. */
  async function allocAndZeroOnAllocated(name: string): Promise<string> {
    const image = await makeImage(name, ['write -q -P 0xcd 32k 128k'])
    pokeFileBigEndian(image, entryAt(image, 1) + 8, 4, 1n)
    expect(bitsOf(readEntry(image, 1))).toEqual(canonical({ alloc: ALL, zero: '0' }))
    return image
  }
  /** c4 written (so the L2 table exists), then allocation bit 0 set in c0's empty entry. */
  async function allocWithoutOffset(name: string): Promise<string> {
    const image = await makeImage(name, ['write -q 256k 1k'])
    pokeFile(image, entryAt(image, 0) + 15, [0x01])
    const entry = readEntry(image, 0)
    expect(entry.hostOffset).toBe(0)
    expect(bitsOf(entry)).toEqual({ alloc: '0', zero: '' })
    return image
  }
  /** c4 written, then alloc and zero bit 0 both set in c1's empty entry. */
  async function allocAndZeroOnUnallocated(name: string): Promise<string> {
    const image = await makeImage(name, ['write -q 256k 1k'])
    pokeFileBigEndian(image, entryAt(image, 1) + 8, 8, (1n << 32n) | 1n)
    expect(bitsOf(readEntry(image, 1))).toEqual({ alloc: '0', zero: '0' })
    return image
  }

  describe('as reads', () => {
    test("'cluster is zero' bit of the descriptor is ignored (allocated and unallocated)", async () => {
      const allocated = await makeImage('zero-flag-alloc-read', ['write -q -P 0x11 0 2k'])
      const at = entryAt(allocated, 0)
      pokeFile(allocated, at + 7, [Number(readEntry(allocated, 0).descriptor & 0xffn) | 0x01])
      expect(bitsOf(readEntry(allocated, 0))).toEqual({ alloc: '0', zero: '' })
      const unallocated = await makeImage('zero-flag-unalloc-read', ['write -q -P 0x22 256k 1k'])
      pokeFile(unallocated, entryAt(unallocated, 0) + 7, [0x01])
      for (const [image, want] of [
        [allocated, 0x11],
        [unallocated, 0],
      ] as const) {
        const img = await Qcow2Image.open(image)
        try {
          const buf = Buffer.alloc(1 * KiB, 0x77)
          await img.read(buf, 0)
          expect(isAll(buf, want), `${path.basename(image)} reads ${want}`).toBe(true)
        } finally {
          await img.close()
        }
      }
    })

    test('alloc and zero bits for the same subcluster of an allocated cluster: EIO for that cluster only', async () => {
      const image = await allocAndZeroOnAllocated('alloc-zero-alloc-read')
      const hash = sha256(image)
      await expectReadFails(image, 0, 192 * KiB, true)
      await expectReadFails(image, 64 * KiB + 40 * KiB, 1 * KiB, true)
      await expectReadFails(image, 0, 192 * KiB, false)
      const img = await Qcow2Image.open(image)
      try {
        const c0 = Buffer.alloc(64 * KiB)
        await img.read(c0, 0)
        expect(isAll(c0.subarray(0, 32 * KiB), 0) && isAll(c0.subarray(32 * KiB), 0xcd)).toBe(true)
        const c2 = Buffer.alloc(64 * KiB)
        await img.read(c2, 128 * KiB)
        expect(isAll(c2.subarray(0, 32 * KiB), 0xcd) && isAll(c2.subarray(32 * KiB), 0)).toBe(true)
      } finally {
        await img.close()
      }
      // Reads never write: not marked corrupt, not changed at all.
      expect(sha256(image)).toBe(hash)
    })

    test('allocation bit without a host offset: EIO', async () => {
      const image = await allocWithoutOffset('alloc-no-offset-read')
      const hash = sha256(image)
      await expectReadFails(image, 0, 1 * KiB, true)
      await expectReadFails(image, 0, 1 * KiB, false)
      expect(sha256(image)).toBe(hash)
    })

    test('alloc and zero bits for the same subcluster of an unallocated cluster: EIO', async () => {
      const image = await allocAndZeroOnUnallocated('alloc-zero-unalloc-read')
      await expectReadFails(image, 0, 192 * KiB, true)
      await expectReadFails(image, 64 * KiB + 60 * KiB, 512, true)
    })

    test('compressed cluster with a non-zero bitmap reads fine (the bitmap is ignored)', async () => {
      const image = await makeImage('compressed-bitmap-read', ['write -q -P 11 -c 0 64k'])
      pokeFile(image, entryAt(image, 0) + 11, [0x01, 0x80])
      const entry = readEntry(image, 0)
      expect(entry.compressed).toBe(true)
      expect(bitsOf(entry)).toEqual({ alloc: '31', zero: '0' })
      const img = await Qcow2Image.open(image)
      try {
        const buf = Buffer.alloc(64 * KiB)
        await img.read(buf, 0)
        expect(isAll(buf, 11)).toBe(true)
      } finally {
        await img.close()
      }
    })
  })

  describe('as writes', () => {
    test("'cluster is zero' bit of the descriptor is ignored (allocated and unallocated)", async () => {
      const allocated = await makeImage('zero-flag-alloc-write', ['write -q -P 0x11 0 2k'])
      pokeFile(allocated, entryAt(allocated, 0) + 7, [Number(readEntry(allocated, 0).descriptor & 0xffn) | 0x01])
      const unallocated = await makeImage('zero-flag-unalloc-write', ['write -q -P 0x22 256k 1k'])
      pokeFile(unallocated, entryAt(unallocated, 0) + 7, [0x01])
      for (const image of [allocated, unallocated]) {
        const img = await Qcow2Image.open(image, { readOnly: false })
        try {
          await img.write(Buffer.alloc(1 * KiB, 0x11), 0)
          await img.flush()
          const buf = Buffer.alloc(1 * KiB)
          await img.read(buf, 0)
          expect(isAll(buf, 0x11)).toBe(true)
        } finally {
          await img.close()
        }
        expect(bitsOf(readEntry(image, 0)), path.basename(image)).toEqual({ alloc: '0', zero: '' })
        expect(isMarkedCorrupt(image)).toBe(false)
      }
    })

    // 271's write (the same range as its read), and the other shape: a write that covers whole
    // subclusters needs no COW read of the entry's cluster, one that covers part of a
    // subcluster does. Both must see the invalid entry.
    const bothAllocated = 'alloc and zero bits for one subcluster, allocated cluster'
    const noOffset = 'allocation bit without a host offset'
    const bothUnallocated = 'alloc and zero bits for one subcluster, unallocated cluster'
    const invalidWrites: [string, (name: string) => Promise<string>, number, number][] = [
      [`${bothAllocated}, 271's write 0+192k`, allocAndZeroOnAllocated, 0, 192 * KiB],
      [`${bothAllocated}, write of part of a subcluster`, allocAndZeroOnAllocated, 65 * KiB, 512],
      [`${noOffset}, 271's write 0+1k (part of a subcluster)`, allocWithoutOffset, 0, 1 * KiB],
      [`${noOffset}, write of one whole subcluster`, allocWithoutOffset, 0, 2 * KiB],
      [`${bothUnallocated}, 271's write 0+192k`, allocAndZeroOnUnallocated, 0, 192 * KiB],
      [`${bothUnallocated}, write of part of a subcluster`, allocAndZeroOnUnallocated, 65 * KiB, 512],
    ]
    test.each(invalidWrites)('%s: EIO, marked corrupt', async (_name, make, guestOffset, length) => {
      const image = await make(`invalid-write-${make.name}-${guestOffset}-${length}`)
      await expectWriteMarksCorrupt(image, guestOffset, length)
    })

    test('compressed cluster with a non-zero bitmap: a full write makes a normal cluster, all allocated', async () => {
      const image = await makeImage('compressed-bitmap-write', ['write -q -P 11 -c 0 64k'])
      pokeFile(image, entryAt(image, 0) + 11, [0x01, 0x80])
      const img = await Qcow2Image.open(image, { readOnly: false })
      try {
        await img.write(Buffer.alloc(64 * KiB, 11), 0)
      } finally {
        await img.close()
      }
      const entry = readEntry(image, 0)
      expect(entry.compressed).toBe(false)
      expect(bitsOf(entry)).toEqual({ alloc: ALL, zero: '' })
      await expectCleanCheck('compressed cluster rewritten', image)
      const model = Buffer.alloc(1024 * KiB)
      model.fill(11, 0, 64 * KiB)
      await verifyAgainstModel('compressed cluster rewritten', image, model, false)
    })
  })
})

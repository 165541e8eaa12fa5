/*
 * Read matrix: images made at test time with qemu-img / qemu-io over many combinations (cluster
 * sizes 512 B..2 MiB, compat 0.10 and 1.1, every refcount width, extended L2, zlib and zstd
 * compression, backing chains over qcow2 and raw bases, internal snapshots, external data
 * files, sizes that are not a multiple of the cluster size), filled with random data, text and
 * zero runs and then reworked by scattered unaligned writes, zero writes, discards and
 * compressed writes. For each, the engine's view must equal `qemu-img convert -O raw` byte for
 * byte; a mismatch reports the first differing guest offset.
 *
 * The mount part mounts several of these with the CLI (`node dist/cli/main.js mount IMG...
 * MNT`) and compares MNT/STEM.raw, read with `dd bs=1M` and with `cp`, with qemu-img's raw.
 */
import { spawn } from 'node:child_process'
import { createCipheriv } from 'node:crypto'
import { copyFile, mkdir, readFile, readdir, stat, writeFile } from 'node:fs/promises'
import { existsSync, readFileSync } from 'node:fs'
import * as path from 'node:path'
import { fileURLToPath } from 'node:url'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { Qcow2Image } from '../../lib/image.js'
import { describeDifference, diffDiskWithRaw } from '../helpers/fixtures.js'
import {
  type QemuTools,
  convertToRaw,
  findExecutable,
  isCi,
  makeTempDir,
  qemuImg,
  qemuIo,
  removeTempDir,
  requireQemu,
  run,
} from '../helpers/qemu.js'
import { xorshift32 } from '../helpers/random.js'

const qemu = requireQemu('interop read matrix')

const MiB = 1024 * 1024
const KiB = 1024

// ---------------------------------------------------------------------------------------------
// Content
// ---------------------------------------------------------------------------------------------


/** Incompressible bytes: AES-128-CTR keystream under a key made from SEED. */
function randomBytes(length: number, seed: number): Buffer {
  const key = Buffer.alloc(16)
  key.writeUInt32BE(seed >>> 0, 12)
  return createCipheriv('aes-128-ctr', key, Buffer.alloc(16)).update(Buffer.alloc(length))
}

/** Compressible numbered text lines. */
function textBytes(length: number, tag: string): Buffer {
  const lines: string[] = []
  let total = 0
  for (let n = 0; total < length; n++) {
    const line = `${tag} ${String(n).padStart(7, '0')}: all work and no play makes a dull disk image\n`
    lines.push(line)
    total += line.length
  }
  return Buffer.from(lines.join(''), 'latin1').subarray(0, length)
}

/** A guest disk of SIZE bytes: runs of random data, text, zeros and one-byte patterns. */
function makeContent(size: number, seed: number): Buffer {
  const out = Buffer.alloc(size)
  const next = xorshift32(seed)
  let guestOffset = 0
  while (guestOffset < size) {
    const length = Math.min(size - guestOffset, 1 + (next() % Math.max(1, Math.floor(size / 6))))
    const kind = next() % 4
    if (kind === 0) randomBytes(length, next()).copy(out, guestOffset)
    else if (kind === 1) textBytes(length, `seed${seed}@${guestOffset}`).copy(out, guestOffset)
    else if (kind === 3) out.fill(1 + (next() % 255), guestOffset, guestOffset + length)
    // kind 2: a zero run (the buffer starts zeroed)
    guestOffset += length
  }
  return out
}

const PATCH_RANDOM = 'patch-random.bin'
const PATCH_TEXT = 'patch-text.bin'
const PATCH_BYTES = 2 * MiB
/** Text sources for compressed writes, so compressed clusters differ from one another. */
const PATCH_TEXT_VARIANTS = ['patch-text-a.bin', 'patch-text-b.bin', 'patch-text-c.bin']

/**
 * qemu-io commands scattered over the disk: unaligned random and text writes, zero writes,
 * discards and (when allowed) whole-cluster compressed writes. Offsets snap to sub-units of the
 * cluster (a subcluster when extended L2 is possible) and then often move off them.
 */
function scatterProgram(
  size: number,
  clusterBytes: number,
  seed: number,
  options: { count?: number; compressed?: boolean } = {},
): string[] {
  const next = xorshift32(seed)
  const unit = clusterBytes >= 16 * KiB ? clusterBytes / 32 : 512
  const ops: string[] = []
  for (let i = 0; i < (options.count ?? 16); i++) {
    let guestOffset = (next() % Math.floor(size / unit)) * unit
    if (next() % 2) guestOffset += next() % unit
    guestOffset = Math.min(guestOffset, size - 1)
    let length = unit * (1 + (next() % 8)) + (next() % 2 ? next() % 1000 : 0)
    length = Math.max(1, Math.min(length, size - guestOffset, MiB))
    const kind = next() % 6
    if (kind <= 1) ops.push(`write -s ${PATCH_RANDOM} ${guestOffset} ${length}`)
    else if (kind === 2) ops.push(`write -s ${PATCH_TEXT} ${guestOffset} ${length}`)
    else if (kind === 3) ops.push(`write -z ${guestOffset} ${length}`)
    else if (kind === 4) ops.push(`discard ${guestOffset} ${length}`)
    else {
      const start = Math.floor(guestOffset / clusterBytes) * clusterBytes
      if (options.compressed && start + clusterBytes <= size && clusterBytes <= PATCH_BYTES) {
        // QEMU writes compressed clusters only where no host cluster is mapped (else EIO),
        // so the cluster is discarded first.
        ops.push(`discard ${start} ${clusterBytes}`)
        ops.push(`write -c -s ${PATCH_TEXT_VARIANTS[next() % PATCH_TEXT_VARIANTS.length]} ${start} ${clusterBytes}`)
      } else {
        ops.push(`write -P 0x${(1 + (next() % 255)).toString(16)} ${guestOffset} ${length}`)
      }
    }
  }
  // Always touch both ends of the disk and a cluster boundary.
  const across = Math.max(0, Math.min(clusterBytes, size) - 333)
  ops.push(`write -s ${PATCH_RANDOM} ${across} ${Math.min(clusterBytes + 700, size - across, MiB)}`)
  ops.push(`write -P 0x${((seed * 37 + 11) & 0xff || 1).toString(16)} ${size - 777} 777`)
  return ops
}

// ---------------------------------------------------------------------------------------------
// Building images
// ---------------------------------------------------------------------------------------------

/** One thing to compare: an image, or one internal snapshot of it. */
interface View {
  image: string
  snapshot?: string
  /**
   * How to get qemu-img's view of a snapshot: `convert -l snapshot.name=` (default) presents it
   * at the active image's size; after a resize, reverting a copy (`snapshot -a`) gives it at its
   * own size, as a guest booted from it would see it.
   */
  snapshotOracle?: 'convert' | 'revert'
}

class Builder {
  constructor(
    readonly tools: QemuTools,
    readonly dir: string,
  ) {}

  #opts(options: Record<string, string | number | boolean | undefined>): string[] {
    const parts = Object.entries(options)
      .filter(([, v]) => v !== undefined)
      .map(([k, v]) => `${k}=${typeof v === 'boolean' ? (v ? 'on' : 'off') : String(v)}`)
    return parts.length ? ['-o', parts.join(',')] : []
  }

  img(...args: string[]): Promise<string> {
    return qemuImg(this.tools, args, { cwd: this.dir })
  }

  io(image: string, commands: string[]): Promise<string> {
    return qemuIo(this.tools, image, commands, { cwd: this.dir })
  }

  /** Writes NAME.src.raw with makeContent(SIZE, SEED); returns its name. */
  async content(name: string, size: number, seed: number): Promise<string> {
    const file = `${name}.src.raw`
    await writeFile(path.join(this.dir, file), makeContent(size, seed))
    return file
  }

  async create(image: string, size: number, options: Record<string, string | number | boolean | undefined> = {}): Promise<void> {
    await this.img('create', '-q', '-f', 'qcow2', ...this.#opts(options), image, String(size))
  }

  /** qemu-img convert of a raw source into a new qcow2 IMAGE (compressed with `compress`). */
  async convert(
    source: string,
    image: string,
    options: Record<string, string | number | boolean | undefined> = {},
    compress = false,
  ): Promise<void> {
    await this.img('convert', ...(compress ? ['-c'] : []), '-f', 'raw', '-O', 'qcow2', ...this.#opts(options), source, image)
  }

  /** qemu-img convert -n of a raw source into an existing IMAGE (keeps its options). */
  async fill(source: string, image: string): Promise<void> {
    await this.img('convert', '-n', '-f', 'raw', '-O', 'qcow2', source, image)
  }

  async snapshot(image: string, name: string): Promise<void> {
    await this.img('snapshot', '-c', name, image)
  }
}

interface MatrixCase {
  name: string
  build(b: Builder): Promise<View[]>
}

const cases: MatrixCase[] = []
let seedCounter = 1000
const nextSeed = (): number => seedCounter++

// Geometry: every cluster size from 512 B to 2 MiB in compat 1.1 (with every refcount width)
// and compat 0.10 (refcount width 16 only), from converted content plus scattered writes.
const clusterSizes = [512, 1 * KiB, 4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB, 2 * MiB]
const refcountWidths = [1, 2, 4, 8, 16, 32, 64]
clusterSizes.forEach((clusterBytes, i) => {
  for (const compat of ['1.1', '0.10'] as const) {
    const refcountBits = compat === '1.1' ? refcountWidths[i]! : 16
    const name = `geo-c${clusterBytes}-v${compat === '1.1' ? 3 : 2}-r${refcountBits}`
    const seed = nextSeed()
    cases.push({
      name,
      async build(b) {
        const size = clusterBytes === 512 ? 2 * MiB : 4 * MiB
        const src = await b.content(name, size, seed)
        await b.convert(src, `${name}.qcow2`, { cluster_size: clusterBytes, compat, refcount_bits: refcountBits })
        // Compressed clusters share host clusters, which one-bit refcounts cannot count.
        await b.io(`${name}.qcow2`, scatterProgram(size, clusterBytes, seed, { compressed: refcountBits > 1 }))
        return [{ image: `${name}.qcow2` }]
      },
    })
  }
})

// Sizes that are not a multiple of the cluster size.
for (const [clusterBytes, size, compat] of [
  [64 * KiB, 3 * MiB + 1536, '1.1'],
  [4 * KiB, 2 * MiB + 512 * 7, '0.10'],
  [2 * MiB, 5 * MiB + 512, '1.1'],
] as const) {
  const name = `odd-c${clusterBytes}-s${size}`
  const seed = nextSeed()
  cases.push({
    name,
    async build(b) {
      const src = await b.content(name, size, seed)
      await b.convert(src, `${name}.qcow2`, { cluster_size: clusterBytes, compat })
      await b.io(`${name}.qcow2`, scatterProgram(size, clusterBytes, seed, { compressed: false }))
      return [{ image: `${name}.qcow2` }]
    },
  })
}

// Extended L2: images built only from scattered subcluster-sized writes, so clusters mix
// allocated, zero and unallocated subclusters; one also from converted content.
for (const clusterBytes of [16 * KiB, 64 * KiB, 256 * KiB, 2 * MiB]) {
  const name = `el2-c${clusterBytes}`
  const seed = nextSeed()
  cases.push({
    name,
    async build(b) {
      const size = 4 * MiB
      await b.create(`${name}.qcow2`, size, { extended_l2: true, cluster_size: clusterBytes })
      await b.io(`${name}.qcow2`, scatterProgram(size, clusterBytes, seed, { count: 40, compressed: true }))
      return [{ image: `${name}.qcow2` }]
    },
  })
}
{
  const name = 'el2-c32768-converted'
  const seed = nextSeed()
  cases.push({
    name,
    async build(b) {
      const size = 3 * MiB
      const src = await b.content(name, size, seed)
      await b.convert(src, `${name}.qcow2`, { extended_l2: true, cluster_size: 32 * KiB })
      await b.io(`${name}.qcow2`, scatterProgram(size, 32 * KiB, seed, { count: 30, compressed: true }))
      return [{ image: `${name}.qcow2` }]
    },
  })
}

// Compressed images: qemu-img convert -c, then scattered writes over compressed clusters.
for (const [clusterBytes, compression, compat, extendedL2] of [
  [64 * KiB, 'zlib', '1.1', false],
  [64 * KiB, 'zstd', '1.1', false],
  [4 * KiB, 'zstd', '1.1', false],
  [512, 'zlib', '1.1', false],
  [64 * KiB, 'zlib', '0.10', false],
  [2 * MiB, 'zstd', '1.1', false],
  [64 * KiB, 'zstd', '1.1', true],
  [16 * KiB, 'zlib', '1.1', true],
] as const) {
  const name = `comp-${compression}-c${clusterBytes}-v${compat === '1.1' ? 3 : 2}${extendedL2 ? '-el2' : ''}`
  const seed = nextSeed()
  cases.push({
    name,
    async build(b) {
      const size = 4 * MiB
      const src = await b.content(name, size, seed)
      await b.convert(
        src,
        `${name}.qcow2`,
        {
          cluster_size: clusterBytes,
          compat,
          compression_type: compat === '1.1' ? compression : undefined,
          extended_l2: extendedL2 ? true : undefined,
        },
        true,
      )
      await b.io(`${name}.qcow2`, scatterProgram(size, clusterBytes, seed, { count: 12, compressed: true }))
      return [{ image: `${name}.qcow2` }]
    },
  })
}

// Backing chains (relative names; qemu runs in the directory).
cases.push({
  name: 'chain-raw',
  async build(b) {
    // A raw base shorter than the overlays and not a multiple of 512 bytes.
    const baseSize = 3 * MiB + 1001
    const base = await b.content('chain-raw-base', baseSize, 7001)
    await b.create('chain-raw-mid.qcow2', 4 * MiB, { backing_file: base, backing_fmt: 'raw' })
    await b.io('chain-raw-mid.qcow2', scatterProgram(4 * MiB, 64 * KiB, 7002, { count: 20, compressed: true }))
    await b.create('chain-raw-top.qcow2', 4 * MiB, {
      backing_file: 'chain-raw-mid.qcow2',
      backing_fmt: 'qcow2',
      cluster_size: 4 * KiB,
    })
    await b.io('chain-raw-top.qcow2', [
      ...scatterProgram(4 * MiB, 4 * KiB, 7003, { count: 24, compressed: true }),
      // Whole-cluster zero writes over backing data (zero flag hides it) and past the base's end.
      'write -z 0 64k',
      `write -z ${3 * MiB - 8 * KiB} 16k`,
    ])
    return [{ image: 'chain-raw-mid.qcow2' }, { image: 'chain-raw-top.qcow2' }]
  },
})
cases.push({
  name: 'chain-qcow2',
  async build(b) {
    const src = await b.content('chain-q-base', 4 * MiB, 7101)
    await b.convert(src, 'chain-q-base.qcow2', { compression_type: 'zstd' }, true)
    await b.create('chain-q-mid.qcow2', 4 * MiB, {
      backing_file: 'chain-q-base.qcow2',
      backing_fmt: 'qcow2',
      extended_l2: true,
      cluster_size: 16 * KiB,
    })
    await b.io('chain-q-mid.qcow2', scatterProgram(4 * MiB, 16 * KiB, 7102, { count: 30, compressed: true }))
    await b.create('chain-q-top.qcow2', 4 * MiB, {
      backing_file: 'chain-q-mid.qcow2',
      backing_fmt: 'qcow2',
      compat: '0.10',
      cluster_size: 512,
    })
    await b.io('chain-q-top.qcow2', scatterProgram(4 * MiB, 512, 7103, { count: 24, compressed: true }))
    return [{ image: 'chain-q-mid.qcow2' }, { image: 'chain-q-top.qcow2' }]
  },
})
cases.push({
  name: 'chain-short',
  async build(b) {
    await b.create('chain-s-base.qcow2', 1 * MiB, { cluster_size: 4 * KiB })
    await b.fill(await b.content('chain-s-base', 1 * MiB, 7201), 'chain-s-base.qcow2')
    await b.create('chain-s-top.qcow2', 4 * MiB + 512, {
      backing_file: 'chain-s-base.qcow2',
      backing_fmt: 'qcow2',
      extended_l2: true,
      cluster_size: 64 * KiB,
    })
    await b.io('chain-s-top.qcow2', [
      `write -P 0x53 ${1 * MiB - 3000} 6000`,
      ...scatterProgram(4 * MiB + 512, 64 * KiB, 7202, { count: 12 }),
    ])
    return [{ image: 'chain-s-top.qcow2' }]
  },
})
cases.push({
  name: 'chain-rebased',
  async build(b) {
    // A safe rebase moves top from mid onto base, copying what mid contributed.
    await b.convert(await b.content('chain-r-base', 2 * MiB, 7301), 'chain-r-base.qcow2', { cluster_size: 4 * KiB })
    await b.create('chain-r-mid.qcow2', 2 * MiB, { backing_file: 'chain-r-base.qcow2', backing_fmt: 'qcow2' })
    await b.io('chain-r-mid.qcow2', scatterProgram(2 * MiB, 64 * KiB, 7302, { count: 10 }))
    await b.create('chain-r-top.qcow2', 2 * MiB, { backing_file: 'chain-r-mid.qcow2', backing_fmt: 'qcow2' })
    await b.io('chain-r-top.qcow2', scatterProgram(2 * MiB, 64 * KiB, 7303, { count: 10 }))
    await b.img('rebase', '-b', 'chain-r-base.qcow2', '-F', 'qcow2', 'chain-r-top.qcow2')
    return [{ image: 'chain-r-top.qcow2' }]
  },
})

// Internal snapshots, with writes between them; views of each snapshot.
cases.push({
  name: 'snap-c64k',
  async build(b) {
    const size = 4 * MiB
    await b.convert(await b.content('snap-c64k', size, 7401), 'snap-c64k.qcow2')
    await b.snapshot('snap-c64k.qcow2', 'one')
    await b.io('snap-c64k.qcow2', scatterProgram(size, 64 * KiB, 7402, { count: 20, compressed: true }))
    await b.snapshot('snap-c64k.qcow2', 'two')
    await b.io('snap-c64k.qcow2', scatterProgram(size, 64 * KiB, 7403, { count: 20, compressed: true }))
    return [
      { image: 'snap-c64k.qcow2' },
      { image: 'snap-c64k.qcow2', snapshot: 'one' },
      { image: 'snap-c64k.qcow2', snapshot: 'two' },
    ]
  },
})
cases.push({
  name: 'snap-v2-c512',
  async build(b) {
    const size = 2 * MiB
    await b.convert(await b.content('snap-v2-c512', size, 7501), 'snap-v2-c512.qcow2', { compat: '0.10', cluster_size: 512 })
    await b.snapshot('snap-v2-c512.qcow2', 'old')
    await b.io('snap-v2-c512.qcow2', scatterProgram(size, 512, 7502, { count: 20 }))
    return [{ image: 'snap-v2-c512.qcow2' }, { image: 'snap-v2-c512.qcow2', snapshot: 'old' }]
  },
})
cases.push({
  name: 'snap-el2-compressed',
  async build(b) {
    const size = 4 * MiB
    const image = 'snap-el2.qcow2'
    await b.convert(await b.content('snap-el2', size, 7601), image, { extended_l2: true, cluster_size: 32 * KiB }, true)
    await b.snapshot(image, 'packed')
    await b.io(image, scatterProgram(size, 32 * KiB, 7602, { count: 30, compressed: true }))
    return [{ image }, { image, snapshot: 'packed' }]
  },
})
cases.push({
  name: 'snap-resized',
  async build(b) {
    // The snapshot keeps its own (smaller) disk size after the image grows.
    const image = 'snap-resized.qcow2'
    await b.convert(await b.content('snap-resized', 2 * MiB, 7701), image, { cluster_size: 16 * KiB })
    await b.snapshot(image, 'small')
    await b.img('resize', '-q', image, String(3 * MiB + 4096))
    await b.io(image, scatterProgram(3 * MiB + 4096, 16 * KiB, 7702, { count: 16 }))
    return [{ image }, { image, snapshot: 'small', snapshotOracle: 'revert' }]
  },
})

// External data files (relative names; qemu 7.2 resolves them against its working directory,
// which is the image's directory here).
for (const [name, raw, clusterBytes, extendedL2] of [
  ['df-c64k', false, 64 * KiB, false],
  ['df-raw-c4k', true, 4 * KiB, false],
  ['df-el2-c16k', false, 16 * KiB, true],
] as const) {
  const seed = nextSeed()
  cases.push({
    name,
    async build(b) {
      const size = 3 * MiB
      await b.create(`${name}.qcow2`, size, {
        data_file: `${name}.data`,
        data_file_raw: raw ? true : undefined,
        cluster_size: clusterBytes,
        extended_l2: extendedL2 ? true : undefined,
      })
      await b.fill(await b.content(name, size, seed), `${name}.qcow2`)
      // Compressed clusters are not allowed with an external data file.
      await b.io(`${name}.qcow2`, scatterProgram(size, clusterBytes, seed, { count: 20, compressed: false }))
      return [{ image: `${name}.qcow2` }]
    },
  })
}

// ---------------------------------------------------------------------------------------------
// The comparisons
// ---------------------------------------------------------------------------------------------

function viewLabel(v: View): string {
  return v.snapshot === undefined ? v.image : `${v.image} @ snapshot ${v.snapshot}`
}

function rawName(v: View): string {
  return `${v.image}${v.snapshot === undefined ? '' : `.snap-${v.snapshot}`}.qemu.raw`
}

describe.skipIf(!qemu)('read matrix: engine vs qemu-img convert -O raw', () => {
  const tools = qemu!
  let dir = ''
  const built = new Map<string, Promise<View[]>>()

  beforeAll(async () => {
    dir = await makeTempDir('read-matrix')
    await writeFile(path.join(dir, PATCH_RANDOM), randomBytes(PATCH_BYTES, 424242))
    await writeFile(path.join(dir, PATCH_TEXT), textBytes(PATCH_BYTES, 'patch'))
    for (const name of PATCH_TEXT_VARIANTS) await writeFile(path.join(dir, name), textBytes(PATCH_BYTES, name))
  })

  afterAll(async () => {
    if (dir) await removeTempDir(dir)
  })

  /** Builds a case once (later callers share the promise); its views with qemu's raw made. */
  function ensureBuilt(c: MatrixCase): Promise<View[]> {
    let p = built.get(c.name)
    if (!p) {
      p = (async () => {
        const b = new Builder(tools, dir)
        const views = await c.build(b)
        for (const v of views) await makeQemuRaw(b, v)
        return views
      })()
      built.set(c.name, p)
    }
    return p
  }

  async function makeQemuRaw(b: Builder, v: View): Promise<void> {
    const out = path.join(dir, rawName(v))
    if (v.snapshot !== undefined && v.snapshotOracle === 'revert') {
      const copy = `${v.image}.revert-${v.snapshot}.qcow2`
      await copyFile(path.join(dir, v.image), path.join(dir, copy))
      await b.img('snapshot', '-a', v.snapshot, copy)
      await convertToRaw(tools, copy, out, { cwd: dir })
      return
    }
    await convertToRaw(tools, v.image, out, { cwd: dir, ...(v.snapshot !== undefined ? { snapshot: v.snapshot } : {}) })
  }

  it('covers the combinations it claims', () => {
    const names = cases.map((c) => c.name)
    expect(new Set(names).size).toBe(names.length)
    for (const width of refcountWidths) expect(names.some((n) => n.endsWith(`-r${width}`))).toBe(true)
    for (const c of clusterSizes) expect(names).toContain(`geo-c${c}-v2-r16`)
  })

  describe.each(cases)('$name', (c) => {
    it('reads every view exactly as qemu-img does', async () => {
      const views = await ensureBuilt(c)
      expect(views.length).toBeGreaterThan(0)
      const problems: string[] = []
      for (const v of views) {
        const img = await Qcow2Image.open(path.join(dir, v.image), {
          readOnly: true,
          ...(v.snapshot !== undefined ? { snapshot: v.snapshot } : {}),
        })
        try {
          const diff = await diffDiskWithRaw(img, path.join(dir, rawName(v)))
          if (diff) problems.push(`${viewLabel(v)}: ${diff}`)
        } finally {
          await img.close()
        }
      }
      expect(problems).toEqual([])
    })
  })

  // -------------------------------------------------------------------------------------------
  // Through a real mount
  // -------------------------------------------------------------------------------------------

  const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..')
  const cliPath = path.join(repoRoot, 'dist/cli/main.js')
  const haveCli = existsSync(cliPath)
  if (!haveCli && !isCi()) {
    process.stderr.write(`[skip] read matrix through a mount: ${cliPath} does not exist yet (run make build)\n`)
  }
  const mountCases = ['geo-c65536-v3-r16', 'comp-zstd-c65536-v3', 'chain-raw', 'df-c64k', 'el2-c16384', 'odd-c65536-s3147264']

  describe.skipIf(!haveCli && !isCi())('through a mount (qcow2fs mount, dd bs=1M, cp)', () => {
    let mnt = ''
    let mountViews: View[] = []
    let mounted = false

    const isMounted = (): boolean =>
      readFileSync('/proc/self/mountinfo', 'utf8')
        .split('\n')
        .some((line) => line.split(' ')[4] === mnt)

    beforeAll(async () => {
      if (!haveCli) throw new Error(`${cliPath} does not exist: build with make build (CI=true, so this fails)`)
      for (const name of mountCases) {
        const c = cases.find((x) => x.name === name)
        if (!c) throw new Error(`mount case ${name} is not in the matrix`)
        // Only the top of a chain is mounted: its stem must be unique and its view complete.
        const views = (await ensureBuilt(c)).filter((v) => v.snapshot === undefined)
        mountViews.push(views[views.length - 1]!)
      }
      mnt = path.join(dir, 'mnt')
      await mkdir(mnt)
    })

    afterAll(async () => {
      if (mnt && isMounted()) {
        // The unmount test failed or never ran: do not leave a mount behind.
        const fusermount = findExecutable('fusermount') ?? findExecutable('fusermount3')
        if (fusermount) await run(fusermount, ['-u', '-z', mnt]).catch(() => undefined)
      }
      mountViews = []
    })

    it('mounts several images and lists them as STEM.raw', async () => {
      const images = mountViews.map((v) => path.join(dir, v.image))
      const result = await runNode(cliPath, ['mount', ...images, mnt], 60_000)
      expect(result.code, `qcow2fs mount exited ${result.code}: ${result.stderr}`).toBe(0)
      mounted = isMounted()
      expect(mounted, `qcow2fs mount exited 0 but ${mnt} is not in the mount table`).toBe(true)
      const expected = mountViews.map((v) => `${path.basename(v.image, '.qcow2')}.raw`).sort()
      expect((await readdir(mnt)).sort()).toEqual(expected)
      for (const name of expected) expect(result.stdout).toContain(name)
    })

    it('shows each raw file with the virtual size as its size', async () => {
      expect(mounted, 'not mounted: the mount test failed').toBe(true)
      for (const v of mountViews) {
        const raw = path.join(mnt, `${path.basename(v.image, '.qcow2')}.raw`)
        const qemuRaw = path.join(dir, rawName(v))
        expect((await stat(raw)).size, raw).toBe((await stat(qemuRaw)).size)
      }
    })

    it('reads with dd bs=1M exactly what qemu-img convert gives', async () => {
      expect(mounted, 'not mounted: the mount test failed').toBe(true)
      const problems: string[] = []
      for (const v of mountViews) {
        const stem = path.basename(v.image, '.qcow2')
        const out = path.join(dir, `${stem}.dd.raw`)
        await run('dd', [`if=${path.join(mnt, `${stem}.raw`)}`, `of=${out}`, 'bs=1M', 'status=none'], { timeoutMs: 60_000 })
        const diff = describeDifference(await readFile(out), await readFile(path.join(dir, rawName(v))), 'guest offset')
        if (diff) problems.push(`${stem}.raw via dd: ${diff}`)
      }
      expect(problems).toEqual([])
    })

    it('reads with cp exactly what qemu-img convert gives', async () => {
      expect(mounted, 'not mounted: the mount test failed').toBe(true)
      const problems: string[] = []
      for (const v of mountViews) {
        const stem = path.basename(v.image, '.qcow2')
        const out = path.join(dir, `${stem}.cp.raw`)
        await run('cp', [path.join(mnt, `${stem}.raw`), out], { timeoutMs: 60_000 })
        const diff = describeDifference(await readFile(out), await readFile(path.join(dir, rawName(v))), 'guest offset')
        if (diff) problems.push(`${stem}.raw via cp: ${diff}`)
      }
      expect(problems).toEqual([])
    })

    it('unmounts with qcow2fs unmount', async () => {
      expect(mounted, 'not mounted: the mount test failed').toBe(true)
      const result = await runNode(cliPath, ['unmount', mnt], 60_000)
      expect(result.code, `qcow2fs unmount exited ${result.code}: ${result.stderr}`).toBe(0)
      expect(isMounted()).toBe(false)
    })
  })
})

/**
 * Runs `node SCRIPT ARGS` and resolves when the process exits (not when its output pipes close:
 * a mount command may leave a server running that inherited them).
 */
function runNode(script: string, args: string[], timeoutMs: number): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [script, ...args], { stdio: ['ignore', 'pipe', 'pipe'] })
    let stdout = ''
    let stderr = ''
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()))
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()))
    const timer = setTimeout(() => {
      child.kill('SIGKILL')
      reject(new Error(`node ${path.basename(script)} ${args.join(' ')}: no exit after ${timeoutMs} ms\n${stderr}`))
    }, timeoutMs)
    child.on('error', (err) => {
      clearTimeout(timer)
      reject(err)
    })
    child.on('exit', (code) => {
      clearTimeout(timer)
      // Give already-written output a moment to arrive, then stop listening.
      setTimeout(() => {
        child.stdout.destroy()
        child.stderr.destroy()
        resolve({ code, stdout, stderr })
      }, 50)
    })
  })
}

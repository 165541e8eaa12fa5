/*
 * `qcow2fs map` against `qemu-img map` (both output formats, compared as text):
 *   - the committed fixtures (fixtures/manifest.json), run from their directories;
 *   - images built here of the kinds the read matrix uses: every cluster size in compat 1.1
 *     and 0.10, every refcount width, odd virtual sizes, extended L2 with mixed subclusters,
 *     compressed clusters (zlib, zstd, with extended L2), backing chains over raw bases (sparse
 *     and not, shorter than the overlay, not a multiple of 512 bytes) and over qcow2 (with
 *     extended L2 and version 2 layers), internal snapshots (map shows the active layer),
 *     external data files (raw and not), preallocated metadata; external data files with holes
 *     (whole clusters, half clusters, runs across clusters, a data file shorter than the disk),
 *     with data_file_raw on and off, with extended L2, and copies of the committed data-file
 *     fixtures given such holes.
 *
 * qemu-img 7.2 prints no `compressed` key (QEMU 8.x added it); the installed version's keys are
 * what we print, and the test checks the installed qemu-img prints none either.
 *
 * Holes: QEMU asks the file system which blocks of a raw file (and, when it decides an image
 * has preallocated metadata, of its data clusters, in the image file or in the external data
 * file) are holes, with lseek(SEEK_DATA/SEEK_HOLE); qcow2fs asks the same way through its addon
 * (lib/io/file-extents.ts), so the maps are compared exactly. QEMU's test for preallocated
 * metadata looks at how much of the image file the host holds, so a data-file image reports the
 * holes of its data file only when its image file is sparse enough: the cases here punch holes
 * into the data file and dig holes into the image file (fallocate), and check that qemu-img
 * did report holes. Without the addon (not built) qcow2fs guesses holes of raw files from zero
 * blocks and takes an external data file as all data; the comparison then folds `"zero": true,
 * "data": true` extents into plain data on both sides for images where either side reports
 * them, and the rest must still be equal.
 */
import { copyFileSync, mkdirSync, statSync, writeFileSync } from 'node:fs'
import * as path from 'node:path'
import { spawnSync } from 'node:child_process'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { type MapEntry, mapImage } from '../../lib/check/map.js'
import { formatMapHuman, formatMapJson } from '../../cli/commands/map.js'
import { NodeBlockFile } from '../../lib/io/block-file.js'
import { FIXTURES_DIR, loadManifest } from '../helpers/fixtures.js'
import { makeTempDir, removeTempDir, requireQemu } from '../helpers/qemu.js'
import { xorshift32 } from '../helpers/random.js'
import { readL1Entry, writeL1Entry } from '../helpers/damage.js'

const qemu = requireQemu('qcow2fs map vs qemu-img map')

const KiB = 1024
const MiB = 1024 * KiB

function tool(program: string, args: string[], cwd: string): { status: number; stdout: string; stderr: string } {
  const r = spawnSync(program, args, { cwd, encoding: 'utf8', timeout: 60_000, maxBuffer: 64 * MiB })
  if (r.error) throw r.error
  return { status: r.status ?? -1, stdout: r.stdout, stderr: r.stderr }
}

/** qemu-img map in both formats, run in `cwd` on `image` (a name relative to it). */
function qemuMaps(cwd: string, image: string): { json: string; human: { status: number; stdout: string; stderr: string } } {
  const json = tool(qemu!.qemuImg, ['map', '--output=json', image], cwd)
  if (json.status !== 0) throw new Error(`qemu-img map ${image}: ${json.stderr}`)
  return { json: json.stdout, human: tool(qemu!.qemuImg, ['map', image], cwd) }
}

/** Ours, through the library (the CLI prints exactly these strings; test/cli/map.test.ts runs it). */
function ourMaps(cwd: string, image: string): { json: string; human: { text: string; error?: string }; entries: MapEntry[] } {
  const entries = mapImage(path.join(cwd, image), image)
  return { json: formatMapJson(entries), human: formatMapHuman(entries), entries }
}

const HOLE_HINT = '"zero": true, "data": true'

/** Compares the maps; returns qemu-img's JSON. */
function expectSameMaps(cwd: string, image: string, options: { exactHoles?: boolean } = {}): string {
  const theirs = qemuMaps(cwd, image)
  const ours = ourMaps(cwd, image)
  const qemuSawHoles = !CAN_ASK_HOLES && (theirs.json.includes(HOLE_HINT) || ours.json.includes(HOLE_HINT))
  if (qemuSawHoles && options.exactHoles !== true) {
    expect(withoutDataHoles(ours.json), `${image}: JSON without hole hints`).toBe(withoutDataHoles(theirs.json))
  } else {
    expect(ours.json, `${image}: JSON`).toBe(theirs.json)
  }
  // The human table is the JSON's data extents with their files; with hole hints it differs
  // only where the JSON does (compared above).
  if (!qemuSawHoles || options.exactHoles === true) expect(ours.human.text, `${image}: human`).toBe(theirs.human.stdout)
  if (ours.human.error === undefined) {
    expect(theirs.human.status, `${image}: human exit status`).toBe(0)
  } else {
    expect(theirs.human.status).toBe(1)
    expect(theirs.human.stderr).toBe(`qemu-img: ${ours.human.error}\n`)
  }
  return theirs.json
}

/**
 * Entries with `zero` and `data` both set (a hole found in a data cluster) made plain data, and
 * merged again: what the map is when no such hole is found.
 */
function withoutDataHoles(json: string): string {
  const entries = (JSON.parse(json) as MapEntry[]).map((e) => (e.zero && e.data ? { ...e, zero: false } : e))
  const merged: MapEntry[] = []
  for (const e of entries) {
    const last = merged[merged.length - 1]
    if (
      last &&
      last.zero === e.zero &&
      last.data === e.data &&
      last.depth === e.depth &&
      last.present === e.present &&
      (last.offset === undefined) === (e.offset === undefined) &&
      (last.offset === undefined || last.offset + last.length === e.offset)
    ) {
      last.length += e.length
    } else {
      merged.push({ ...e })
    }
  }
  return formatMapJson(merged)
}

/** The file system can be asked for holes (the addon is built): maps must then be exact. */
const CAN_ASK_HOLES = (() => {
  const file = NodeBlockFile.open(path.join(FIXTURES_DIR, 'manifest.json'), { readOnly: true, lock: 'none' })
  try {
    return file.extentAt(0) !== undefined
  } finally {
    file.close()
  }
})()

// ---- built images -----------------------------------------------------------------------------

let dir = ''

function img(...args: string[]): void {
  const r = tool(qemu!.qemuImg, args, dir)
  if (r.status !== 0) throw new Error(`qemu-img ${args.join(' ')}: ${r.stderr}`)
}

function io(image: string, commands: string[]): void {
  const r = tool(qemu!.qemuIo, ['-f', 'qcow2', ...commands.flatMap((c) => ['-c', c]), image], dir)
  if (r.status !== 0) throw new Error(`qemu-io ${image}: ${r.stderr}`)
}

/** Seeded qemu-io writes: patterns, zero writes, discards, compressed clusters (when allowed). */
function scatter(size: number, clusterBytes: number, seed: number, count: number, compressed: boolean): string[] {
  const next = xorshift32(seed)
  const unit = clusterBytes >= 16 * KiB ? clusterBytes / 32 : 512
  const ops: string[] = []
  for (let i = 0; i < count; i++) {
    let guestOffset = (next() % Math.floor(size / unit)) * unit
    if (next() % 3 === 0) guestOffset += next() % unit
    guestOffset = Math.min(guestOffset, size - 1)
    const length = Math.max(1, Math.min(unit * (1 + (next() % 8)), size - guestOffset, MiB))
    const kind = next() % 5
    if (kind <= 1) ops.push(`write -P 0x${(1 + (next() % 255)).toString(16)} ${guestOffset} ${length}`)
    else if (kind === 2) ops.push(`write -z ${guestOffset} ${length}`)
    else if (kind === 3) ops.push(`discard ${guestOffset} ${length}`)
    else {
      const start = Math.floor(guestOffset / clusterBytes) * clusterBytes
      if (compressed && start + clusterBytes <= size) ops.push(`discard ${start} ${clusterBytes}`, `write -c -P 0x42 ${start} ${clusterBytes}`)
      else ops.push(`write -P 0x37 ${guestOffset} ${length}`)
    }
  }
  ops.push(`write -P 0x11 ${size - 777} 777`)
  return ops
}

interface BuiltCase {
  name: string
  /** Holes are compared exactly (deterministic on the host file system). */
  exactHoles?: boolean
  /** These images (of the ones built) must show holes in qemu-img's map, where the host has holes. */
  holesIn?: string[]
  /** Builds the images; returns the ones to map. */
  build(): string[]
}

/**
 * fallocate(1) in the scratch directory; throws when it fails. Where the file system keeps no
 * holes it does nothing: the images are then compared without them.
 */
function fallocate(args: string[]): void {
  if (!hostHoles) return
  const r = tool('fallocate', args, dir)
  if (r.status !== 0) throw new Error(`fallocate ${args.join(' ')}: ${r.stderr}`)
}

/** Punches a hole into a file of the scratch directory. */
function punch(file: string, offset: number, length: number): void {
  fallocate(['-p', '-o', String(offset), '-l', String(length), file])
}

/**
 * Makes a data-file image's file sparse (its blocks of zeros become holes): QEMU then finds
 * many more clusters in use than the host holds, takes the image for one with preallocated
 * metadata and asks the data file for holes in data clusters.
 */
function sparseImageCopy(image: string, copy: string): string {
  copyFileSync(path.join(dir, image), path.join(dir, copy))
  fallocate(['--dig-holes', copy])
  return copy
}

/** The scratch file system keeps holes punched into files (set in beforeAll). */
let hostHoles = false

const built: BuiltCase[] = []
let seed = 5000

const clusterSizes = [512, 1 * KiB, 4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB, 2 * MiB]
const refcountWidths = [1, 2, 4, 8, 16, 32, 64]
clusterSizes.forEach((clusterBytes, i) => {
  for (const compat of ['1.1', '0.10']) {
    const bits = compat === '1.1' ? refcountWidths[i]! : 16
    const name = `geo-c${clusterBytes}-v${compat === '1.1' ? 3 : 2}-r${bits}`
    const s = seed++
    built.push({
      name,
      build() {
        const image = `${name}.qcow2`
        img('create', '-q', '-f', 'qcow2', '-o', `cluster_size=${clusterBytes},compat=${compat},refcount_bits=${bits}`, image, '3M')
        io(image, scatter(3 * MiB, clusterBytes, s, 24, bits > 1))
        return [image]
      },
    })
  }
})
for (const [clusterBytes, size] of [
  [64 * KiB, 3 * MiB + 1536],
  [4 * KiB, 2 * MiB + 512 * 7],
  [2 * MiB, 5 * MiB + 512],
] as const) {
  const name = `odd-c${clusterBytes}-s${size}`
  const s = seed++
  built.push({
    name,
    build() {
      img('create', '-q', '-f', 'qcow2', '-o', `cluster_size=${clusterBytes}`, `${name}.qcow2`, String(size))
      io(`${name}.qcow2`, scatter(size, clusterBytes, s, 16, false))
      return [`${name}.qcow2`]
    },
  })
}
for (const clusterBytes of [16 * KiB, 64 * KiB, 2 * MiB]) {
  const name = `el2-c${clusterBytes}`
  const s = seed++
  built.push({
    name,
    build() {
      img('create', '-q', '-f', 'qcow2', '-o', `extended_l2=on,cluster_size=${clusterBytes}`, `${name}.qcow2`, '4M')
      io(`${name}.qcow2`, scatter(4 * MiB, clusterBytes, s, 40, true))
      return [`${name}.qcow2`]
    },
  })
}
for (const [compression, clusterBytes, el2] of [
  ['zlib', 64 * KiB, false],
  ['zstd', 4 * KiB, false],
  ['zstd', 32 * KiB, true],
] as const) {
  const name = `comp-${compression}-c${clusterBytes}${el2 ? '-el2' : ''}`
  const s = seed++
  built.push({
    name,
    build() {
      const raw = `${name}.src.raw`
      writeFileSync(path.join(dir, raw), Buffer.alloc(2 * MiB, 'compressible text '))
      img('convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', `cluster_size=${clusterBytes},compression_type=${compression}${el2 ? ',extended_l2=on' : ''}`, raw, `${name}.qcow2`)
      io(`${name}.qcow2`, scatter(2 * MiB, clusterBytes, s, 12, true))
      return [`${name}.qcow2`]
    },
  })
}
built.push({
  name: 'chain-raw (non-sparse raw base, shorter than the overlay, odd length)',
  build() {
    writeFileSync(path.join(dir, 'cr-base.raw'), Buffer.alloc(3 * MiB + 1001, 0x5a))
    img('create', '-q', '-f', 'qcow2', '-b', 'cr-base.raw', '-F', 'raw', 'cr-mid.qcow2', '4M')
    io('cr-mid.qcow2', scatter(4 * MiB, 64 * KiB, 7002, 16, true))
    img('create', '-q', '-f', 'qcow2', '-b', 'cr-mid.qcow2', '-F', 'qcow2', '-o', 'cluster_size=4096', 'cr-top.qcow2', '4M')
    io('cr-top.qcow2', [...scatter(4 * MiB, 4 * KiB, 7003, 16, true), 'write -z 0 64k', `write -z ${3 * MiB - 8 * KiB} 16k`])
    return ['cr-mid.qcow2', 'cr-top.qcow2']
  },
})
built.push({
  name: 'chain-sparse-raw (a raw base with holes)',
  exactHoles: true,
  build() {
    const base = path.join(dir, 'sr-base.raw')
    writeFileSync(base, Buffer.alloc(0))
    tool('truncate', ['-s', '2M', base], dir)
    tool('dd', [`if=/dev/urandom`, `of=${base}`, 'bs=4096', 'seek=16', 'count=40', 'conv=notrunc', 'status=none'], dir)
    tool('dd', [`if=/dev/urandom`, `of=${base}`, 'bs=4096', 'seek=300', 'count=3', 'conv=notrunc', 'status=none'], dir)
    img('create', '-q', '-f', 'qcow2', '-b', 'sr-base.raw', '-F', 'raw', 'sr-top.qcow2', '3M')
    io('sr-top.qcow2', ['write -P 1 64k 64k', 'write -z 1M 64k'])
    return ['sr-top.qcow2']
  },
})
built.push({
  name: 'chain-qcow2 (extended L2 middle, version 2 top with 512-byte clusters)',
  build() {
    img('create', '-q', '-f', 'qcow2', 'cq-base.qcow2', '4M')
    io('cq-base.qcow2', scatter(4 * MiB, 64 * KiB, 7101, 20, true))
    img('create', '-q', '-f', 'qcow2', '-b', 'cq-base.qcow2', '-F', 'qcow2', '-o', 'extended_l2=on,cluster_size=16384', 'cq-mid.qcow2')
    io('cq-mid.qcow2', scatter(4 * MiB, 16 * KiB, 7102, 30, true))
    img('create', '-q', '-f', 'qcow2', '-b', 'cq-mid.qcow2', '-F', 'qcow2', '-o', 'compat=0.10,cluster_size=512', 'cq-top.qcow2')
    io('cq-top.qcow2', scatter(4 * MiB, 512, 7103, 24, true))
    return ['cq-mid.qcow2', 'cq-top.qcow2']
  },
})
built.push({
  name: 'chain-short (an overlay larger than its backing file)',
  build() {
    img('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', 'cs-base.qcow2', '1M')
    io('cs-base.qcow2', ['write -P 3 0 1M'])
    img('create', '-q', '-f', 'qcow2', '-b', 'cs-base.qcow2', '-F', 'qcow2', '-o', 'extended_l2=on', 'cs-top.qcow2', String(4 * MiB + 512))
    io('cs-top.qcow2', ['write -P 0x53 ' + (MiB - 3000) + ' 6000', ...scatter(4 * MiB + 512, 64 * KiB, 7202, 12, false)])
    return ['cs-top.qcow2']
  },
})
built.push({
  name: 'snapshots (the active layer is mapped)',
  build() {
    img('create', '-q', '-f', 'qcow2', 'sn.qcow2', '4M')
    io('sn.qcow2', scatter(4 * MiB, 64 * KiB, 7401, 16, true))
    img('snapshot', '-c', 'one', 'sn.qcow2')
    io('sn.qcow2', scatter(4 * MiB, 64 * KiB, 7402, 16, true))
    return ['sn.qcow2']
  },
})
for (const [name, raw, el2] of [
  ['df-c64k', false, false],
  ['df-raw', true, false],
  ['df-el2', false, true],
] as const) {
  built.push({
    name: `external data file ${name}`,
    build() {
      const opts = [`data_file=${name}.data`, raw ? 'data_file_raw=on' : '', el2 ? 'extended_l2=on,cluster_size=16384' : ''].filter((o) => o).join(',')
      img('create', '-q', '-f', 'qcow2', '-o', opts, `${name}.qcow2`, '3M')
      io(`${name}.qcow2`, scatter(3 * MiB, el2 ? 16 * KiB : 64 * KiB, 7500, 16, false))
      return [`${name}.qcow2`]
    },
  })
}
for (const [raw, el2] of [
  [false, false],
  [true, false],
  [false, true],
  [true, true],
] as const) {
  const name = `dfh${raw ? '-raw' : ''}${el2 ? '-el2' : ''}`
  const clusterBytes = el2 ? 32 * KiB : 64 * KiB
  built.push({
    name: `external data file with holes (data_file_raw=${raw ? 'on' : 'off'}${el2 ? ', extended L2' : ''}): a cluster in a hole, half a cluster, a run across clusters`,
    holesIn: [`${name}-sparse.qcow2`],
    build() {
      const opts = [`data_file=${name}.data`, `data_file_raw=${raw ? 'on' : 'off'}`, `cluster_size=${clusterBytes}`, el2 ? 'extended_l2=on' : ''].filter((o) => o)
      img('create', '-q', '-f', 'qcow2', '-o', opts.join(','), `${name}.qcow2`, '4M')
      // Written zeros at 3M are data in the data file, not a hole.
      io(`${name}.qcow2`, ['write -P 1 0 1M', 'write -z 1M 64k', 'write -P 2 2M 1M', 'write -P 0 3M 128k', 'write -P 3 3584k 8k', 'write -z 3968k 4k'])
      const c = clusterBytes
      punch(`${name}.data`, c, c) // a whole cluster
      punch(`${name}.data`, 3 * c + c / 2, c / 2) // the second half of a cluster
      punch(`${name}.data`, 5 * c + 4 * KiB, 4 * KiB) // 4 KiB inside a cluster
      punch(`${name}.data`, 2 * MiB + c / 2, 3 * c) // across three clusters
      // The image as written (QEMU asks its data file only if the image file looks
      // preallocated, which depends on the host) and the image with a sparse file (it does).
      return [`${name}.qcow2`, sparseImageCopy(`${name}.qcow2`, `${name}-sparse.qcow2`)]
    },
  })
}
built.push({
  name: 'external data file shorter than the disk, ending inside a sector (data_file_raw=on)',
  holesIn: ['dfs-sparse.qcow2'],
  build() {
    img('create', '-q', '-f', 'qcow2', '-o', 'data_file=dfs.data,data_file_raw=on', 'dfs.qcow2', '4M')
    io('dfs.qcow2', ['write -P 1 0 256k', 'write -P 2 3M 64k'])
    punch('dfs.data', 64 * KiB, 64 * KiB)
    tool('truncate', ['-s', String(3 * MiB + 4096 + 100), 'dfs.data'], dir)
    return ['dfs.qcow2', sparseImageCopy('dfs.qcow2', 'dfs-sparse.qcow2')]
  },
})
for (const fixture of ['datafile', 'datafile-raw']) {
  built.push({
    name: `the fixture images/${fixture}.qcow2 with holes punched into its data file`,
    holesIn: [`fx-${fixture}/${fixture}-sparse.qcow2`],
    build() {
      const sub = `fx-${fixture}`
      mkdirSync(path.join(dir, sub))
      for (const f of [`${fixture}.qcow2`, `${fixture}.data`]) copyFileSync(path.join(FIXTURES_DIR, 'images', f), path.join(dir, sub, f))
      punch(`${sub}/${fixture}.data`, 64 * KiB, 64 * KiB) // a whole cluster
      punch(`${sub}/${fixture}.data`, 1184 * KiB, 32 * KiB) // the second half of a cluster
      return [`${sub}/${fixture}.qcow2`, sparseImageCopy(`${sub}/${fixture}.qcow2`, `${sub}/${fixture}-sparse.qcow2`)]
    },
  })
}
built.push({
  name: 'preallocated metadata (holes in data clusters read as zero)',
  exactHoles: true,
  build() {
    img('create', '-q', '-f', 'qcow2', '-o', 'preallocation=metadata', 'pm.qcow2', '4M')
    io('pm.qcow2', ['write -P 1 0 4k', 'write -P 2 1M 100k'])
    return ['pm.qcow2']
  },
})
built.push({
  name: 'an L2 table shared by two L1 entries (damaged, still mapped as qemu-img maps it)',
  build() {
    img('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', 'shared-l2.qcow2', '8M')
    io('shared-l2.qcow2', ['write -P 1 0 64k', 'write -z 128k 8k', 'write -P 2 4M 12k'])
    const p = path.join(dir, 'shared-l2.qcow2')
    writeL1Entry(p, 3, readL1Entry(p, 0))
    return ['shared-l2.qcow2']
  },
})
built.push({
  name: 'empty image',
  build() {
    img('create', '-q', '-f', 'qcow2', 'empty.qcow2', '0')
    return ['empty.qcow2']
  },
})

describe.skipIf(!qemu)('qcow2fs map against qemu-img map', () => {
  beforeAll(async () => {
    dir = await makeTempDir('map')
    // Whether this file system keeps punched holes (tmpfs, ext4, xfs, btrfs do).
    writeFileSync(path.join(dir, 'probe'), Buffer.alloc(256 * KiB, 1))
    const before = statSync(path.join(dir, 'probe')).blocks
    const punched = tool('fallocate', ['-p', '-o', '0', '-l', String(128 * KiB), 'probe'], dir)
    hostHoles = punched.status === 0 && statSync(path.join(dir, 'probe')).blocks < before
  })
  afterAll(async () => {
    if (dir) await removeTempDir(dir)
  })

  it('holes are asked of the file system (make build builds the addon)', () => {
    // In CI the addon must be there: without it the comparison above is weaker.
    if (process.env.CI === 'true') expect(CAN_ASK_HOLES).toBe(true)
  })

  it('the installed qemu-img prints the keys we print (no "compressed" key)', () => {
    const theirs = qemuMaps(path.join(FIXTURES_DIR, 'images'), 'zlib.qcow2').json
    const keys = new Set((JSON.parse(theirs) as Record<string, unknown>[]).flatMap((e) => Object.keys(e)))
    expect([...keys].sort()).toEqual(['data', 'depth', 'length', 'offset', 'present', 'start', 'zero'])
  })

  for (const entry of loadManifest()) {
    it(`fixture ${entry.file}`, () => {
      const cwd = path.join(FIXTURES_DIR, path.dirname(entry.file))
      const image = path.basename(entry.file)
      expectSameMaps(cwd, image)
    })
  }

  for (const c of built) {
    it(c.name, () => {
      for (const image of c.build()) {
        // Run from the image's directory: qemu-img 7.2 looks for a relative data file there.
        const theirs = expectSameMaps(path.join(dir, path.dirname(image)), path.basename(image), { exactHoles: c.exactHoles === true })
        if (hostHoles && c.holesIn?.includes(image)) expect(theirs, `${image}: qemu-img reports holes`).toContain(HOLE_HINT)
      }
    })
  }
})

/*
 * `qcow2fs info` against `qemu-img info` on images made by qemu-img at test time.
 *
 * --json is compared key by key with `qemu-img info --output=json` run with the same path
 * argument and working directory. Every key must be equal, with one documented difference:
 * `full-backing-filename` is the absolute path qcow2fs actually opened, where qemu-img joins
 * the backing name to the image's directory as given (`chain/base.qcow2` for the argument
 * `chain/top.qcow2`); the test resolves qemu-img's value against the working directory and
 * then requires equality. `filename` is the path as given, like qemu-img's. `actual-size`
 * (st_blocks * 512 of the image file alone, also for images with a data file) must match
 * exactly: nothing writes the files between the two calls. The human output is compared line
 * by line with `qemu-img info`, with the same treatment of the backing file's actual path.
 */
import { writeFileSync } from 'node:fs'
import { dirname, isAbsolute, join, resolve } from 'node:path'
import { beforeAll, describe, expect, it } from 'vitest'
import type { ImageInfo } from '../../lib/image-info.js'
import { formatSize, formatVmClock } from '../../cli/commands/info.js'
import { qemuToolsFor, run, runCli, sha256File, useSuiteDir } from './helpers.js'

const { available: haveQemu, qemuImg, qemuIo } = qemuToolsFor('qcow2fs info vs qemu-img info')

interface Case {
  name: string
  /** Path given to both tools, relative to the temp dir (also their working directory). */
  image: string
  /** Other files the case creates and that must stay unchanged. */
  extraFiles?: string[]
  make(dir: string): void
}

let dir = ''

function img(...args: string[]): void {
  run(qemuImg!, args, dir)
}

function io(image: string, ...commands: string[]): void {
  run(qemuIo!, [...commands.flatMap((c) => ['-c', c]), image], dir)
}

/** A few writes of each kind, so that L2 tables and refcount blocks exist. */
function fill(image: string, extraIoOptions: string[] = []): void {
  run(
    qemuIo!,
    [
      ...extraIoOptions,
      '-c', 'write -P 0x5a 0 96k',
      '-c', 'write -P 0x33 300k 4k',
      '-c', 'write -z 512k 64k',
      image,
    ],
    dir,
  )
}

const cases: Case[] = [
  {
    name: 'compat 0.10 (v2)',
    image: 'v2.qcow2',
    make: () => {
      img('create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', 'v2.qcow2', '2M')
      fill('v2.qcow2')
    },
  },
  {
    name: 'compat 1.1 (v3), lazy refcounts, 1-bit refcounts, 512-byte clusters',
    image: 'v3-small.qcow2',
    make: () => {
      img('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512,refcount_bits=1,lazy_refcounts=on', 'v3-small.qcow2', '1M')
      fill('v3-small.qcow2')
    },
  },
  {
    name: 'v3, 64-bit refcounts, 2 MiB clusters, size not a multiple of the cluster size',
    image: 'v3-big.qcow2',
    make: () => {
      img('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=2M,refcount_bits=64', 'v3-big.qcow2', '3000000')
      fill('v3-big.qcow2')
    },
  },
  {
    name: 'extended L2 with 16 KiB clusters',
    image: 'extl2.qcow2',
    make: () => {
      img('create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on,cluster_size=16k', 'extl2.qcow2', '2M')
      io('extl2.qcow2', 'write -P 0x11 1k 1k', 'write -z 4k 2k', 'write -P 0x22 100k 20k')
    },
  },
  {
    name: 'zstd compression with compressed clusters',
    image: 'zstd.qcow2',
    make: () => {
      img('create', '-q', '-f', 'qcow2', '-o', 'compression_type=zstd', 'zstd.qcow2', '2M')
      io('zstd.qcow2', 'write -c -P 0x41 0 64k', 'write -c -P 0x42 64k 64k', 'write -P 0x43 256k 64k')
    },
  },
  {
    name: 'relative backing file in a subdirectory (qcow2 base)',
    image: 'chain/top.qcow2',
    extraFiles: ['chain/base.qcow2'],
    make: () => {
      run('mkdir', ['-p', 'chain'], dir)
      img('create', '-q', '-f', 'qcow2', 'chain/base.qcow2', '2M')
      fill('chain/base.qcow2')
      img('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'chain/top.qcow2')
      io('chain/top.qcow2', 'write -P 0x77 64k 64k')
    },
  },
  {
    name: 'relative backing file, image given by absolute path',
    image: '', // set in beforeAll: the absolute path of chain/top.qcow2
    extraFiles: ['chain/base.qcow2'],
    make: () => {},
  },
  {
    name: 'raw backing file, overlay larger than its base',
    image: 'raw-top.qcow2',
    extraFiles: ['raw-base.img'],
    make: () => {
      writeFileSync(join(dir, 'raw-base.img'), Buffer.alloc(512 * 1024, 0x61))
      img('create', '-q', '-f', 'qcow2', '-b', 'raw-base.img', '-F', 'raw', 'raw-top.qcow2', '1M')
    },
  },
  {
    name: 'internal snapshots',
    image: 'snap.qcow2',
    make: () => {
      img('create', '-q', '-f', 'qcow2', 'snap.qcow2', '2M')
      fill('snap.qcow2')
      img('snapshot', '-c', 'first', 'snap.qcow2')
      io('snap.qcow2', 'write -P 0x99 0 64k')
      img('snapshot', '-c', 'second snapshot with a long name', 'snap.qcow2')
    },
  },
  {
    name: 'external data file',
    image: 'ext.qcow2',
    extraFiles: ['ext.data'],
    make: () => {
      img('create', '-q', '-f', 'qcow2', '-o', 'data_file=ext.data', 'ext.qcow2', '1M')
      io('ext.qcow2', 'write -P 0x10 0 128k')
    },
  },
  {
    name: 'external raw data file (data_file_raw=on)',
    image: 'extraw.qcow2',
    extraFiles: ['extraw.data'],
    make: () => {
      img('create', '-q', '-f', 'qcow2', '-o', 'data_file=extraw.data,data_file_raw=on', 'extraw.qcow2', '1M')
      io('extraw.qcow2', 'write -P 0x20 64k 64k')
    },
  },
]

/**
 * qemu-img's "backing file: NAME [(actual path: PATH)]" line with PATH made absolute (against
 * the image's directory as given, then the working directory), as qcow2fs prints it.
 */
function withAbsoluteBackingPath(line: string, image: string): string {
  const match = /^backing file: (.*?)(?: \(actual path: (.*)\))?$/.exec(line)
  if (!match) return line
  const name = match[1]!
  const full = resolve(dir, match[2] ?? join(dirname(image), name))
  return full === name ? line : `backing file: ${name} (actual path: ${full})`
}

describe.skipIf(!haveQemu)('qcow2fs info vs qemu-img info', () => {
  useSuiteDir('info', (made) => (dir = made))

  beforeAll(() => {
    for (const c of cases) c.make(dir)
    const absolute = cases.find((c) => c.image === '')!
    absolute.image = join(dir, 'chain', 'top.qcow2')
  })

  it.each(cases.map((c) => [c.name, c] as const))('--json matches qemu-img key by key: %s', (_name, c) => {
    const files = [c.image, ...(c.extraFiles ?? [])].map((f) => (isAbsolute(f) ? f : join(dir, f)))
    const hashesBefore = files.map(sha256File)
    const expected = JSON.parse(run(qemuImg!, ['info', '--output=json', c.image], dir)) as Record<string, unknown>
    const result = runCli(['info', '--json', c.image], { cwd: dir })
    expect(result.stderr).toBe('')
    expect(result.status).toBe(0)
    const actual = JSON.parse(result.stdout) as Record<string, unknown>
    const qemuFullBacking = expected['full-backing-filename']
    if (typeof qemuFullBacking === 'string') expected['full-backing-filename'] = resolve(dir, qemuFullBacking)
    const keys = new Set([...Object.keys(expected), ...Object.keys(actual)])
    for (const key of keys) {
      expect(actual[key], `key '${key}'`).toEqual(expected[key])
    }
    expect(files.map(sha256File)).toEqual(hashesBefore)
  })

  it.each(cases.map((c) => [c.name, c] as const))('human output matches qemu-img info: %s', (_name, c) => {
    const expected = run(qemuImg!, ['info', c.image], dir)
    const result = runCli(['info', c.image], { cwd: dir })
    expect(result.stderr).toBe('')
    expect(result.status).toBe(0)
    const trimLines = (text: string): string[] => text.trimEnd().split('\n').map((line) => line.trimEnd())
    expect(trimLines(result.stdout)).toEqual(trimLines(expected).map((line) => withAbsoluteBackingPath(line, c.image)))
  })

  it('--json output parses as the ImageInfo shape', () => {
    const result = runCli(['info', 'snap.qcow2', '--json'], { cwd: dir })
    expect(result.status).toBe(0)
    const info = JSON.parse(result.stdout) as ImageInfo
    expect(info.format).toBe('qcow2')
    expect(info.snapshots?.map((s) => s.name)).toEqual(['first', 'second snapshot with a long name'])
    expect(info['format-specific'].type).toBe('qcow2')
  })
})

describe('size and clock formatting (qemu-img style)', () => {
  it('uses the largest unit that keeps three significant digits below 1000', () => {
    expect(formatSize(0)).toBe('0 B')
    expect(formatSize(999)).toBe('999 B')
    expect(formatSize(1000)).toBe('0.977 KiB')
    expect(formatSize(1024)).toBe('1 KiB')
    expect(formatSize(339968)).toBe('332 KiB')
    expect(formatSize(1048576)).toBe('1 MiB')
    expect(formatSize(1.5 * 1024 ** 3)).toBe('1.5 GiB')
    expect(formatSize(3000000)).toBe('2.86 MiB')
    expect(formatSize(2 ** 50)).toBe('1 PiB')
  })

  it('prints the guest clock as HH:MM:SS.mmm', () => {
    expect(formatVmClock(0, 0)).toBe('00:00:00.000')
    expect(formatVmClock(3723, 45_678_000)).toBe('01:02:03.045')
    expect(formatVmClock(100 * 3600, 999_999_999)).toBe('100:00:00.999')
  })
})

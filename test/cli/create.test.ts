/*
 * `qcow2fs create` through the compiled CLI: SIZE parsing (against qemu-img's own parsing of
 * the same strings), the help text, images byte-identical to `qemu-img create` and its
 * "Formatting ..." line, backing names relative to the image, and every refusal: one line
 * `qcow2fs: ...` on stderr, exit code 2 for usage errors and 1 for file problems, and no file
 * created or changed.
 */
import { spawnSync } from 'node:child_process'
import { existsSync, lstatSync, mkdirSync, readFileSync, readdirSync, symlinkSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, test } from 'vitest'
import { CREATE_OPTIONS, createCommand, parseSizeArgument } from '../../cli/commands/create.js'
import { UsageError } from '../../cli/command.js'
import { parseBackingFileName, parseHeader, parseHeaderExtensions } from '../../lib/format/header.js'
import { requireQemu } from '../helpers/qemu.js'
import { CLI_PATH, type CliResult, ensureBuilt, makeTempDir, removeTempDir, run, runCli, sha256File, stderrLines } from './helpers.js'

const KiB = 1024
const MiB = 1024 * KiB
const GiB = 1024 * MiB

describe('parseSizeArgument', () => {
  test.each([
    ['0', 0],
    ['1000', 1000],
    ['1b', 1],
    ['1B', 1],
    ['1k', KiB],
    ['1K', KiB],
    ['64K', 64 * KiB],
    ['1.5M', 1.5 * MiB],
    ['1.3K', 1331], // 1.3 * 1024 = 1331.2: fractional bytes dropped
    ['1.K', KiB],
    ['10G', 10 * GiB],
    ['2047T', 2047 * 1024 * GiB],
    ['1P', 2 ** 50],
    ['7P', 7 * 2 ** 50],
  ])('%s', (text, bytes) => {
    expect(parseSizeArgument(text)).toBe(bytes)
  })

  test('sizes past 2^53 - 1 bytes are refused', () => {
    expect(parseSizeArgument('9007199254740991')).toBe(Number.MAX_SAFE_INTEGER)
    for (const text of ['9007199254740992', '8P', '1E']) expect(() => parseSizeArgument(text)).toThrow(/'.*' is too large/)
  })

  test.each(['', 'abc', '1.5', '.5K', '1e3', '-1', '+1', '1KiB', '1 K', ' 1K', '0x400', '1Q', '1..5M'])('%j is refused', (text) => {
    expect(() => parseSizeArgument(text)).toThrow(UsageError)
    expect(() => parseSizeArgument(text)).toThrow(/invalid size/)
  })

  test('the option name appears in the message', () => {
    expect(() => parseSizeArgument('big', 'cluster size')).toThrow(/invalid cluster size 'big'/)
  })
})

describe('help', () => {
  test('every option is described in the usage text', () => {
    for (const [name, spec] of Object.entries(CREATE_OPTIONS)) {
      expect(createCommand.usage, `--${name}`).toContain(`--${name}`)
      if ('short' in spec) expect(createCommand.usage, `-${spec.short}`).toContain(`-${spec.short}, --${name}`)
    }
    expect(createCommand.usage).toContain('--help')
    expect(createCommand.usage).toMatch(/never\s+overwrites/)
  })
})

const qemu = requireQemu('qcow2fs create CLI')
const describeQemu = describe.skipIf(!qemu)
const qemuImg = qemu?.qemuImg ?? 'qemu-img'

let dir = ''

/** Every file under dir (recursively), with its sha256, to show nothing changed. */
function snapshotDir(root: string): Record<string, string> {
  const out: Record<string, string> = {}
  const walk = (rel: string): void => {
    for (const entry of readdirSync(join(root, rel), { withFileTypes: true })) {
      const path = join(rel, entry.name)
      if (entry.isDirectory()) walk(path)
      else if (entry.isSymbolicLink()) out[path] = `link`
      else out[path] = sha256File(join(root, path))
    }
  }
  walk('.')
  return out
}

function qemuInfo(image: string, cwd = dir): Record<string, unknown> {
  return JSON.parse(run(qemuImg, ['info', '--output=json', image], cwd)) as Record<string, unknown>
}

function expectCheckClean(image: string, cwd = dir): void {
  const report = JSON.parse(run(qemuImg, ['check', '--output=json', image], cwd)) as Record<string, unknown>
  expect(report['check-errors']).toBe(0)
  expect(report.corruptions ?? 0).toBe(0)
  expect(report.leaks ?? 0).toBe(0)
}

function expectOneLineError(result: CliResult, status: number, message: RegExp): void {
  const lines = stderrLines(result)
  expect(lines, result.stderr).toHaveLength(1)
  expect(lines[0]).toMatch(/^qcow2fs: /)
  expect(lines[0]).toMatch(message)
  expect(result.stdout).toBe('')
  expect(result.status, result.stderr).toBe(status)
}

describeQemu('qcow2fs create', () => {
  beforeAll(() => {
    ensureBuilt()
    dir = makeTempDir('create-cli')
    writeFileSync(join(dir, 'base.raw'), new Uint8Array(3 * MiB + 100).fill(0x42))
    mkdirSync(join(dir, 'sub'))
    run(qemuImg, ['create', '-q', '-f', 'qcow2', join(dir, 'sub', 'base.qcow2'), '5M'])
  })
  afterAll(() => {
    if (dir) removeTempDir(dir)
  })

  test('qcow2fs --help lists the command', () => {
    const result = runCli(['--help'])
    expect(result.status).toBe(0)
    expect(result.stdout).toMatch(/^ {2}create +create a new empty qcow2 image/m)
  })

  test('qcow2fs create --help prints the usage', () => {
    const result = runCli(['create', '--help'])
    expect(result.status).toBe(0)
    expect(result.stdout).toBe(createCommand.usage)
  })

  test('SIZE strings mean what they mean to qemu-img', () => {
    const sizes = ['1000', '1k', '1.5M', '1.3K', '1.K', '1b', '0', '7T', '513']
    sizes.forEach((size, i) => {
      const result = runCli(['create', '-q', `size-${i}.qcow2`, size], { cwd: dir })
      expect(result.status, result.stderr).toBe(0)
      run(qemuImg, ['create', '-q', '-f', 'qcow2', `size-${i}-qemu.qcow2`, size], dir)
      expect(qemuInfo(`size-${i}.qcow2`)['virtual-size'], size).toBe(qemuInfo(`size-${i}-qemu.qcow2`)['virtual-size'])
    })
  })

  test('every option: the same bytes as qemu-img create, and the same Formatting line', () => {
    const cases: { ours: string[]; theirs: string[]; size?: string }[] = [
      { ours: [], theirs: [], size: '1G' },
      { ours: ['--cluster-size', '4K', '--refcount-bits', '8'], theirs: ['-o', 'cluster_size=4096,refcount_bits=8'], size: '300M' },
      { ours: ['--cluster-size=16384', '--extended-l2', '--compression-type', 'zstd', '--lazy-refcounts'], theirs: ['-o', 'cluster_size=16K,extended_l2=on,compression_type=zstd,lazy_refcounts=on'], size: '2G' },
      { ours: ['--refcount-bits=1', '--cluster-size=2M'], theirs: ['-o', 'refcount_bits=1,cluster_size=2M'], size: '1T' },
      { ours: ['-b', 'base.raw'], theirs: ['-b', 'base.raw', '-F', 'raw'] },
      { ours: ['--backing', 'sub/base.qcow2', '--backing-format', 'qcow2'], theirs: ['-b', 'sub/base.qcow2', '-F', 'qcow2'], size: '7M' },
      { ours: ['-b', 'sub/base.qcow2', '--cluster-size', '512'], theirs: ['-b', 'sub/base.qcow2', '-F', 'qcow2', '-o', 'cluster_size=512'] },
    ]
    cases.forEach((c, i) => {
      const size = c.size === undefined ? [] : [c.size]
      const result = runCli(['create', ...c.ours, `opt-${i}.qcow2`, ...size], { cwd: dir })
      expect(result.status, result.stderr).toBe(0)
      expect(result.stderr).toBe('')
      const qemuLine = run(qemuImg, ['create', '-f', 'qcow2', ...c.theirs, `opt-${i}-qemu.qcow2`, ...size], dir)
      expect(result.stdout).toBe(qemuLine.replace(`opt-${i}-qemu.qcow2`, `opt-${i}.qcow2`))
      const ours = readFileSync(join(dir, `opt-${i}.qcow2`))
      const theirs = readFileSync(join(dir, `opt-${i}-qemu.qcow2`))
      expect(ours.equals(theirs), `case ${i}: ${c.ours.join(' ')}`).toBe(true)
      expectCheckClean(`opt-${i}.qcow2`)
    })
  })

  test('--quiet prints nothing', () => {
    const result = runCli(['create', '--quiet', 'quiet.qcow2', '1M'], { cwd: dir })
    expect(result.status).toBe(0)
    expect(result.stdout).toBe('')
    expect(result.stderr).toBe('')
  })

  test('a relative backing name is found from the image directory and stored as given', () => {
    // Run from dir: the image goes into sub/, and 'base.qcow2' is sub/base.qcow2.
    const result = runCli(['create', '-q', '-b', 'base.qcow2', 'sub/top.qcow2'], { cwd: dir })
    expect(result.status, result.stderr).toBe(0)
    const bytes = readFileSync(join(dir, 'sub', 'top.qcow2'))
    const header = parseHeader(bytes)
    expect(parseBackingFileName(header, bytes)).toBe('base.qcow2')
    expect(parseHeaderExtensions(header, bytes.subarray(0, 65536)).backingFormat).toBe('qcow2')
    const info = qemuInfo('sub/top.qcow2')
    expect(info['virtual-size']).toBe(5 * MiB)
    expect(info['backing-filename']).toBe('base.qcow2')
    expect(info['backing-filename-format']).toBe('qcow2')
    expectCheckClean('sub/top.qcow2')
    // A backing name that only exists relative to the working directory is not found.
    const wrong = runCli(['create', '-q', '-b', 'base.raw', 'sub/wrong.qcow2'], { cwd: dir })
    expectOneLineError(wrong, 1, /backing file 'base.raw' of 'sub\/wrong.qcow2' not found/)
  })

  test('the size may be left out only with a backing file; it is the backing file size rounded up', () => {
    const result = runCli(['create', '-q', '-b', 'base.raw', 'from-raw.qcow2'], { cwd: dir })
    expect(result.status, result.stderr).toBe(0)
    expect(qemuInfo('from-raw.qcow2')['virtual-size']).toBe(Math.ceil((3 * MiB + 100) / 512) * 512)
  })

  test('a write that fails removes the partial file', () => {
    // A 100 KiB file size limit: Node ignores SIGXFSZ, so growing the file fails with EFBIG.
    const result = spawnSync('sh', ['-c', `ulimit -f 100; exec "$0" "$@"`, process.execPath, CLI_PATH, 'create', 'limited.qcow2', '1G'], {
      cwd: dir,
      encoding: 'utf8',
      timeout: 30_000,
    })
    expect(result.status, result.stderr).toBe(1)
    expect(result.stderr).toMatch(/^qcow2fs: cannot write 'limited.qcow2' \(the partial file was removed\): EFBIG/)
    expect(stderrLines({ ...result, signal: null, elapsedMs: 0 })).toHaveLength(1)
    expect(existsSync(join(dir, 'limited.qcow2'))).toBe(false)
  })

  const refusals: { name: string; args: string[]; status: number; message: RegExp }[] = [
    { name: 'no arguments', args: [], status: 2, message: /missing IMAGE/ },
    { name: 'no size', args: ['x.qcow2'], status: 2, message: /size is needed/ },
    { name: 'a bad size', args: ['x.qcow2', '10Q'], status: 2, message: /invalid size '10Q'/ },
    { name: 'a fraction without a suffix', args: ['x.qcow2', '1.5'], status: 2, message: /invalid size '1.5'/ },
    { name: 'a size beyond 2^53', args: ['x.qcow2', '8P'], status: 2, message: /too large/ },
    { name: 'too many arguments', args: ['x.qcow2', '1G', 'extra'], status: 2, message: /expected IMAGE and SIZE/ },
    { name: 'an unknown option', args: ['x.qcow2', '1G', '--bogus'], status: 2, message: /unknown option '--bogus'/ },
    { name: 'an option without its value', args: ['x.qcow2', '1G', '--cluster-size'], status: 2, message: /--cluster-size/ },
    { name: 'a cluster size that is no power of two', args: ['x.qcow2', '1G', '--cluster-size', '1000'], status: 2, message: /cluster size must be a power of two between 512 and 2M/ },
    { name: 'a cluster size above 2M', args: ['x.qcow2', '1G', '--cluster-size', '4M'], status: 2, message: /cluster size must be a power of two/ },
    { name: 'a cluster size below 512', args: ['x.qcow2', '1G', '--cluster-size', '256'], status: 2, message: /cluster size must be a power of two/ },
    { name: 'extended L2 with small clusters', args: ['x.qcow2', '1G', '--extended-l2', '--cluster-size', '8K'], status: 2, message: /extended L2 entries are only supported with cluster sizes of at least 16384 bytes/ },
    { name: 'refcount bits 3', args: ['x.qcow2', '1G', '--refcount-bits', '3'], status: 2, message: /refcount width must be a power of two and at most 64 bits/ },
    { name: 'refcount bits 128', args: ['x.qcow2', '1G', '--refcount-bits', '128'], status: 2, message: /refcount width/ },
    { name: 'refcount bits not a number', args: ['x.qcow2', '1G', '--refcount-bits', 'many'], status: 2, message: /invalid refcount bits 'many'/ },
    { name: 'an unknown compression type', args: ['x.qcow2', '1G', '--compression-type', 'lz4'], status: 2, message: /compression type must be zlib or zstd/ },
    { name: 'a backing format without a backing file', args: ['x.qcow2', '1G', '--backing-format', 'raw'], status: 2, message: /backing format needs a backing file/ },
    { name: 'an unsupported backing format', args: ['x.qcow2', '-b', 'base.raw', '-F', 'vmdk'], status: 2, message: /backing format 'vmdk' is not supported/ },
    { name: '16T with 512-byte clusters (L1 table over 32 MiB)', args: ['x.qcow2', '16T', '--cluster-size', '512'], status: 2, message: /L1 table.*use a larger cluster size/ },
    { name: 'a backing name too long for the header cluster', args: ['x.qcow2', '1G', '--cluster-size', '512', '-b', 'n'.repeat(400)], status: 2, message: /512-byte cluster/ },
    { name: 'a missing backing file', args: ['x.qcow2', '-b', 'missing.raw'], status: 1, message: /backing file 'missing.raw' of 'x.qcow2' not found/ },
    { name: 'a backing file that is not the format given', args: ['x.qcow2', '-b', 'base.raw', '-F', 'qcow2'], status: 1, message: /not a qcow2 image/ },
    { name: 'a directory that does not exist', args: ['nodir/x.qcow2', '1G'], status: 1, message: /cannot create 'nodir\/x.qcow2': directory 'nodir' does not exist/ },
    { name: 'an existing image', args: ['existing.qcow2', '1G'], status: 1, message: /'existing.qcow2' already exists; qcow2fs create never overwrites a file/ },
    { name: 'an existing file of another kind', args: ['base.raw', '1G'], status: 1, message: /'base.raw' already exists/ },
    { name: 'a dangling symbolic link', args: ['dangling.qcow2', '1G'], status: 1, message: /'dangling.qcow2' already exists/ },
  ]

  describe('refusals', () => {
    let refusalDir = ''
    beforeAll(() => {
      refusalDir = makeTempDir('create-cli-refusals')
      writeFileSync(join(refusalDir, 'base.raw'), new Uint8Array(MiB).fill(7))
      run(qemuImg, ['create', '-q', '-f', 'qcow2', join(refusalDir, 'existing.qcow2'), '1M'])
      symlinkSync('nowhere.qcow2', join(refusalDir, 'dangling.qcow2'))
    })
    afterAll(() => {
      if (refusalDir) removeTempDir(refusalDir)
    })

    test.each(refusals)('$name: exit $status, one line, nothing written', ({ args, status, message }) => {
      const before = snapshotDir(refusalDir)
      const result = runCli(['create', ...args], { cwd: refusalDir })
      expectOneLineError(result, status, message)
      if (status === 2) expect(result.stderr).toContain("(see 'qcow2fs create --help')")
      expect(snapshotDir(refusalDir)).toEqual(before)
      expect(lstatSync(join(refusalDir, 'dangling.qcow2')).isSymbolicLink()).toBe(true)
    })
  })
})

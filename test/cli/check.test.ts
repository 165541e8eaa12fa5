/*
 * `qcow2fs check` (the compiled CLI) against `qemu-img check`, run with the same arguments in
 * the same directory:
 *   - stdout is the same text (human and --json, the JSON byte for byte in qemu-img's key
 *     order), and the exit code is the same (0 clean, 2 corruptions, 3 leaks, 1 check errors);
 *   - the problem lines on stderr are qemu-img's, except its own prefixes ("qemu-img: Check
 *     failed" is "qcow2fs: check failed", and QEMU's "qcow2: Image is corrupt..." notice has no
 *     counterpart);
 *   - with --repair, the report of what was fixed and the double check read the same;
 *   - without --repair the image is never modified;
 *   - bad input is one line on stderr and exit 1 (usage errors too: 2 means corruptions).
 *     A hostile image (tables pointing at each other far more than the file can hold, a huge
 *     L1 table) ends within a few seconds.
 */
import { copyFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { spawn, spawnSync } from 'node:child_process'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { appendCluster, hostClusterOf, readHeader, readL1Entry, readL2Entry, setRefcount, writeBigEndian, writeBytes } from '../helpers/damage.js'
import { locksOn } from '../helpers/locks.js'
import { requireQemu } from '../helpers/qemu.js'
import { ensureBuilt, makeTempDir, removeTempDir, runCli, sha256File, stderrLines } from './helpers.js'

const qemu = requireQemu('qcow2fs check CLI vs qemu-img check')

let dir = ''

function qemuImg(args: string[]): { status: number; stdout: string; stderr: string } {
  const r = spawnSync(qemu!.qemuImg, args, { cwd: dir, encoding: 'utf8', timeout: 60_000 })
  return { status: r.status ?? -1, stdout: r.stdout, stderr: r.stderr }
}

function mustQemuImg(...args: string[]): void {
  const r = qemuImg(args)
  if (r.status !== 0) throw new Error(`qemu-img ${args.join(' ')}: ${r.stderr}`)
}

function qemuIo(image: string, ...commands: string[]): void {
  const r = spawnSync(qemu!.qemuIo, ['-f', 'qcow2', ...commands.flatMap((c) => ['-c', c]), image], { cwd: dir, encoding: 'utf8' })
  if (r.status !== 0) throw new Error(`qemu-io: ${r.stderr}`)
}

/** Problem lines of qemu-img without its own notices, in our wording of the final failure. */
function qemuProblemLines(stderr: string): string[] {
  return stderr
    .split('\n')
    .filter((line) => line !== '' && !line.startsWith('qcow2: '))
    .map((line) => (line === 'qemu-img: Check failed' ? 'qcow2fs: check failed' : line))
}

const dataCluster = (image: string, guestCluster: number): number => hostClusterOf(image, readL2Entry(image, guestCluster).descriptor)

interface Case {
  name: string
  image: string
  make(path: string): void
}

const cases: Case[] = [
  { name: 'clean, compressed clusters (percentages)', image: 'clean.qcow2', make: () => {} },
  { name: 'a leak', image: 'leak.qcow2', make: (p) => setRefcount(p, appendCluster(p), 1) },
  { name: 'refcount too high (leak + corruption)', image: 'up.qcow2', make: (p) => setRefcount(p, dataCluster(p, 0), 2) },
  { name: 'refcount 0 on a used cluster (rebuild)', image: 'down.qcow2', make: (p) => setRefcount(p, dataCluster(p, 0), 0) },
  {
    name: 'unaligned refcount block (check errors)',
    image: 'unaligned.qcow2',
    make: (p) => writeBigEndian(p, readHeader(p).refcountTableOffset, 8, 0x20200n),
  },
]

describe.skipIf(!qemu)('qcow2fs check (CLI) against qemu-img check', () => {
  beforeAll(async () => {
    ensureBuilt()
    dir = makeTempDir('check-cli')
    mustQemuImg('create', '-q', '-f', 'qcow2', 'base.qcow2', '4M')
    qemuIo('base.qcow2', 'write -P 1 0 128k', 'write -z 512k 64k', 'write -c -P 3 1M 64k', 'write -c -P 4 1088k 64k', 'write -P 4 2M 4k')
    for (const c of cases) {
      copyFileSync(join(dir, 'base.qcow2'), join(dir, c.image))
      c.make(join(dir, c.image))
    }
  })
  afterAll(() => {
    if (dir) removeTempDir(dir)
  })

  for (const c of cases) {
    for (const json of [false, true]) {
      it(`${c.name}${json ? ' (--json)' : ''}`, () => {
        const hashBefore = sha256File(join(dir, c.image))
        const args = ['check', ...(json ? ['--json'] : []), c.image]
        const theirs = qemuImg(json ? ['check', '--output=json', c.image] : ['check', c.image])
        const ours = runCli(args, { cwd: dir })
        expect(ours.stdout).toBe(theirs.stdout)
        expect(ours.status).toBe(theirs.status)
        expect(stderrLines(ours)).toEqual(qemuProblemLines(theirs.stderr))
        expect(sha256File(join(dir, c.image)), 'check without --repair never writes').toBe(hashBefore)
      })
    }
    for (const mode of ['leaks', 'all'] as const) {
      it(`${c.name}: --repair ${mode}`, () => {
        const oursImage = `${c.image}.ours-${mode}.qcow2`
        const theirsImage = `${c.image}.qemu-${mode}.qcow2`
        copyFileSync(join(dir, c.image), join(dir, oursImage))
        copyFileSync(join(dir, c.image), join(dir, theirsImage))
        const theirs = qemuImg(['check', '-r', mode, theirsImage])
        const ours = runCli(['check', '--repair', mode, oursImage], { cwd: dir })
        if (c.image === 'unaligned.qcow2' && mode === 'all') {
          // qemu-img's rebuild fails on the unaligned block (its overlap check cannot read
          // it); ours rebuilds around it and ends clean.
          expect(theirs.status).toBe(1)
          expect(ours.status).toBe(0)
          expect(ours.stdout).toContain('Double checking the fixed image now...\nNo errors were found on the image.\n')
          expect(qemuImg(['check', oursImage]).status).toBe(0)
          return
        }
        expect(ours.stdout.replaceAll(oursImage, theirsImage)).toBe(theirs.stdout)
        expect(ours.status).toBe(theirs.status)
        if (ours.status !== 1) expect(qemuImg(['check', oursImage]).status).toBe(qemuImg(['check', theirsImage]).status)
      })
    }
  }

  it('--repair --json reports what was fixed, in qemu-img key order', () => {
    copyFileSync(join(dir, 'up.qcow2'), join(dir, 'up-json-ours.qcow2'))
    copyFileSync(join(dir, 'up.qcow2'), join(dir, 'up-json-qemu.qcow2'))
    const theirs = qemuImg(['check', '-r', 'all', '--output=json', 'up-json-qemu.qcow2'])
    const ours = runCli(['check', '-r', 'all', '--json', 'up-json-ours.qcow2'], { cwd: dir })
    expect(ours.stdout.replace('up-json-ours', 'up-json-qemu')).toBe(theirs.stdout)
    expect(ours.stdout).toContain('"leaks-fixed": 1')
  })

  it('help and the command list', () => {
    const help = runCli(['check', '--help'])
    expect(help.status).toBe(0)
    expect(help.stdout).toMatch(/^Usage: qcow2fs check \[--repair leaks\|all\] \[--json\] \[-U\] IMAGE/)
    const main = runCli(['--help'])
    expect(main.stdout).toMatch(/^ {2}check {2,}check an image/m)
    expect(main.stdout).toMatch(/^ {2}map {2,}show where/m)
  })

  it('usage errors and unreadable images: one line, exit 1', () => {
    for (const args of [['check'], ['check', 'a', 'b'], ['check', '--repair', 'some', 'clean.qcow2'], ['check', '--bogus', 'clean.qcow2']]) {
      const r = runCli(args, { cwd: dir })
      expect(r.status, args.join(' ')).toBe(1)
      expect(stderrLines(r), args.join(' ')).toHaveLength(1)
      expect(r.stderr).toMatch(/^qcow2fs: .*\(see 'qcow2fs check --help'\)\n$/)
    }
    writeFileSync(join(dir, 'not-qcow2.img'), Buffer.alloc(4096, 7))
    for (const image of ['missing.qcow2', 'not-qcow2.img']) {
      const r = runCli(['check', image], { cwd: dir })
      expect(r.status).toBe(1)
      expect(stderrLines(r)).toHaveLength(1)
      expect(r.stderr).toMatch(image === 'missing.qcow2' ? /no such file/ : /not a qcow2 image/)
      expect(r.stdout).toBe('')
    }
  })

  it('takes the read lock: an image open for writing elsewhere is refused, -U checks it anyway', async () => {
    // qemu-io holds the write lock while it sleeps.
    const holder = spawn(qemu!.qemuIo, ['-f', 'qcow2', '-c', 'sleep 20000', 'clean.qcow2'], { cwd: dir, stdio: 'ignore' })
    try {
      await waitForLock(join(dir, 'clean.qcow2'))
      const refused = runCli(['check', 'clean.qcow2'], { cwd: dir })
      expect(refused.status).toBe(1)
      expect(refused.stderr).toMatch(/^qcow2fs: 'clean.qcow2' is in use by another process[^\n]*\n$/)
      const forced = runCli(['check', '-U', 'clean.qcow2'], { cwd: dir })
      expect(forced.status).toBe(0)
      expect(forced.stdout).toMatch(/^No errors were found on the image\./)
      const withRepair = runCli(['check', '-U', '-r', 'leaks', 'clean.qcow2'], { cwd: dir })
      expect(withRepair.status).toBe(1)
      expect(withRepair.stderr).toMatch(/cannot be used with --repair/)
    } finally {
      holder.kill('SIGKILL')
    }
  })

  it('a hostile image: every L1 entry names one L2 table, whose entries name the L1 table', () => {
    // 4096 L1 entries (32 KiB) all naming one L2 table; its 8192 entries all name the L1
    // table's cluster: 33 million references, which qemu-img counts one by one. Ours walks
    // the table once with its multiplicity and must end within seconds.
    copyFileSync(join(dir, 'base.qcow2'), join(dir, 'hostile.qcow2'))
    const p = join(dir, 'hostile.qcow2')
    const h = readHeader(p)
    const l2Offset = readL1Entry(p, 0) & 0x00ff_ffff_ffff_fe00n
    const l1Cluster = appendCluster(p)
    const l1 = Buffer.alloc(8 * 4096)
    for (let i = 0; i < 4096; i++) l1.writeBigUInt64BE((1n << 63n) | l2Offset, i * 8)
    writeBytes(p, l1Cluster * h.clusterSize, l1)
    const l2 = Buffer.alloc(h.clusterSize)
    for (let i = 0; i < h.clusterSize / 8; i++) l2.writeBigUInt64BE((1n << 63n) | BigInt(l1Cluster * h.clusterSize), i * 8)
    writeBytes(p, Number(l2Offset), l2)
    writeBigEndian(p, 36, 4, 4096n) // l1_size
    writeBigEndian(p, 40, 8, BigInt(l1Cluster * h.clusterSize)) // l1_table_offset
    const started = Date.now()
    const ours = runCli(['check', '--json', 'hostile.qcow2'], { cwd: dir, timeoutMs: 30_000 })
    expect(Date.now() - started).toBeLessThan(10_000)
    expect(ours.status).toBe(2)
    const counts = JSON.parse(ours.stdout) as Record<string, number>
    // Every L2 entry of every walk is an allocated cluster of the active image.
    expect(counts['allocated-clusters']).toBe(4096 * (h.clusterSize / 8))
    expect(counts['corruptions']).toBeGreaterThan(4096 * (h.clusterSize / 8) - 65535)
  })
})


/** Resolves once some process holds a lock on `file` (qemu-io has opened it). */
async function waitForLock(file: string): Promise<void> {
  for (let i = 0; i < 100; i++) {
    if (locksOn(file).length > 0) return
    await new Promise((done) => setTimeout(done, 50))
  }
  throw new Error(`nobody locked ${file}`)
}

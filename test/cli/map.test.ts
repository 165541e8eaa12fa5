/*
 * `qcow2fs map` (the compiled CLI) against `qemu-img map`, same arguments, same directory:
 * the same stdout in both formats (file names in the human table as qemu-img writes them:
 * backing files joined to the image's directory as given), the same refusal of compressed
 * clusters in the human format, the holes of an external data file (reported by both only
 * when the image file is sparse: QEMU's test for preallocated metadata), and one-line errors
 * for what cannot be mapped.
 */
import { copyFileSync, statSync } from 'node:fs'
import { join } from 'node:path'
import { spawn, spawnSync } from 'node:child_process'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { readHeader, readL1Entry, readL2Entry, writeBytes, writeL1Entry, writeL2Entry } from '../helpers/damage.js'
import { FIXTURES_DIR } from '../helpers/fixtures.js'
import { requireQemu } from '../helpers/qemu.js'
import { ensureBuilt, makeTempDir, removeTempDir, runCli, sha256File, stderrLines } from './helpers.js'
import { locksOn } from '../helpers/locks.js'

const qemu = requireQemu('qcow2fs map CLI vs qemu-img map')

function qemuImg(args: string[], cwd: string): { status: number; stdout: string; stderr: string } {
  const r = spawnSync(qemu!.qemuImg, args, { cwd, encoding: 'utf8', timeout: 60_000 })
  return { status: r.status ?? -1, stdout: r.stdout, stderr: r.stderr }
}

let dir = ''

/** `qcow2fs map` and `qemu-img map` on `image` from `where`: the same output in both formats. */
function expectSameCli(where: string, image: string): string {
  const hash = sha256File(join(where, image))
  const theirsJson = qemuImg(['map', '--output=json', image], where)
  const oursJson = runCli(['map', '--json', image], { cwd: where })
  expect(oursJson.status).toBe(0)
  expect(oursJson.stdout).toBe(theirsJson.stdout)
  const theirs = qemuImg(['map', image], where)
  const ours = runCli(['map', image], { cwd: where })
  expect(ours.stdout).toBe(theirs.stdout)
  expect(ours.status).toBe(theirs.status)
  if (theirs.status !== 0) {
    expect(theirs.stderr).toBe('qemu-img: File contains external, encrypted or compressed clusters.\n')
    expect(ours.stderr).toBe('qcow2fs: File contains external, encrypted or compressed clusters.\n')
  }
  expect(sha256File(join(where, image))).toBe(hash)
  return theirsJson.stdout
}

describe.skipIf(!qemu)('qcow2fs map (CLI) against qemu-img map', () => {
  beforeAll(() => {
    ensureBuilt()
    dir = makeTempDir('map-cli')
  })
  afterAll(() => {
    if (dir) removeTempDir(dir)
  })

  for (const [cwd, image] of [
    ['', 'images/c4k.qcow2'],
    ['', 'chain/top.qcow2'],
    ['chain', 'mid.qcow2'],
    ['images', 'el2-c16k.qcow2'],
    ['images', 'datafile.qcow2'],
    ['images', 'datafile-raw.qcow2'],
    ['', 'images/zlib.qcow2'],
  ] as const) {
    it(`${image} (from fixtures/${cwd})`, () => {
      expectSameCli(join(FIXTURES_DIR, cwd), image)
    })
  }

  for (const raw of ['off', 'on']) {
    it(`holes of an external data file (data_file_raw=${raw}): a cluster in a hole, half a cluster`, () => {
      const name = `holes-${raw}`
      const run = (program: string, args: string[]) => {
        const r = spawnSync(program, args, { cwd: dir, encoding: 'utf8', timeout: 60_000 })
        expect(r.status, `${program} ${args.join(' ')}: ${r.stderr}`).toBe(0)
      }
      run(qemu!.qemuImg, ['create', '-q', '-f', 'qcow2', '-o', `data_file=${name}.data,data_file_raw=${raw}`, `${name}.qcow2`, '2M'])
      run(qemu!.qemuIo, ['-f', 'qcow2', '-c', 'write -P 1 0 512k', '-c', 'write -P 0 512k 64k', '-c', 'write -z 1M 64k', `${name}.qcow2`])
      // Where the file system keeps no holes, the images are compared without them.
      const before = statSync(join(dir, `${name}.data`)).blocks
      const punch = (args: string[]) => spawnSync('fallocate', args, { cwd: dir, encoding: 'utf8' }).status === 0
      const hostHoles =
        punch(['-p', '-o', '65536', '-l', '65536', `${name}.data`]) &&
        punch(['-p', '-o', '229376', '-l', '32768', `${name}.data`]) &&
        statSync(join(dir, `${name}.data`)).blocks < before
      // As written: the image file holds its metadata; qemu-img asks the data file only if
      // the host holds clearly less of it than its refcounts count.
      expectSameCli(dir, `${name}.qcow2`)
      // A sparse copy of the image file: qemu-img takes it for preallocated metadata and asks.
      copyFileSync(join(dir, `${name}.qcow2`), join(dir, `${name}-sparse.qcow2`))
      if (hostHoles) run('fallocate', ['--dig-holes', `${name}-sparse.qcow2`])
      const theirs = expectSameCli(dir, `${name}-sparse.qcow2`)
      if (hostHoles) {
        expect(theirs).toContain('{ "start": 65536, "length": 65536, "depth": 0, "present": true, "zero": true, "data": true, "offset": 65536}')
        expect(theirs).toContain('{ "start": 229376, "length": 32768, "depth": 0, "present": true, "zero": true, "data": true, "offset": 229376}')
      }
    })
  }

  it('takes the read lock: an image open for writing elsewhere is refused, -U maps it anyway', async () => {
    const image = join(dir, 'locked.qcow2')
    spawnSync(qemu!.qemuImg, ['create', '-q', '-f', 'qcow2', image, '1M'])
    const holder = spawn(qemu!.qemuIo, ['-f', 'qcow2', '-c', 'sleep 20000', image], { stdio: 'ignore' })
    try {
      await waitForLock(image)
      const refused = runCli(['map', image])
      expect(refused.status).toBe(1)
      expect(refused.stderr).toMatch(/is in use by another process/)
      const forced = runCli(['map', '--json', '-U', image])
      expect(forced.status).toBe(0)
      expect(forced.stdout).toBe('[{ "start": 0, "length": 1048576, "depth": 0, "present": false, "zero": true, "data": false}]\n')
    } finally {
      holder.kill('SIGKILL')
    }
  })

  it('a hostile image (every L1 entry names one L2 table of alternating entries) stops within seconds', () => {
    // 512-byte clusters: 4096 L1 entries cover 128 MiB, each through the same L2 table whose
    // 64 entries alternate data and zero clusters: 262144 extents from a 2 MiB file. Sound
    // tables could give at most a few thousand; the map stops with one line, exit 1.
    const p = join(dir, 'hostile-map.qcow2')
    spawnSync(qemu!.qemuImg, ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512', p, '128M'])
    spawnSync(qemu!.qemuIo, ['-f', 'qcow2', '-c', 'write -P 1 0 512', p])
    const l2 = readL1Entry(p, 0)
    const l1 = Buffer.alloc(4096 * 8)
    for (let i = 0; i < 4096; i++) l1.writeBigUInt64BE(l2, i * 8)
    const data = readL2Entry(p, 0).descriptor
    const table = Buffer.alloc(512)
    for (let i = 0; i < 64; i++) table.writeBigUInt64BE(i % 2 === 0 ? data : 1n, i * 8)
    writeBytes(p, Number(l2 & 0x00ff_ffff_ffff_fe00n), table)
    writeBytes(p, readHeader(p).l1TableOffset, l1)
    const started = Date.now()
    const r = runCli(['map', '--json', p], { timeoutMs: 30_000 })
    expect(Date.now() - started).toBeLessThan(10_000)
    expect(r.status).toBe(1)
    expect(stderrLines(r)).toHaveLength(1)
    expect(r.stderr).toMatch(/L2 tables are referenced more often than its files can hold/)
  })

  it('usage errors exit 2; unreadable images and metadata exit 1, one line each', () => {
    for (const args of [['map'], ['map', 'a', 'b'], ['map', '--bogus', 'x']]) {
      const r = runCli(args)
      expect(r.status, args.join(' ')).toBe(2)
      expect(stderrLines(r)).toHaveLength(1)
    }
    const missing = runCli(['map', join(dir, 'missing.qcow2')])
    expect(missing.status).toBe(1)
    expect(missing.stderr).toMatch(/^qcow2fs: .*no such file\n$/)

    // A backing file that is not there.
    const top = join(dir, 'orphan.qcow2')
    spawnSync(qemu!.qemuImg, ['create', '-q', '-f', 'qcow2', '-b', 'gone.qcow2', '-F', 'qcow2', '-u', top, '1M'])
    const orphan = runCli(['map', top])
    expect(orphan.status).toBe(1)
    expect(orphan.stderr).toMatch(/^qcow2fs: backing file 'gone.qcow2' .*not found.*\n$/)

    // Metadata QEMU's block status fails on: an unaligned L2 table, an unaligned data cluster.
    const base = join(dir, 'damaged-base.qcow2')
    spawnSync(qemu!.qemuImg, ['create', '-q', '-f', 'qcow2', base, '1M'])
    spawnSync(qemu!.qemuIo, ['-f', 'qcow2', '-c', 'write -P 1 0 64k', base])
    for (const [name, damage] of [
      ['unaligned-l2.qcow2', (p: string) => writeL1Entry(p, 0, readL1Entry(p, 0) + 0x200n)],
      ['unaligned-data.qcow2', (p: string) => writeL2Entry(p, 0, { descriptor: readL2Entry(p, 0).descriptor + 0x200n, bitmap: 0n })],
    ] as const) {
      const p = join(dir, name)
      copyFileSync(base, p)
      damage(p)
      expect(readHeader(p).clusterSize).toBe(65536)
      const theirs = qemuImg(['map', '--output=json', name], dir)
      const ours = runCli(['map', '--json', name], { cwd: dir })
      expect(theirs.status).toBe(1)
      expect(ours.status).toBe(1)
      expect(stderrLines(ours)).toHaveLength(1)
      expect(ours.stderr).toMatch(/^qcow2fs: 'unaligned-[a-z0-9]+\.qcow2': .*unaligned/)
      // qemu-img prints the '[' before it fails; we print nothing.
      expect(ours.stdout).toBe('')
    }
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

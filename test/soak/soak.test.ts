/*
 * Soak: load on one read-write mount and on a compressed image, for SOAK_SECONDS (default 20 in
 * make test; `make soak` runs 600):
 *   - fio, 4 jobs of 4-64 KiB random writes, each verified by reading it back (crc32c,
 *     verify_backlog), each job in its own 64 MiB region of one raw file;
 *   - at the same time, 4 readers hashing a read-only mount of a compressed image (made by
 *     qemu-img convert -c) over and over, each result compared with qemu-img's reading.
 * No fio error, no verify failure, every hash right, clean unmounts, and `qemu-img check`
 * clean afterwards (no errors, no leaks).
 */
import { spawn } from 'node:child_process'
import { createHash } from 'node:crypto'
import { createReadStream } from 'node:fs'
import { mkdir, rm, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { serverLogPath } from '../../lib/fuse/control.js'
import { CLI_PATH, ensureBuilt } from '../cli/helpers.js'
import { forceUnmount, mountEntry, runProcess } from '../fuse/helpers.js'
import { findExecutable, isCi, makeTempDir, qemuImg, removeTempDir, requireQemu } from '../helpers/qemu.js'

const SOAK_SECONDS = Number(process.env.SOAK_SECONDS ?? 20)
const qemu = requireQemu('soak')
const fio = findExecutable('fio')
if (!fio && isCi()) throw new Error('fio is required in CI (apt-get install -y fio)')
const MiB = 1024 * 1024

function cli(args: string[]) {
  const env = { ...process.env }
  delete env.DEBUG
  return runProcess(process.execPath, [CLI_PATH, ...args], { timeoutMs: 120_000, env })
}

function hashFile(path: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const hash = createHash('sha256')
    createReadStream(path, { highWaterMark: 1024 * 1024 })
      .on('data', (chunk) => hash.update(chunk))
      .on('end', () => resolve(hash.digest('hex')))
      .on('error', reject)
  })
}

describe.skipIf(!qemu || !fio)('soak', () => {
  const tools = qemu!
  let dir = ''
  const mountpoints: string[] = []

  beforeAll(async () => {
    ensureBuilt()
    dir = await makeTempDir('soak')
  })
  afterAll(async () => {
    for (const mnt of mountpoints) {
      if (mountEntry(mnt)?.fsType === 'fuse.qcow2fs') await cli(['unmount', '--lazy', mnt]).catch(() => undefined)
      await forceUnmount(mnt)
      await rm(serverLogPath(mnt), { force: true })
    }
    if (dir) await removeTempDir(dir)
  })

  it(`fio random writes with verify and parallel readers of a compressed image, ${SOAK_SECONDS} s`, async () => {
    // The compressed image: text-like and binary-like data with zero runs.
    const data = Buffer.alloc(48 * MiB)
    for (let i = 0; i < data.length; i += 4096) {
      const block = i / 4096
      if (block % 7 === 0) continue
      const line = Buffer.from(`block ${block} ${'qcow2fs soak '.repeat(1 + (block % 9))}\n`)
      for (let j = 0; j < 4096; j += line.length) line.copy(data, i + j, 0, Math.min(line.length, 4096 - j))
      if (block % 5 === 0) for (let j = 0; j < 4096; j += 4) data.writeUInt32LE((block * 2654435761 + j * 40503) >>> 0, i + j)
    }
    const source = join(dir, 'source.raw')
    await writeFile(source, data)
    const compressed = join(dir, 'compressed.qcow2')
    await qemuImg(tools, ['convert', '-c', '-f', 'raw', '-O', 'qcow2', source, compressed])
    const expectedHash = createHash('sha256').update(data).digest('hex')

    const writable = join(dir, 'writable.qcow2')
    await qemuImg(tools, ['create', '-q', '-f', 'qcow2', writable, '256M'])
    const writeMnt = join(dir, 'w')
    const readMnt = join(dir, 'r')
    await mkdir(writeMnt)
    await mkdir(readMnt)
    mountpoints.push(writeMnt, readMnt)
    expect((await cli(['mount', writable, writeMnt])).code).toBe(0)
    expect((await cli(['mount', '-o', 'ro', compressed, readMnt])).code).toBe(0)

    const fioRun = new Promise<{ code: number | null; stdout: string; stderr: string }>((resolve) => {
      const child = spawn(fio!, [
        '--name=soak',
        `--filename=${join(writeMnt, 'writable.raw')}`,
        '--rw=randwrite',
        '--bsrange=4k-64k',
        '--ioengine=psync',
        '--numjobs=4',
        '--size=64M',
        '--offset_increment=64M',
        '--verify=crc32c',
        '--verify_backlog=128',
        '--verify_fatal=1',
        // No verify state files in the working directory.
        '--verify_state_save=0',
        '--time_based',
        `--runtime=${SOAK_SECONDS}`,
        '--group_reporting',
        '--output-format=json',
      ])
      let stdout = ''
      let stderr = ''
      child.stdout.on('data', (c: Buffer) => (stdout += c.toString()))
      child.stderr.on('data', (c: Buffer) => (stderr += c.toString()))
      child.on('exit', (code) => resolve({ code, stdout, stderr }))
    })
    const deadline = Date.now() + SOAK_SECONDS * 1000
    let reads = 0
    const wrong: string[] = []
    const readers = Array.from({ length: 4 }, async () => {
      while (Date.now() < deadline) {
        const hash = await hashFile(join(readMnt, 'compressed.raw'))
        reads++
        if (hash !== expectedHash) wrong.push(hash)
      }
    })
    await Promise.all(readers)
    const result = await fioRun
    expect(result.code, result.stderr).toBe(0)
    const report = JSON.parse(result.stdout.slice(result.stdout.indexOf('{'))) as { jobs: { error: number; write: { io_bytes: number }; read: { io_bytes: number } }[] }
    expect(report.jobs[0]!.error).toBe(0)
    expect(report.jobs[0]!.write.io_bytes).toBeGreaterThan(0)
    // verify_backlog reads back what was written: the read side is the verification.
    expect(report.jobs[0]!.read.io_bytes).toBeGreaterThan(0)
    expect(wrong).toEqual([])
    expect(reads).toBeGreaterThanOrEqual(4)

    for (const mnt of [writeMnt, readMnt]) {
      const r = await cli(['unmount', mnt])
      expect(r.code, r.stderr).toBe(0)
    }
    for (const image of [writable, compressed]) {
      const check = await runProcess(tools.qemuImg, ['check', '--output=json', image])
      expect(check.code, check.stdout.toString()).toBe(0)
    }
  }, (SOAK_SECONDS + 120) * 1000)
})

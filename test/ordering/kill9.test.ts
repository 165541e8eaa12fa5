/*
 * kill -9 in the middle of writing. A child process (kill9-child.mjs, on the compiled engine
 * in dist/) opens an image read-write and writes seeded random data in a loop, flushing now and
 * then and reporting each op before it starts and each completed flush. The test SIGKILLs it
 * at a random moment, then:
 *   - qemu-img check finds no corruptions and no check errors (leaks are allowed);
 *   - qemu-img convert -O raw gives every byte as of the last reported flush, or as an op
 *     announced after it wrote it;
 *   - our engine reads exactly what qemu-img reads;
 *   - an internal snapshot still reads as before.
 * Each image is killed several times in a row: the next child reopens the crashed image.
 *
 * dist/ must be built (`make test` runs tsc first). Without it the suite is skipped with a
 * message, or fails when CI=true.
 */
import { spawn } from 'node:child_process'
import * as fs from 'node:fs'
import * as path from 'node:path'
import { fileURLToPath } from 'node:url'
import { afterAll, beforeAll, describe, expect, test } from 'vitest'
import { Qcow2Image } from '../../lib/image.js'
import { type QemuTools, convertToRaw, isCi, makeTempDir, qemuImg, qemuIo, removeTempDir, requireQemu } from '../helpers/qemu.js'
import { type AllowedState, firstDisallowedByte, qemuCheck } from './crash-check.js'
import { dataFor, makeStream } from './kill9-data.mjs'
import type { OpRecord } from './workloads.js'

const here = path.dirname(fileURLToPath(import.meta.url))
const childScript = path.join(here, 'kill9-child.mjs')
const distImage = path.resolve(here, '../../dist/lib/image.js')

function distProblem(): string | undefined {
  if (fs.existsSync(distImage)) {
    noteStaleDist()
    return undefined
  }
  const problem = `${path.relative(process.cwd(), distImage)} is missing (run \`make build\` or \`npx tsc -p tsconfig.json\`)`
  if (isCi()) throw new Error(`kill -9 tests: ${problem}; CI=true, so this is a failure, not a skip`)
  process.stderr.write(`[skip] kill -9 tests: ${problem}\n`)
  return problem
}

/** Prints a note when dist/ is older than the sources: the child would run the older engine. */
function noteStaleDist(): void {
  const libDir = path.resolve(here, '../../lib')
  const stale: string[] = []
  const walk = (d: string): void => {
    for (const entry of fs.readdirSync(d, { withFileTypes: true })) {
      const full = path.join(d, entry.name)
      if (entry.isDirectory()) walk(full)
      else if (entry.name.endsWith('.ts')) {
        const built = path.resolve(here, '../../dist', path.relative(path.resolve(here, '../..'), full)).replace(/\.ts$/, '.js')
        if (!fs.existsSync(built) || fs.statSync(built).mtimeMs < fs.statSync(full).mtimeMs) stale.push(path.relative(libDir, full))
      }
    }
  }
  walk(libDir)
  if (stale.length > 0) {
    process.stderr.write(`[note] kill -9 tests run dist/, which is older than lib/${stale.slice(0, 3).join(', lib/')}${stale.length > 3 ? ` and ${stale.length - 3} more` : ''}: run \`make build\` to test the current sources\n`)
  }
}

const qemu = requireQemu('kill -9 tests')
const describeKill = describe.skipIf(!qemu || distProblem() !== undefined)

let dir: string
beforeAll(async () => {
  dir = await makeTempDir('kill9')
})
afterAll(async () => {
  await removeTempDir(dir)
})

const KiB = 1024
const MiB = 1024 * 1024
const ROUNDS = 4

interface Announced {
  op: number
  kind: 'write' | 'zeroes' | 'zero-data'
  guestOffset: number
  length: number
}

interface ChildRun {
  ops: Announced[]
  /** Ops 0..flushed-1 were durable when the child died. */
  flushed: number
  flushes: number
  virtualSize: number
  killedAfterMs: number
}

/** Runs the child until `delayMs` after it is ready, then SIGKILLs it. */
function runAndKill(image: string, seed: number, clusterSize: number, delayMs: number): Promise<ChildRun> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [childScript, image, String(seed), String(clusterSize)], { stdio: ['ignore', 'pipe', 'pipe'] })
    let out = ''
    let err = ''
    let virtualSize = -1
    let readyAt = 0
    let killedAt = 0
    const guard = setTimeout(() => child.kill('SIGKILL'), 30_000)
    child.stdout.setEncoding('utf8')
    child.stderr.setEncoding('utf8')
    child.stdout.on('data', (chunk: string) => {
      out += chunk
      if (virtualSize < 0) {
        const first = out.split('\n', 1)[0]
        if (first !== undefined && out.includes('\n')) {
          const msg = JSON.parse(first) as { ready?: boolean; virtualSize?: number }
          if (msg.ready === true && typeof msg.virtualSize === 'number') {
            virtualSize = msg.virtualSize
            readyAt = Date.now()
            setTimeout(() => {
              killedAt = Date.now()
              child.kill('SIGKILL')
            }, delayMs)
          }
        }
      }
    })
    child.stderr.on('data', (chunk: string) => {
      err += chunk
    })
    child.on('error', reject)
    child.on('close', (code, signal) => {
      clearTimeout(guard)
      if (signal !== 'SIGKILL' || virtualSize < 0 || killedAt === 0) {
        reject(new Error(`child (seed ${seed}) ended with code ${String(code)} signal ${String(signal)} before the planned kill:\n${err.trim() || out.slice(-2000)}`))
        return
      }
      const ops: Announced[] = []
      let flushed = 0
      let flushes = 0
      // Lines are written whole (short writes to a pipe are atomic); a partial last line is dropped.
      const lines = out.split('\n')
      lines.pop()
      for (const line of lines.slice(1)) {
        const msg = JSON.parse(line) as Partial<Announced> & { flushed?: number }
        if (typeof msg.flushed === 'number') {
          flushed = msg.flushed
          flushes++
        } else if (typeof msg.op === 'number') {
          ops.push(msg as Announced)
        }
      }
      resolve({ ops, flushed, flushes, virtualSize, killedAfterMs: killedAt - readyAt })
    })
  })
}

function effectOf(seed: number, a: Announced): OpRecord['effects'][number] {
  return a.kind === 'write' ? { guestOffset: a.guestOffset, length: a.length, bytes: dataFor(seed, a.op, a.length) } : { guestOffset: a.guestOffset, length: a.length }
}

async function readAll(image: string, options: { snapshot?: string } = {}): Promise<Buffer> {
  const img = await Qcow2Image.open(image, { readOnly: true, ...options })
  try {
    const out = Buffer.alloc(img.virtualSize)
    for (let at = 0; at < out.length; at += 4 * MiB) await img.read(out.subarray(at, Math.min(at + 4 * MiB, out.length)), at)
    return out
  } finally {
    await img.close()
  }
}

interface Config {
  name: string
  clusterSize: number
  seed: number
  make(tools: QemuTools, dir: string): Promise<{ image: string; snapshot?: string }>
}

const configs: Config[] = [
  {
    name: '64 KiB clusters',
    clusterSize: 64 * KiB,
    seed: 0x4b1,
    async make(tools, d) {
      const image = path.join(d, 'plain.qcow2')
      await qemuImg(tools, ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=65536', image, String(24 * MiB)])
      await qemuIo(tools, image, ['write -P 0x21 0 4M', 'write -P 0x22 10M 2M'])
      return { image }
    },
  },
  {
    name: 'extended L2 over a raw backing file',
    clusterSize: 64 * KiB,
    seed: 0x4b2,
    async make(tools, d) {
      const base = path.join(d, 'base.raw')
      const bytes = Buffer.alloc(20 * MiB + 12345)
      for (let i = 0; i < bytes.length; i += 4096) bytes.fill((i >> 12) & 0xff, i, Math.min(i + 4096, bytes.length))
      fs.writeFileSync(base, bytes)
      const image = path.join(d, 'extl2.qcow2')
      await qemuImg(tools, ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=65536,extended_l2=on', '-b', 'base.raw', '-F', 'raw', image, String(24 * MiB)])
      return { image }
    },
  },
  {
    name: '4 KiB clusters with an internal snapshot',
    clusterSize: 4 * KiB,
    seed: 0x4b3,
    async make(tools, d) {
      const image = path.join(d, 'snap.qcow2')
      await qemuImg(tools, ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', image, String(16 * MiB)])
      await qemuIo(tools, image, ['write -P 0x44 0 6M', 'write -P 0x45 9M 3M'])
      await qemuImg(tools, ['snapshot', '-c', 'kept', image])
      return { image, snapshot: 'kept' }
    },
  },
]

describeKill('kill -9 while writing', () => {
  test.each(configs)('$name', async (config) => {
    const tools = qemu as QemuTools
    const d = path.join(dir, `s${config.seed.toString(16)}`)
    fs.mkdirSync(d)
    const { image, snapshot } = await config.make(tools, d)
    const raw = path.join(d, 'now.raw')
    await convertToRaw(tools, image, raw)
    let model = fs.readFileSync(raw)
    let snapshotView: Buffer | undefined
    if (snapshot !== undefined) {
      await convertToRaw(tools, image, raw, { snapshot })
      snapshotView = fs.readFileSync(raw)
    }
    const delays = makeStream(config.seed)
    let unflushedRounds = 0
    const summary: string[] = []
    for (let round = 0; round < ROUNDS; round++) {
      const seed = config.seed * 16 + round
      const delayMs = 60 + (delays() % 600)
      const run = await runAndKill(image, seed, config.clusterSize, delayMs)
      const where = `round ${round} (child seed ${seed}, killed ${run.killedAfterMs} ms after open, ${run.ops.length} ops announced, ${run.flushes} flushes, durable up to op ${run.flushed})`
      expect(run.virtualSize, where).toBe(model.length)
      summary.push(`${run.ops.length} ops/${run.flushes} flushes/${run.ops.length - run.flushed} unflushed`)
      if (run.ops.length > run.flushed) unflushedRounds++

      const report = await qemuCheck(tools.qemuImg, image)
      expect(report.corruptions, `${where}: qemu-img check\n${report.text}`).toBe(0)
      expect(report.checkErrors, `${where}: qemu-img check\n${report.text}`).toBe(0)

      const flushedModel = Buffer.from(model)
      for (const a of run.ops.slice(0, run.flushed)) {
        const e = effectOf(seed, a)
        if (e.bytes) flushedModel.set(e.bytes, e.guestOffset)
        else flushedModel.fill(0, e.guestOffset, e.guestOffset + e.length)
      }
      const later: OpRecord[] = run.ops.slice(run.flushed).map((a, i) => ({
        index: i,
        what: `${a.kind} ${a.guestOffset}+${a.length} (op ${a.op})`,
        startChange: 0,
        endChange: 0,
        effects: [effectOf(seed, a)],
        sizeAfter: model.length,
      }))
      const state: AllowedState = { flush: { opCount: 0, change: 0, model: flushedModel, label: `flush after op ${run.flushed}` }, later, sizes: [model.length] }

      await convertToRaw(tools, image, raw)
      const got = fs.readFileSync(raw)
      expect(got.length, where).toBe(model.length)
      const bad = firstDisallowedByte(got, state)
      expect(
        bad,
        bad &&
          `${where}: guest byte 0x${bad.guestOffset.toString(16)} reads 0x${bad.got.toString(16)} (qemu-img convert); flushed 0x${bad.flushed.toString(16)}, later writes ${bad.laterValues.map((v) => '0x' + v.toString(16)).join(' ') || 'none'}`,
      ).toBeUndefined()
      const ours = await readAll(image)
      expect(ours.equals(got), `${where}: our engine and qemu-img read the crashed image differently`).toBe(true)
      if (snapshot !== undefined && snapshotView) {
        await convertToRaw(tools, image, raw, { snapshot })
        expect(fs.readFileSync(raw).equals(snapshotView), `${where}: snapshot '${snapshot}' changed`).toBe(true)
      }
      // What the disk holds now is where the next child starts.
      model = got
    }
    process.stdout.write(`kill -9, ${config.name}: ${summary.join('; ')}\n`)
    // A kill that always lands right after a flush would test nothing beyond clean shutdowns.
    expect(unflushedRounds, 'rounds killed with unflushed ops').toBeGreaterThan(0)
  })
})

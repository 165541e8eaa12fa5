/*
 * Hostile and damaged images: mutate the fixture images (test/fuzz/mutate.ts: header,
 * extensions, L1, L2, refcount table and blocks, snapshot table, compressed data) and open and
 * read each one through the engine; a quarter of them are also written through a guard file.
 * What must hold for every mutated image:
 *   - no crash, hang or uncaught exception: opening, reading and writing either work or fail
 *     with one of the engine's errors (a Qcow2Error with a one-line message); anything else
 *     (TypeError, RangeError, ...) is a bug;
 *   - bounded time (each image within IMAGE_DEADLINE_MS) and memory (rss below a bound);
 *   - a read-only open never writes (the file is a read-only view that throws on writes, and
 *     its bytes are compared afterwards);
 *   - a read-write open never writes outside the image (far past its end) and never writes
 *     guest data or one kind of metadata over another kind of metadata that the image has.
 * A sample of the mutated images is also mounted through the CLI (-o ro) and read with dd: the
 * mount either refuses the image in one line or serves it, and stays up whatever the reads hit.
 *
 * FUZZ_ITERATIONS sets the number of mutated images (default 2000; `make fuzz` runs more).
 * A failure names the seed and fixture; `FUZZ_SEED_START` reruns from a given seed.
 */
import * as fs from 'node:fs'
import * as path from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { Qcow2Error } from '../../lib/errors.js'
import { Qcow2Image } from '../../lib/image.js'
import type { BlockFile, WriteTag } from '../../lib/io/block-file.js'
import { CLI_PATH, REPO_ROOT, ensureBuilt } from '../cli/helpers.js'
import { forceUnmount, isMounted, runProcess } from '../fuse/helpers.js'
import { MemoryBlockFile } from '../helpers/memory-file.js'
import { makeTempDir, removeTempDir } from '../helpers/qemu.js'
import { type Region, Rng, findRegions, mutate } from './mutate.js'

const ITERATIONS = Number(process.env.FUZZ_ITERATIONS ?? 2000)
const SEED_START = Number(process.env.FUZZ_SEED_START ?? 1)
const IMAGE_DEADLINE_MS = 3_000
const RSS_LIMIT_BYTES = 3 * 1024 ** 3
/** How far past the original end of the file a write may reach (new clusters are appended). */
const GROWTH_LIMIT_BYTES = 256 * 1024 * 1024
const MOUNT_SAMPLE_EVERY = 100
const KiB = 1024

const FIXTURE_DIRS = ['fixtures/images', 'fixtures/chain', 'fixtures/demo']

interface Fixture {
  path: string
  bytes: Uint8Array
}

function loadFixtures(): Fixture[] {
  const fixtures: Fixture[] = []
  for (const dir of FIXTURE_DIRS) {
    for (const name of fs.readdirSync(path.join(REPO_ROOT, dir)).sort()) {
      if (!name.endsWith('.qcow2')) continue
      const file = path.join(REPO_ROOT, dir, name)
      fixtures.push({ path: file, bytes: new Uint8Array(fs.readFileSync(file)) })
    }
  }
  return fixtures
}

/** Metadata kinds a write of each tag may overwrite (its own kind); data may overwrite none. */
const METADATA_KINDS: ReadonlySet<Region['kind']> = new Set(['header', 'l1', 'l2', 'reftable', 'refblock', 'snapshots'])
const TAG_KIND: Partial<Record<WriteTag, Region['kind']>> = { l1: 'l1', l2: 'l2', reftable: 'reftable', refblock: 'refblock', header: 'header' }

/**
 * A writable in-memory file that refuses (records) writes landing far past the end or over
 * metadata of another kind than the write's own.
 */
class GuardFile implements BlockFile {
  readonly violations: string[] = []
  readonly #inner: MemoryBlockFile
  readonly #metadata: Region[]
  readonly #limit: number
  constructor(inner: MemoryBlockFile, regions: readonly Region[]) {
    this.#inner = inner
    this.#metadata = regions.filter((r) => METADATA_KINDS.has(r.kind))
    this.#limit = inner.size + GROWTH_LIMIT_BYTES
  }
  get path(): string {
    return this.#inner.path
  }
  get size(): number {
    return this.#inner.size
  }
  get writable(): boolean {
    return true
  }
  pread(buf: Uint8Array, hostOffset: number): number {
    return this.#inner.pread(buf, hostOffset)
  }
  pwrite(buf: Uint8Array, hostOffset: number, tag: WriteTag): void {
    const end = hostOffset + buf.length
    if (!Number.isSafeInteger(hostOffset) || hostOffset < 0 || end > this.#limit) {
      this.violations.push(`${tag} write of ${buf.length} bytes at 0x${hostOffset.toString(16)} lies outside the image`)
      throw new Error('guard: write outside the image')
    }
    const own = TAG_KIND[tag]
    for (const r of this.#metadata) {
      if (r.kind === own || hostOffset >= r.end || end <= r.start) continue
      // The header cluster holds the header and its extensions; a header write stays in it.
      this.violations.push(`${tag} write at 0x${hostOffset.toString(16)}+${buf.length} overlaps the ${r.kind} at 0x${r.start.toString(16)}`)
      throw new Error('guard: write over metadata')
    }
    this.#inner.pwrite(buf, hostOffset, tag)
  }
  sync(): void {
    this.#inner.sync()
  }
  truncate(size: number): void {
    if (size > this.#limit) {
      this.violations.push(`truncate to 0x${size.toString(16)} lies outside the image`)
      throw new Error('guard: truncate outside the image')
    }
    this.#inner.truncate(size)
  }
  allocatedBytes(): number {
    return this.#inner.allocatedBytes()
  }
  close(): void {
    this.#inner.close()
  }
}

/**
 * An error the engine may give for a bad image: a Qcow2Error with a one-line message, or a
 * system error from opening a backing file the image names (ENOENT, EACCES, ELOOP...), which
 * the CLI reports in one line too.
 */
function unexpected(err: unknown): string | undefined {
  if (err instanceof Qcow2Error && !err.message.includes('\n')) return undefined
  const code = (err as NodeJS.ErrnoException | undefined)?.code
  if (err instanceof Error && typeof code === 'string' && /^E[A-Z]+$/.test(code) && (err as NodeJS.ErrnoException).syscall) return undefined
  if (err instanceof Qcow2Error) return `multi-line message: ${JSON.stringify(err.message)}`
  return err instanceof Error ? `${err.name}: ${err.message}\n${err.stack ?? ''}` : String(err)
}

async function expectEngineError(action: () => Promise<unknown>, problems: string[], what: string): Promise<boolean> {
  try {
    await action()
    return true
  } catch (err) {
    const problem = unexpected(err)
    if (problem) problems.push(`${what}: ${problem}`)
    return false
  }
}

/** Reads the start of the disk, a few random places and its end. */
async function readAround(img: Qcow2Image, rng: Rng, problems: string[]): Promise<void> {
  const size = img.virtualSize
  const chunk = Buffer.alloc(64 * KiB)
  for (let offset = 0; offset < Math.min(size, 2 * 1024 * KiB); offset += chunk.length) {
    const n = Math.min(chunk.length, size - offset)
    await expectEngineError(() => img.read(chunk.subarray(0, n), offset), problems, `read at ${offset}`)
  }
  const small = Buffer.alloc(4 * KiB)
  for (let i = 0; i < 16 && size >= small.length; i++) {
    const offset = Math.floor((rng.next() / 2 ** 32) * (size - small.length))
    await expectEngineError(() => img.read(small, offset), problems, `read at ${offset}`)
  }
  if (size >= small.length) await expectEngineError(() => img.read(small, size - small.length), problems, 'read at the end')
}

async function writeAround(img: Qcow2Image, rng: Rng, problems: string[]): Promise<void> {
  const span = Math.min(img.virtualSize, 4 * 1024 * KiB)
  for (let i = 0; i < 8 && span > 0; i++) {
    const length = Math.min(span, (1 + rng.below(16)) * 4 * KiB)
    const offset = rng.below(Math.max(1, span - length))
    const data = Buffer.alloc(length, 1 + rng.below(255))
    await expectEngineError(() => img.write(data, offset), problems, `write at ${offset}`)
  }
  if (span >= 64 * KiB) await expectEngineError(() => img.writeZeroes(0, 64 * KiB), problems, 'zero write')
  await expectEngineError(() => img.flush(), problems, 'flush')
}

interface Outcome {
  opened: boolean
  problems: string[]
  violations: string[]
}

async function fuzzOne(fixture: Fixture, seed: number, writable: boolean): Promise<Outcome> {
  const { bytes } = mutate(fixture.bytes, seed)
  const rng = new Rng(seed ^ 0x5bd1e995)
  const problems: string[] = []
  // Read-only: a read-only view of the mutated bytes; any write attempt throws a plain Error.
  const file = MemoryBlockFile.fromBytes(fixture.path, bytes)
  const view = file.readOnlyView()
  let img: Qcow2Image | undefined
  const opened = await expectEngineError(
    async () => {
      img = Qcow2Image.openFile(view, fixture.path, { readOnly: true })
    },
    problems,
    'read-only open',
  )
  if (img) {
    await readAround(img, rng, problems)
    await expectEngineError(() => img!.close(), problems, 'close')
  }
  if (!Buffer.from(file.bytes()).equals(Buffer.from(bytes))) problems.push('a read-only open changed the image')

  const violations: string[] = []
  if (writable) {
    const guard = new GuardFile(MemoryBlockFile.fromBytes(fixture.path, bytes), findRegions(bytes))
    let rw: Qcow2Image | undefined
    await expectEngineError(
      async () => {
        rw = Qcow2Image.openFile(guard, fixture.path, { readOnly: false })
      },
      problems,
      'read-write open',
    )
    if (rw) {
      await writeAround(rw, rng, problems)
      await readAround(rw, rng, problems)
      await expectEngineError(() => rw!.close(), problems, 'read-write close')
    }
    violations.push(...guard.violations)
  }
  // Guard refusals surface as plain Errors; they are reported as violations, not twice.
  return { opened, problems: problems.filter((p) => !p.includes('guard: ')), violations }
}

describe('fuzz: mutated images through the engine', () => {
  const fixtures = loadFixtures()

  it(`opens, reads and writes ${ITERATIONS} mutated images without a crash, hang, stray write or unbounded memory`, async () => {
    const failures: string[] = []
    let opened = 0
    let slowest = 0
    for (let i = 0; i < ITERATIONS; i++) {
      const seed = SEED_START + i
      const fixture = fixtures[seed % fixtures.length]!
      const started = Date.now()
      const outcome = await fuzzOne(fixture, seed, seed % 4 === 0)
      const elapsed = Date.now() - started
      slowest = Math.max(slowest, elapsed)
      if (outcome.opened) opened++
      const name = `seed ${seed} (${path.relative(REPO_ROOT, fixture.path)})`
      if (elapsed > IMAGE_DEADLINE_MS) failures.push(`${name}: took ${elapsed} ms`)
      for (const p of [...outcome.problems, ...outcome.violations]) failures.push(`${name}: ${p}`)
      if (process.memoryUsage().rss > RSS_LIMIT_BYTES) failures.push(`${name}: rss ${process.memoryUsage().rss} bytes`)
      if (failures.length >= 20) break
      // The engine is synchronous and awaits only resolved promises: let the event loop run now
      // and then, or the test runner's messages to this worker time out on long runs.
      if (i % 100 === 99) await new Promise((resume) => setImmediate(resume))
    }
    expect(failures, failures.join('\n')).toEqual([])
    // The mutations must leave many images openable, or the reads test nothing.
    expect(opened).toBeGreaterThan(ITERATIONS / 4)
    expect(slowest).toBeLessThanOrEqual(IMAGE_DEADLINE_MS)
  }, 600_000)

  it('the guard file catches a data write over metadata (the check can fail)', () => {
    const fixture = fixtures.find((f) => f.path.endsWith('c64k.qcow2'))!
    const regions = findRegions(fixture.bytes)
    const guard = new GuardFile(MemoryBlockFile.fromBytes(fixture.path, fixture.bytes), regions)
    const l1 = regions.find((r) => r.kind === 'l1')!
    expect(() => guard.pwrite(new Uint8Array(512), l1.start, 'data')).toThrow(/guard/)
    expect(() => guard.pwrite(new Uint8Array(8), l1.start, 'l1')).not.toThrow()
    expect(() => guard.pwrite(new Uint8Array(512), fixture.bytes.length + GROWTH_LIMIT_BYTES, 'data')).toThrow(/guard/)
    expect(guard.violations).toHaveLength(2)
  })
})

describe('fuzz: a sample of mutated images through a real mount', () => {
  let dir = ''
  const mountpoints: string[] = []
  beforeAll(async () => {
    ensureBuilt()
    dir = await makeTempDir('fuzz-mount')
  })
  afterAll(async () => {
    for (const mnt of mountpoints) await forceUnmount(mnt)
    if (dir) await removeTempDir(dir)
  })

  it('refuses in one line or serves and stays up, whatever the reads hit', async () => {
    const fixtures = loadFixtures()
    const failures: string[] = []
    const count = Math.max(5, Math.floor(ITERATIONS / MOUNT_SAMPLE_EVERY))
    for (let k = 0; k < count; k++) {
      const seed = SEED_START + k * MOUNT_SAMPLE_EVERY
      const fixture = fixtures[seed % fixtures.length]!
      // Next to the fixture's name so a relative backing file still resolves: copy the
      // backing files' directory is not needed when the image lives in a temp dir with links.
      const imageDir = path.join(dir, `img${k}`)
      fs.mkdirSync(imageDir)
      for (const sibling of fs.readdirSync(path.dirname(fixture.path))) {
        fs.symlinkSync(path.join(path.dirname(fixture.path), sibling), path.join(imageDir, sibling))
      }
      const image = path.join(imageDir, path.basename(fixture.path))
      fs.unlinkSync(image)
      const { bytes } = mutate(fixture.bytes, seed)
      fs.writeFileSync(image, bytes)
      const mnt = path.join(dir, `mnt${k}`)
      fs.mkdirSync(mnt)
      mountpoints.push(mnt)
      const name = `seed ${seed} (${path.relative(REPO_ROOT, fixture.path)})`
      const mount = await runProcess(process.execPath, [CLI_PATH, 'mount', '-o', 'ro', image, mnt], { timeoutMs: 30_000 })
      if (mount.code !== 0) {
        if (mount.code !== 1 || !/^qcow2fs: [^\n]+\n$/.test(mount.stderr)) failures.push(`${name}: mount exit ${mount.code}: ${mount.stderr}`)
        if (isMounted(mnt)) failures.push(`${name}: a refused mount left ${mnt} mounted`)
        continue
      }
      const raw = mount.stdout.toString().trim()
      await runProcess('dd', [`if=${raw}`, 'of=/dev/null', 'bs=64K', 'count=128', 'iflag=fullblock', 'status=none'], { timeoutMs: 30_000 })
      if (!fs.readdirSync(mnt).includes(path.basename(raw))) failures.push(`${name}: the mount did not stay up after the reads`)
      const unmount = await runProcess(process.execPath, [CLI_PATH, 'unmount', mnt], { timeoutMs: 30_000 })
      if (unmount.code !== 0) failures.push(`${name}: unmount exit ${unmount.code}: ${unmount.stderr}`)
      if (!Buffer.from(fs.readFileSync(image)).equals(Buffer.from(bytes))) failures.push(`${name}: a read-only mount changed the image`)
    }
    expect(failures, failures.join('\n')).toEqual([])
  }, 300_000)
})

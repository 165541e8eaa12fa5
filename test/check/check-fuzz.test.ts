/*
 * Hostile and damaged images given to the checker, the repair and the map: the fixture images
 * mutated by test/fuzz/mutate.ts (header, extensions, L1, L2, refcount table and blocks,
 * snapshot table, compressed data). For every mutated image:
 *   - check, repair and map end, each within DEADLINE_MS, and either work or fail with one of
 *     the engine's errors (a Qcow2Error with a one-line message); a TypeError, RangeError or
 *     any other exception is a bug;
 *   - the check never writes (it runs on a read-only view that throws on writes);
 *   - the repair grows the file by a bounded amount, and a second repair of its result leaves
 *     no more corruptions or leaks than the first left (it may still fix some: qemu-img's
 *     repair of such images is not idempotent either).
 * CHECK_FUZZ_ITERATIONS sets the number of images (default 500); a failure names the seed.
 */
import { readFileSync, writeFileSync } from 'node:fs'
import * as path from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { checkImage } from '../../lib/check/check.js'
import { mapImage } from '../../lib/check/map.js'
import { repairImage } from '../../lib/check/repair.js'
import { Qcow2Error } from '../../lib/errors.js'
import { FIXTURES_DIR, loadManifest } from '../helpers/fixtures.js'
import { MemoryBlockFile } from '../helpers/memory-file.js'
import { makeTempDir, removeTempDir } from '../helpers/qemu.js'
import { mutate } from '../fuzz/mutate.js'

const ITERATIONS = Number(process.env.CHECK_FUZZ_ITERATIONS ?? 500)
const DEADLINE_MS = 5_000
const GROWTH_LIMIT_BYTES = 64 * 1024 * 1024

let dir = ''

describe('check, repair and map of mutated images', () => {
  beforeAll(async () => {
    dir = await makeTempDir('check-fuzz')
  })
  afterAll(async () => {
    if (dir) await removeTempDir(dir)
  })

  it(`${ITERATIONS} mutated images`, () => {
    // Images whose backing or data files would be needed by the map are left out.
    const fixtures = loadManifest().filter((e) => !e.tags.includes('data-file') && !e.tags.includes('backing'))
    const originals = fixtures.map((e) => readFileSync(path.join(FIXTURES_DIR, e.file)))
    const problems: string[] = []
    const mapPath = path.join(dir, 'mutated.qcow2')
    for (let seed = 1; seed <= ITERATIONS; seed++) {
      const which = seed % fixtures.length
      const { bytes, mutations } = mutate(originals[which]!, seed)
      const where = `seed ${seed} (${fixtures[which]!.file}: ${mutations.map((m) => m.description).join('; ')})`
      const attempt = (what: string, step: () => void): void => {
        const started = Date.now()
        try {
          step()
        } catch (err) {
          if (!(err instanceof Qcow2Error) || err.message.includes('\n')) problems.push(`${where} ${what}: ${(err as Error).stack}`)
        }
        const elapsed = Date.now() - started
        if (elapsed > DEADLINE_MS) problems.push(`${where} ${what}: took ${elapsed} ms`)
      }
      attempt('check', () => {
        checkImage(MemoryBlockFile.fromBytes('mutated.qcow2', bytes, { readOnly: true }), 'mutated.qcow2')
      })
      attempt('repair', () => {
        const file = MemoryBlockFile.fromBytes('mutated.qcow2', bytes)
        const result = repairImage(file, 'mutated.qcow2', 'all')
        if (file.size > bytes.length + GROWTH_LIMIT_BYTES) problems.push(`${where} repair: the file grew to ${file.size} bytes`)
        if (result.counts.checkErrors > 0) return
        const again = repairImage(file, 'mutated.qcow2', 'all').counts
        if (again.corruptions > result.counts.corruptions || again.leaks > result.counts.leaks) {
          problems.push(`${where} repair: a second repair left more wrong: ${JSON.stringify(again)} after ${JSON.stringify(result.counts)}`)
        }
      })
      attempt('map', () => {
        writeFileSync(mapPath, bytes)
        mapImage(mapPath, 'mutated.qcow2', { lock: false })
      })
    }
    expect(problems).toEqual([])
  }, 600_000)
})

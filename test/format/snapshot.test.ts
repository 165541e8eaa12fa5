/*
 * lib/format/snapshot.ts: the internal snapshot table. Entries are built by hand at the spec's
 * offsets (v2 style without extra data, v3 with 16 or 24 bytes of extra data, longer extra
 * data, icount -1, every padding length), truncated tables must fail with CorruptImageError,
 * and the table of a real image after `qemu-img snapshot -c a` and `-c b` must match
 * `qemu-img info --output=json`.
 */
import { stat } from 'node:fs/promises'
import * as path from 'node:path'
import { afterAll, beforeAll, describe, expect, test } from 'vitest'
import { CorruptImageError } from '../../lib/errors.js'
import { parseHeader } from '../../lib/format/header.js'
import { parseSnapshotTable } from '../../lib/format/snapshot.js'
import { type QemuTools, makeTempDir, qemuImg, qemuInfo, qemuIo, removeTempDir, requireQemu } from '../helpers/qemu.js'
import { type SnapshotSpec, concatBytes, readFileRange, snapshotEntry, u64Bytes } from './bytes.js'

const base: SnapshotSpec = {
  l1_table_offset: 0x3_0000n,
  l1_size: 16,
  id: '1',
  name: 'first',
  date_sec: 1_700_000_000,
  date_nsec: 123_456_789,
  vm_clock_nsec: 5_000_000_123n,
  vm_state_size: 0,
}

function corruptError(fn: () => unknown): CorruptImageError {
  try {
    fn()
  } catch (err) {
    expect(err).toBeInstanceOf(CorruptImageError)
    return err as CorruptImageError
  }
  throw new Error('expected CorruptImageError, nothing was thrown')
}

describe('snapshot', () => {
  describe('entries built by hand', () => {
    test('no snapshots: empty table', () => {
      expect(parseSnapshotTable(new Uint8Array(0), 0)).toEqual([])
    })

    test('v2 style entry without extra data', () => {
      const table = snapshotEntry({ ...base, vm_state_size: 0x8000_0001 })
      expect(parseSnapshotTable(table, 1)).toEqual([
        {
          l1TableOffset: 0x3_0000,
          l1Size: 16,
          id: '1',
          name: 'first',
          dateSeconds: 1_700_000_000,
          dateNanoseconds: 123_456_789,
          vmClockNanoseconds: 5_000_000_123,
          vmStateSize: 0x8000_0001,
        },
      ])
    })

    test('v3 entry with 16 bytes of extra data: vm_state_size_large and disk_size', () => {
      const table = snapshotEntry({
        ...base,
        vm_state_size: 7, // superseded by vm_state_size_large
        extra: u64Bytes(0x1_2345_6789n, 0x40_0000_0000n),
      })
      const [entry] = parseSnapshotTable(table, 1)
      expect(entry).toMatchObject({ vmStateSize: 0x1_2345_6789, diskSize: 0x40_0000_0000 })
      expect(entry).not.toHaveProperty('icount')
    })

    test('v3 entry with 24 bytes of extra data: icount', () => {
      const [entry] = parseSnapshotTable(snapshotEntry({ ...base, extra: u64Bytes(0n, 1n << 30n, 987_654_321n) }), 1)
      expect(entry).toMatchObject({ vmStateSize: 0, diskSize: 2 ** 30, icount: 987_654_321 })
    })

    test('icount -1 (not recorded) leaves icount out', () => {
      const [entry] = parseSnapshotTable(snapshotEntry({ ...base, extra: u64Bytes(0n, 1n << 30n, (1n << 64n) - 1n) }), 1)
      expect(entry).toMatchObject({ diskSize: 2 ** 30 })
      expect(entry).not.toHaveProperty('icount')
    })

    test('8 bytes of extra data: only vm_state_size_large', () => {
      const [entry] = parseSnapshotTable(snapshotEntry({ ...base, vm_state_size: 1, extra: u64Bytes(1n << 33n) }), 1)
      expect(entry?.vmStateSize).toBe(2 ** 33)
      expect(entry).not.toHaveProperty('diskSize')
    })

    test('extra data longer than known is skipped to reach the id and name', () => {
      const extra = concatBytes([u64Bytes(10n, 20n, 30n), Uint8Array.from({ length: 37 }, (_, i) => 0xa0 + i)])
      const table = concatBytes([
        snapshotEntry({ ...base, id: '7', name: 'after extra', extra }),
        snapshotEntry({ ...base, id: '8', name: 'next' }),
      ])
      const entries = parseSnapshotTable(table, 2)
      expect(entries.map((e) => [e.id, e.name, e.vmStateSize, e.diskSize, e.icount])).toEqual([
        ['7', 'after extra', 10, 20, 30],
        ['8', 'next', 0, undefined, undefined],
      ])
    })

    test('extra data of 1024 bytes is accepted, 1025 is corrupt', () => {
      const ok = snapshotEntry({ ...base, extra: concatBytes([u64Bytes(1n, 2n, 3n), new Uint8Array(1000)]) })
      expect(parseSnapshotTable(ok, 1)[0]?.name).toBe('first')
      const bad = snapshotEntry({ ...base, extra: new Uint8Array(1025) })
      expect(corruptError(() => parseSnapshotTable(bad, 1)).message).toMatch(/extra data/)
    })

    test('every padding length: entries of 0..7 bytes past an 8-byte boundary, back to back', () => {
      const specs: SnapshotSpec[] = []
      for (let pad = 0; pad < 8; pad++) {
        // 40 fixed + 24 extra + id + name; id+name length chosen to end `pad` bytes short of 8.
        const idName = 16 + ((8 - pad) % 8)
        const id = String(100 + pad)
        specs.push({
          ...base,
          l1_table_offset: BigInt(0x10_0000 + pad * 0x1_0000),
          l1_size: pad + 1,
          id,
          name: 'n'.repeat(idName - id.length),
          date_sec: pad,
          extra: u64Bytes(BigInt(pad), 1n << 40n, BigInt(pad * 1000)),
        })
      }
      const parts = specs.map(snapshotEntry)
      const paddings = specs.map((s, i) => parts[i]!.length - (40 + 24 + s.id.length + s.name.length))
      expect(new Set(paddings)).toEqual(new Set([0, 1, 2, 3, 4, 5, 6, 7]))
      // Fill the padding with junk: it must not be read.
      const table = concatBytes(parts)
      let at = 0
      parts.forEach((part, i) => {
        table.fill(0xcc, at + part.length - paddings[i]!, at + part.length)
        at += part.length
      })
      const entries = parseSnapshotTable(table, specs.length)
      expect(entries).toHaveLength(8)
      entries.forEach((e, pad) => {
        expect(e).toEqual({
          l1TableOffset: 0x10_0000 + pad * 0x1_0000,
          l1Size: pad + 1,
          id: specs[pad]!.id,
          name: specs[pad]!.name,
          dateSeconds: pad,
          dateNanoseconds: 123_456_789,
          vmClockNanoseconds: 5_000_000_123,
          vmStateSize: pad,
          diskSize: 2 ** 40,
          icount: pad * 1000,
        })
      })
    })

    test('UTF-8 names and an empty id', () => {
      const [entry] = parseSnapshotTable(snapshotEntry({ ...base, id: '', name: 'avant mise à jour ✓' }), 1)
      expect(entry?.id).toBe('')
      expect(entry?.name).toBe('avant mise à jour ✓')
    })

    test('entries past `count` are not read', () => {
      const table = concatBytes([snapshotEntry(base), new Uint8Array(8).fill(0xff)])
      expect(parseSnapshotTable(table, 1)).toHaveLength(1)
    })

    test('a table inside a larger buffer (non-zero byteOffset)', () => {
      const table = concatBytes([snapshotEntry({ ...base, name: 'a' }), snapshotEntry({ ...base, id: '2', name: 'b' })])
      const host = new Uint8Array(table.length + 24)
      host.set(table, 24)
      expect(parseSnapshotTable(host.subarray(24), 2).map((e) => e.name)).toEqual(['a', 'b'])
    })

    test('truncated table: every cut before the end of the last name is CorruptImageError', () => {
      const first = snapshotEntry({ ...base, extra: u64Bytes(1n, 2n, 3n) })
      const lastSpec: SnapshotSpec = { ...base, id: '2', name: 'second snap', extra: u64Bytes(4n, 5n) }
      const table = concatBytes([first, snapshotEntry(lastSpec)])
      const unpaddedEnd = first.length + 40 + 16 + lastSpec.id.length + lastSpec.name.length
      expect(unpaddedEnd).toBeLessThan(table.length) // the last entry has padding
      for (let cut = 0; cut < unpaddedEnd; cut++) {
        const err = corruptError(() => parseSnapshotTable(table.subarray(0, cut), 2))
        expect(err.message).not.toContain('\n')
      }
      // The padding after the last entry need not be present.
      expect(parseSnapshotTable(table.subarray(0, unpaddedEnd), 2).map((e) => e.name)).toEqual(['first', 'second snap'])
    })

    test('more entries announced than present', () => {
      const table = concatBytes([snapshotEntry(base), snapshotEntry({ ...base, id: '2' })])
      expect(parseSnapshotTable(table, 2)).toHaveLength(2)
      corruptError(() => parseSnapshotTable(table, 3))
    })

    test.each([
      ['l1_table_offset of 2^53', { l1_table_offset: 1n << 53n }],
      ['vm_clock_nsec of 2^63', { vm_clock_nsec: 1n << 63n }],
      ['vm_state_size_large of 2^60', { extra: u64Bytes(1n << 60n, 0n) }],
      ['disk_size of 2^64 - 1', { extra: u64Bytes(0n, (1n << 64n) - 1n) }],
      ['icount of 2^62', { extra: u64Bytes(0n, 0n, 1n << 62n) }],
    ] as [string, Partial<SnapshotSpec>][])('%s is CorruptImageError', (_label, change) => {
      corruptError(() => parseSnapshotTable(snapshotEntry({ ...base, ...change }), 1))
    })
  })
})

// ---------------------------------------------------------------------------------------------

const qemu = requireQemu('snapshot: tables made by qemu-img')

interface InfoSnapshot {
  id: string
  name: string
  'vm-state-size': number
  'date-sec': number
  'date-nsec': number
  'vm-clock-sec': number
  'vm-clock-nsec': number
  icount?: number
}

describe.skipIf(!qemu)('snapshot table of images made by qemu-img', () => {
  const tools = qemu as QemuTools
  let dir = ''
  beforeAll(async () => {
    dir = await makeTempDir('format-snapshot')
  })
  afterAll(async () => {
    if (dir) await removeTempDir(dir)
  })

  test.each([
    ['compat 1.1', 'compat=1.1'],
    ['compat 0.10', 'compat=0.10'],
    ['compat 1.1, 4 KiB clusters, refcount_bits 64', 'compat=1.1,cluster_size=4096,refcount_bits=64'],
    ['compat 1.1, 2 MiB clusters, extended L2', 'compat=1.1,cluster_size=2097152,extended_l2=on'],
  ])('%s: snapshots a and b', async (label, options) => {
    const file = path.join(dir, `${label.replace(/\W+/g, '-')}.qcow2`)
    const sizeBytes = 96 * 1024 * 1024
    await qemuImg(tools, ['create', '-q', '-f', 'qcow2', '-o', options, file, String(sizeBytes)])
    await qemuIo(tools, file, ['write -P 0x11 0 1M'])
    await qemuImg(tools, ['snapshot', '-c', 'a', file])
    await qemuIo(tools, file, ['write -P 0x22 512k 1M'])
    await qemuImg(tools, ['snapshot', '-c', 'b', file])

    const info = await qemuInfo(tools, file)
    const expected = info.snapshots as InfoSnapshot[]
    expect(expected.map((s) => s.name)).toEqual(['a', 'b'])

    const header = parseHeader(readFileRange(file, 0, 112))
    expect(header.snapshotCount).toBe(2)
    const fileBytes = (await stat(file)).size
    const table = readFileRange(file, header.snapshotsOffset, fileBytes - header.snapshotsOffset)
    const entries = parseSnapshotTable(table, header.snapshotCount)

    expect(entries).toHaveLength(2)
    entries.forEach((entry, i) => {
      const want = expected[i]!
      expect(entry.id).toBe(want.id)
      expect(entry.name).toBe(want.name)
      expect(entry.dateSeconds).toBe(want['date-sec'])
      expect(entry.dateNanoseconds).toBe(want['date-nsec'])
      expect(entry.vmClockNanoseconds).toBe(want['vm-clock-sec'] * 1e9 + want['vm-clock-nsec'])
      expect(entry.vmStateSize).toBe(want['vm-state-size'])
      if (want.icount !== undefined) expect(entry.icount).toBe(want.icount)
      else expect(entry.icount).toBeUndefined()
      // QEMU records the disk size in the extra data, v2 images included.
      expect(entry.diskSize).toBe(sizeBytes)
      // Each snapshot has its own copy of the L1 table, cluster aligned, inside the file.
      expect(entry.l1Size).toBe(header.l1Size)
      expect(entry.l1TableOffset % 2 ** header.clusterBits).toBe(0)
      expect(entry.l1TableOffset).toBeGreaterThan(0)
      expect(entry.l1TableOffset).toBeLessThan(fileBytes)
      expect(entry.l1TableOffset).not.toBe(header.l1TableOffset)
    })
    expect(entries[0]!.l1TableOffset).not.toBe(entries[1]!.l1TableOffset)

    // The same table cut inside the second entry's fixed part is corrupt (the first entry is
    // 40 fixed + 24 extra + id "1" + name "a" = 66 bytes, padded to 72).
    corruptError(() => parseSnapshotTable(table.subarray(0, 72 + 20), 2))
  })
})

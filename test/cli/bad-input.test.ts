/*
 * Damaged and unsupported images given to `qcow2fs info` (the compiled CLI). Each must be
 * refused with: a non-zero exit code, exactly one stderr line `qcow2fs: <reason>` naming the
 * problem, no stack trace, within 10 s, and every file involved byte-for-byte unchanged.
 * Damage is made by copying an image made by qemu-img and patching header or table bytes
 * (big-endian, offsets from the qcow2 spec). An L2 table past EOF may pass the open (tables
 * below L1 are read on demand): then reading that region through the engine must fail with
 * EIO while the rest of the disk stays readable.
 */
import { copyFileSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { beforeAll, describe, expect, it } from 'vitest'
import { Qcow2Image } from '../../lib/image.js'
import { Qcow2Error } from '../../lib/errors.js'
import { qemuToolsFor, run, runCli, sha256File, stderrLines, useSuiteDir } from './helpers.js'

const { available: haveQemu, qemuImg, qemuIo } = qemuToolsFor('bad-input tests')

const TIME_LIMIT_MS = 10_000

// Header field offsets (qcow2 spec, "Header").
const H_CLUSTER_BITS = 20
const H_SIZE = 24
const H_CRYPT_METHOD = 32
const H_L1_SIZE = 36
const H_L1_TABLE_OFFSET = 40
const H_REFCOUNT_TABLE_OFFSET = 48
const H_INCOMPATIBLE_FEATURES = 72
const H_HEADER_LENGTH = 100
const EXT_FEATURE_NAME_TABLE = 0x6803f857
const FEATURE_NAME_ENTRY_BYTES = 48
const L1_OFFSET_MASK = 0x00ff_ffff_ffff_fe00n
const COPIED_FLAG = 1n << 63n

/** A place far past the end of every image here, cluster aligned for any cluster size. */
const FAR_PAST_EOF = 0x40_0000_0000n // 256 GiB

const PAST_EOF = /past|beyond|end of (the )?file|EOF|outside|exceeds|truncated/i

let dir = ''
let good4k = '' // 4 MiB, 4 KiB clusters: two L2 tables (one per 2 MiB), data in both halves
let good64k = '' // 4 MiB, 64 KiB clusters, compat 1.1

function path(name: string): string {
  return join(dir, name)
}

function view(buf: Buffer): DataView {
  return new DataView(buf.buffer, buf.byteOffset, buf.byteLength)
}

/** Copies `source` to `name`, lets `mutate` patch the bytes (or return new ones), writes it. */
function patched(source: string, name: string, mutate: (buf: Buffer, dv: DataView) => Buffer | void): string {
  const buf = readFileSync(source)
  const out = mutate(buf, view(buf)) ?? buf
  writeFileSync(path(name), out)
  return path(name)
}

function l1TableOffset(buf: Buffer): bigint {
  return view(buf).getBigUint64(H_L1_TABLE_OFFSET)
}

/** Host offset of the L2 table of L1 entry `index`. */
function l2TableOffset(buf: Buffer, index: number): bigint {
  const entry = view(buf).getBigUint64(Number(l1TableOffset(buf)) + index * 8)
  return entry & L1_OFFSET_MASK
}

/** Runs `qcow2fs info IMAGE` and checks the refusal contract; returns the stderr line. */
function expectRefused(image: string, patterns: RegExp[], otherFiles: string[] = []): string {
  const files = [image, ...otherFiles]
  const hashesBefore = files.map(sha256File)
  const result = runCli(['info', image], { timeoutMs: TIME_LIMIT_MS })
  expect(result.signal, 'killed: did not finish within the time limit').toBeNull()
  expect(result.elapsedMs).toBeLessThan(TIME_LIMIT_MS)
  expect(result.status).not.toBe(0)
  expect(result.stderr).not.toMatch(/^\s+at /m)
  const lines = stderrLines(result)
  expect(lines, `stderr: ${result.stderr}`).toHaveLength(1)
  const line = lines[0]!
  expect(line).toMatch(/^qcow2fs: \S/)
  for (const pattern of patterns) expect(line).toMatch(pattern)
  expect(files.map(sha256File)).toEqual(hashesBefore)
  return line
}

describe.skipIf(!haveQemu)('bad input: qcow2fs info refuses damaged and unsupported images', () => {
  useSuiteDir('bad-input', (made) => (dir = made))

  beforeAll(() => {
    good4k = path('good4k.qcow2')
    run(qemuImg!, ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', good4k, '4M'])
    run(qemuIo!, ['-c', 'write -P 0x5a 0 64k', '-c', 'write -P 0xa5 3M 64k', good4k])
    good64k = path('good64k.qcow2')
    run(qemuImg!, ['create', '-q', '-f', 'qcow2', good64k, '4M'])
    run(qemuIo!, ['-c', 'write -P 0x5a 0 64k', '-c', 'write -P 0xa5 2M 64k', good64k])
  })

  it('the undamaged images are accepted (the damage below is what gets refused)', () => {
    for (const image of [good4k, good64k]) {
      const result = runCli(['info', image], { timeoutMs: TIME_LIMIT_MS })
      expect(result.stderr).toBe('')
      expect(result.status).toBe(0)
    }
  })

  describe('not a qcow2 image', () => {
    it('bad magic', () => {
      const image = patched(good64k, 'bad-magic.qcow2', (buf) => {
        buf.write('QFIX', 0, 'latin1')
      })
      expectRefused(image, [/magic|not a qcow2/i])
    })

    it('a text file', () => {
      writeFileSync(path('text.qcow2'), 'this is not a disk image\n'.repeat(100))
      expectRefused(path('text.qcow2'), [/magic|not a qcow2/i])
    })

    it('an empty file', () => {
      writeFileSync(path('empty.qcow2'), '')
      expectRefused(path('empty.qcow2'), [/empty|short|truncated|not a qcow2/i])
    })

    it('a directory', () => {
      mkdirSync(path('a-directory.qcow2'))
      const result = runCli(['info', path('a-directory.qcow2')], { timeoutMs: TIME_LIMIT_MS })
      expect(result.status).not.toBe(0)
      expect(stderrLines(result)).toHaveLength(1)
      expect(result.stderr).toMatch(/^qcow2fs: \S/)
      expect(result.stderr).not.toMatch(/^\s+at /m)
    })
  })

  describe('truncated file', () => {
    it('inside the header', () => {
      const image = patched(good64k, 'trunc-header.qcow2', (buf) => buf.subarray(0, 50))
      expectRefused(image, [/truncated|short|header/i])
    })

    it('after the header cluster: refcount and L1 tables are gone', () => {
      const image = patched(good64k, 'trunc-tables.qcow2', (buf) => buf.subarray(0, 65536))
      expectRefused(image, [PAST_EOF])
    })
  })

  describe('L1 table', () => {
    it('offset past EOF', () => {
      const image = patched(good64k, 'l1-past-eof.qcow2', (_buf, dv) => {
        dv.setBigUint64(H_L1_TABLE_OFFSET, FAR_PAST_EOF)
      })
      expectRefused(image, [/L1/, PAST_EOF])
    })

    it('offset not cluster aligned', () => {
      const image = patched(good64k, 'l1-misaligned.qcow2', (buf, dv) => {
        dv.setBigUint64(H_L1_TABLE_OFFSET, l1TableOffset(buf) + 0x200n)
      })
      expectRefused(image, [/L1/, /align/i])
    })

    it('huge l1_size', () => {
      const image = patched(good64k, 'l1-huge.qcow2', (_buf, dv) => {
        dv.setUint32(H_L1_SIZE, 0x7fff_ffff)
      })
      expectRefused(image, [/L1/, /large|big|size|exceed|limit|past|beyond/i])
    })

    it('l1_size too small for the virtual size', () => {
      const image = patched(good64k, 'l1-too-small.qcow2', (_buf, dv) => {
        dv.setBigUint64(H_SIZE, 1n << 40n) // 1 TiB needs 2048 L1 entries with 64 KiB clusters
      })
      expectRefused(image, [/L1/, /small|size|short|few/i])
    })
  })

  describe('refcount table', () => {
    it('offset past EOF', () => {
      const image = patched(good64k, 'rt-past-eof.qcow2', (_buf, dv) => {
        dv.setBigUint64(H_REFCOUNT_TABLE_OFFSET, FAR_PAST_EOF)
      })
      expectRefused(image, [/refcount/i, PAST_EOF])
    })

    it('offset not cluster aligned', () => {
      const image = patched(good64k, 'rt-misaligned.qcow2', (_buf, dv) => {
        dv.setBigUint64(H_REFCOUNT_TABLE_OFFSET, dv.getBigUint64(H_REFCOUNT_TABLE_OFFSET) + 0x10n)
      })
      expectRefused(image, [/refcount/i, /align/i])
    })
  })

  describe('cluster_bits out of range', () => {
    for (const clusterBits of [8, 22, 63]) {
      it(`cluster_bits = ${clusterBits}`, () => {
        const image = patched(good64k, `cluster-bits-${clusterBits}.qcow2`, (_buf, dv) => {
          dv.setUint32(H_CLUSTER_BITS, clusterBits)
        })
        expectRefused(image, [/cluster/i])
      })
    }
  })

  describe('unknown incompatible feature', () => {
    it('named from the feature name table', () => {
      const image = patched(good64k, 'incompat-named.qcow2', (buf, dv) => {
        const headerLength = dv.getUint32(H_HEADER_LENGTH)
        let at = Math.ceil(headerLength / 8) * 8
        let renamed = false
        while (!renamed) {
          const type = dv.getUint32(at)
          const length = dv.getUint32(at + 4)
          if (type === 0) throw new Error('no feature name table in the qemu-img image')
          if (type === EXT_FEATURE_NAME_TABLE) {
            // Turn the first entry (incompatible bit 0, "dirty bit") into a name for bit 10.
            const entry = at + 8
            expect(buf[entry]).toBe(0)
            buf[entry + 1] = 10
            buf.fill(0, entry + 2, entry + FEATURE_NAME_ENTRY_BYTES)
            buf.write('frobnication', entry + 2, 'latin1')
            renamed = true
          }
          at += 8 + Math.ceil(length / 8) * 8
        }
        dv.setBigUint64(H_INCOMPATIBLE_FEATURES, dv.getBigUint64(H_INCOMPATIBLE_FEATURES) | (1n << 10n))
      })
      expectRefused(image, [/frobnication/])
    })

    it('without a name: the bit number is given', () => {
      const image = patched(good64k, 'incompat-unnamed.qcow2', (_buf, dv) => {
        dv.setBigUint64(H_INCOMPATIBLE_FEATURES, dv.getBigUint64(H_INCOMPATIBLE_FEATURES) | (1n << 37n))
      })
      expectRefused(image, [/incompatible|unsupported|unknown/i, /\b37\b/])
    })
  })

  describe('encryption', () => {
    it('LUKS (made by qemu-img with a secret)', () => {
      const image = path('luks.qcow2')
      run(qemuImg!, [
        'create', '-q',
        '--object', 'secret,id=sec0,data=not-a-real-password',
        '-f', 'qcow2',
        '-o', 'encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10',
        image, '1M',
      ])
      expectRefused(image, [/encrypt/i])
    })

    it('legacy AES (crypt_method = 1)', () => {
      const image = patched(good64k, 'aes.qcow2', (_buf, dv) => {
        dv.setUint32(H_CRYPT_METHOD, 1)
      })
      expectRefused(image, [/encrypt|AES/i])
    })
  })

  describe('backing files', () => {
    it('missing backing file', () => {
      const image = path('orphan.qcow2')
      run(qemuImg!, ['create', '-q', '-f', 'qcow2', '-u', '-b', 'missing-base.qcow2', '-F', 'qcow2', image, '1M'])
      expectRefused(image, [/backing/i, /missing-base\.qcow2/])
    })

    it('two images naming each other', () => {
      const a = path('loop-a.qcow2')
      const b = path('loop-b.qcow2')
      run(qemuImg!, ['create', '-q', '-f', 'qcow2', '-u', '-b', 'loop-b.qcow2', '-F', 'qcow2', a, '1M'])
      run(qemuImg!, ['create', '-q', '-f', 'qcow2', '-u', '-b', 'loop-a.qcow2', '-F', 'qcow2', b, '1M'])
      expectRefused(a, [/loop|cycle|circular|recurs|chain|deep|depth/i], [b])
    })

    it('an image naming itself', () => {
      const image = path('self.qcow2')
      run(qemuImg!, ['create', '-q', '-f', 'qcow2', '-u', '-b', 'self.qcow2', '-F', 'qcow2', image, '1M'])
      expectRefused(image, [/loop|cycle|circular|recurs|chain|deep|depth|itself/i])
    })
  })

  describe('damage below the L1 table: the open may succeed, reading the region fails', () => {
    /**
     * `qcow2fs info` either refuses the image (one line, unchanged file) or prints it; then the
     * engine must answer EIO for the first 2 MiB (L1 entry 0) and the right bytes at 3 MiB.
     */
    async function expectRegionEio(image: string): Promise<void> {
      const hashBefore = sha256File(image)
      const result = runCli(['info', image], { timeoutMs: TIME_LIMIT_MS })
      expect(result.signal).toBeNull()
      expect(result.stderr).not.toMatch(/^\s+at /m)
      if (result.status !== 0) {
        expect(stderrLines(result)).toHaveLength(1)
        expect(result.stderr).toMatch(/^qcow2fs: \S/)
      }
      let img: Qcow2Image
      try {
        img = await Qcow2Image.open(image, { readOnly: true })
      } catch (err) {
        expect(err).toBeInstanceOf(Qcow2Error)
        expect((err as Error).message).not.toMatch(/\n/)
        expect(sha256File(image)).toBe(hashBefore)
        return
      }
      try {
        const damaged = new Uint8Array(4096)
        const failure = await img.read(damaged, 0).then(
          () => undefined,
          (err: unknown) => err,
        )
        expect(failure, 'reading the damaged region succeeded').toBeInstanceOf(Qcow2Error)
        expect((failure as Qcow2Error).errno).toBe('EIO')
        // The damaged region keeps failing, and the rest of the disk stays readable.
        await expect(img.read(new Uint8Array(512), 512)).rejects.toBeInstanceOf(Qcow2Error)
        const healthy = new Uint8Array(65536)
        await img.read(healthy, 3 * 1024 * 1024)
        expect(healthy.every((b) => b === 0xa5)).toBe(true)
      } finally {
        await img.close()
      }
      expect(sha256File(image)).toBe(hashBefore)
    }

    it('L2 table offset past EOF', async () => {
      const image = patched(good4k, 'l2-past-eof.qcow2', (buf, dv) => {
        dv.setBigUint64(Number(l1TableOffset(buf)), COPIED_FLAG | FAR_PAST_EOF)
      })
      await expectRegionEio(image)
    })

    it('L2 table offset not cluster aligned', async () => {
      const image = patched(good4k, 'l2-misaligned.qcow2', (buf, dv) => {
        dv.setBigUint64(Number(l1TableOffset(buf)), COPIED_FLAG | (l2TableOffset(buf, 0) + 0x200n))
      })
      await expectRegionEio(image)
    })

    it('data cluster offset past EOF in an L2 entry', async () => {
      const image = patched(good4k, 'data-past-eof.qcow2', (buf, dv) => {
        const l2 = Number(l2TableOffset(buf, 0))
        expect(dv.getBigUint64(l2) & L1_OFFSET_MASK, 'guest cluster 0 is allocated').not.toBe(0n)
        dv.setBigUint64(l2, COPIED_FLAG | FAR_PAST_EOF)
      })
      await expectRegionEio(image)
    })
  })
})

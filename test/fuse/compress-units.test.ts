/*
 * The compress mount options and the unmount progress of compressed writes, without a mount:
 * option parsing, the progress and summary lines, and progress messages on the control socket
 * (sent before the reply, each restarting the client's timeout).
 */
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { describe, expect, it } from 'vitest'
import { parseMountOptions } from '../../cli/commands/mount.js'
import { formatProgress, formatSummary } from '../../cli/commands/unmount.js'
import { UsageError } from '../../cli/command.js'
import { type CompressionReport, ControlServer, sendControlRequest } from '../../lib/fuse/control.js'

const MiB = 1024 * 1024

function report(overrides: Partial<CompressionReport> = {}): CompressionReport {
  return {
    image: 'new.qcow2',
    compressedClusters: 3000,
    uncompressedClusters: 12,
    zeroClusters: 40,
    guestBytes: 3012 * 65536,
    storedBytes: 61 * MiB,
    pendingClusters: 34,
    ...overrides,
  }
}

describe('compress mount options', () => {
  it('compress and compress-staging=BYTES', () => {
    expect(parseMountOptions(['compress'])).toMatchObject({ access: 'auto', compress: true })
    expect(parseMountOptions(['compress,compress-staging=16M'])).toMatchObject({ compress: true, compressStagingBytes: 16 * MiB })
    expect(parseMountOptions(['rw,compress', 'compress-staging=0'])).toMatchObject({ access: 'rw', compress: true, compressStagingBytes: 0 })
    expect(parseMountOptions([])).not.toHaveProperty('compress')
  })

  it('compress-zlib=fast|qemu', () => {
    expect(parseMountOptions(['compress'])).not.toHaveProperty('compressZlib')
    expect(parseMountOptions(['compress,compress-zlib=qemu'])).toMatchObject({ compress: true, compressZlib: 'qemu' })
    expect(parseMountOptions(['compress,compress-zlib=qemu', 'compress-zlib=fast'])).toMatchObject({ compressZlib: 'fast' })
    expect(() => parseMountOptions(['compress,compress-zlib=system'])).toThrow(/expected fast or qemu/)
    expect(() => parseMountOptions(['compress-zlib=qemu'])).toThrow(/needs 'compress'/)
  })

  it('refuses bad values and combinations with read-only mounts, as usage errors', () => {
    for (const bad of ['compress=1', 'compress,compress-staging=', 'compress,compress-staging=-1', 'compress,compress-staging=1T', 'compress-staging=8M', 'ro,compress', 'compress,snapshot=s1']) {
      expect(() => parseMountOptions([bad]), bad).toThrow(UsageError)
    }
    expect(() => parseMountOptions(['ro,compress'])).toThrow(/cannot be combined with 'ro'/)
  })
})

describe('unmount progress and summary', () => {
  it('the progress line: clusters and bytes done, clusters to go, the ratio so far', () => {
    expect(formatProgress([report()])).toBe('new.qcow2: 3052 clusters (188.3 MiB) done, 34 to go, stored in 32.4%')
    expect(formatProgress([report(), report({ image: 'b.qcow2', guestBytes: 0, storedBytes: 0 })])).toMatch(/; b\.qcow2: .* stored in -$/)
  })

  it('the summary line', () => {
    expect(formatSummary(report())).toBe(
      'new.qcow2: 3000 clusters compressed, 12 stored uncompressed, 40 zero; 188.3 MiB stored in 61.0 MiB (32.4%)',
    )
  })

  it('progress messages reach the client before the reply and keep its timeout from expiring', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'qcow2fs-progress-'))
    const socketPath = join(dir, 'c.sock')
    const server = await ControlServer.listen(socketPath, async (_request, progress) => {
      for (let i = 1; i <= 4; i++) {
        await new Promise((done) => setTimeout(done, 150))
        progress([report({ pendingClusters: 10 - i })])
      }
      return { ok: true, pid: 1, compression: [report({ pendingClusters: 0 })] }
    })
    try {
      const seen: number[] = []
      // 400 ms would expire before the reply (600 ms) without the progress messages.
      const { reply, hangUp } = await sendControlRequest(socketPath, { op: 'unmount', lazy: false }, 400, (r) => seen.push(r[0]!.pendingClusters))
      hangUp()
      expect(seen).toEqual([9, 8, 7, 6])
      expect(reply).toMatchObject({ ok: true, compression: [{ image: 'new.qcow2', pendingClusters: 0 }] })
    } finally {
      await server.close()
      await rm(dir, { recursive: true, force: true })
    }
  })
})

/*
 * The pure parts of the FUSE layer: the errno mapping, the mount option parser, the FUSE option
 * string, the mount table parser, the control socket naming and the control channel.
 */
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { describe, expect, it } from 'vitest'
import { UsageError } from '../../cli/command.js'
import { parseByteSize, parseMountOptions } from '../../cli/commands/mount.js'
import {
  BusyError,
  ClosedError,
  CorruptImageError,
  InvalidRequestError,
  NoSpaceError,
  NotFoundError,
  ReadOnlyError,
  UnsupportedFeatureError,
} from '../../lib/errors.js'
import { ControlServer, NoServerError, controlSocketPath, sendControlRequest, serverLogPath } from '../../lib/fuse/control.js'
import { toFuseErrno } from '../../lib/fuse/errno.js'
import { parseMountInfo, findMount } from '../../lib/fuse/mountinfo.js'
import { buildOptionString } from '../../lib/fuse/native.js'

function systemError(code: string): NodeJS.ErrnoException {
  return Object.assign(new Error(`${code}: pread failed`), { code, syscall: 'pread' })
}

describe('toFuseErrno', () => {
  it('maps every Qcow2Error by its errno name', () => {
    expect(toFuseErrno(new CorruptImageError('bad L2 entry'))).toBe(-5)
    expect(toFuseErrno(new UnsupportedFeatureError('encryption'))).toBe(-95)
    expect(toFuseErrno(new InvalidRequestError('bad range'))).toBe(-22)
    expect(toFuseErrno(new ReadOnlyError('read-only'))).toBe(-30)
    expect(toFuseErrno(new NoSpaceError('full'))).toBe(-28)
    expect(toFuseErrno(new NoSpaceError('table too large', 'EFBIG'))).toBe(-27)
    expect(toFuseErrno(new ClosedError())).toBe(-9)
    expect(toFuseErrno(new NotFoundError('gone'))).toBe(-2)
    expect(toFuseErrno(new BusyError('locked'))).toBe(-16)
  })

  it('maps Node system errors by their code', () => {
    expect(toFuseErrno(systemError('EIO'))).toBe(-5)
    expect(toFuseErrno(systemError('ENOSPC'))).toBe(-28)
    expect(toFuseErrno(systemError('EACCES'))).toBe(-13)
    expect(toFuseErrno(systemError('ENOTSUP'))).toBe(-95)
  })

  it('answers EIO for anything else', () => {
    expect(toFuseErrno(new Error('plain'))).toBe(-5)
    expect(toFuseErrno(Object.assign(new Error('x'), { code: 'ERR_OUT_OF_RANGE' }))).toBe(-5)
    expect(toFuseErrno(Object.assign(new Error('x'), { code: 'ENOSUCHTHING' }))).toBe(-5)
    expect(toFuseErrno('a string')).toBe(-5)
    expect(toFuseErrno(undefined)).toBe(-5)
  })
})

describe('mount options', () => {
  it('defaults to read-write where possible, resizable, no snapshot, default cache, no allow_other, locked', () => {
    expect(parseMountOptions([])).toEqual({ access: 'auto', fixedSize: false, allowOther: false, lock: true })
  })

  it('parses every known option, across several -o', () => {
    expect(parseMountOptions(['rw,cache-size=4M', 'allow_other,fixed-size', 'nolock'])).toEqual({
      access: 'rw',
      fixedSize: true,
      l2CacheBytes: 4 * 1024 * 1024,
      allowOther: true,
      lock: false,
    })
    expect(parseMountOptions(['rw,ro'])).toEqual({ access: 'ro', fixedSize: false, allowOther: false, lock: true })
    expect(parseMountOptions(['snapshot=1'])).toEqual({ access: 'ro', fixedSize: false, snapshot: '1', allowOther: false, lock: true })
    expect(parseMountOptions(['ro,snapshot=before upgrade'])).toMatchObject({ snapshot: 'before upgrade' })
  })

  it('refuses unknown options, bad values and rw with a snapshot, as usage errors', () => {
    for (const bad of ['bogus', 'ro=1', 'snapshot', 'snapshot=', 'cache-size=', 'cache-size=0', 'cache-size=1T', 'cache-size=-5', 'rw,snapshot=s1', 'allow_other=yes', 'fixed-size=1', 'nolock=1']) {
      expect(() => parseMountOptions([bad]), bad).toThrow(UsageError)
    }
    expect(() => parseMountOptions(['bogus'])).toThrow(/^unknown mount option 'bogus' \(known: [^)]+\)$/)
  })

  it('reads byte sizes with binary suffixes', () => {
    expect(parseByteSize('65536')).toBe(65536)
    expect(parseByteSize('64K')).toBe(65536)
    expect(parseByteSize('2m')).toBe(2 * 1024 * 1024)
    expect(parseByteSize('1G')).toBe(1024 ** 3)
    expect(parseByteSize('1.5M')).toBeUndefined()
    expect(parseByteSize('0')).toBeUndefined()
    expect(parseByteSize('K')).toBeUndefined()
  })
})

describe('FUSE option string', () => {
  const base = {
    name: 'qcow2fs',
    readOnly: true,
    allowOther: false,
    maxReadBytes: 131072,
    maxReadaheadBytes: 131072,
    kernelCache: true,
    directIo: false,
    attrTimeoutSeconds: 60,
    entryTimeoutSeconds: 60,
  }

  it('carries big_writes, atomic_o_trunc and the chosen caching options', () => {
    const opts = buildOptionString(base)
    expect(opts.startsWith('-o')).toBe(true)
    const list = opts.slice(2).split(',')
    for (const item of ['big_writes', 'atomic_o_trunc', 'ro', 'kernel_cache', 'max_read=131072', 'fsname=qcow2fs', 'subtype=qcow2fs', 'default_permissions']) {
      expect(list).toContain(item)
    }
    expect(list).not.toContain('allow_other')
    expect(list).not.toContain('direct_io')
  })

  it('adds allow_other and drops ro for a writable mount', () => {
    const list = buildOptionString({ ...base, readOnly: false, allowOther: true }).slice(2).split(',')
    expect(list).toContain('allow_other')
    expect(list).not.toContain('ro')
  })
})

describe('mount table', () => {
  const sample = [
    '22 27 0:21 / /proc rw,relatime - proc proc rw',
    '27 1 254:0 / / rw,relatime - ext4 /dev/vda rw',
    '90 27 0:55 / /mnt/with\\040space rw,nosuid,nodev,relatime - fuse.qcow2fs qcow2fs rw,user_id=0,group_id=0',
    '91 90 0:56 / /mnt/with\\040space rw,relatime shared:5 master:1 - tmpfs tmpfs rw',
  ].join('\n')

  it('parses fields, optional fields and escaped paths', () => {
    const table = parseMountInfo(sample)
    expect(table).toHaveLength(4)
    expect(table[2]).toEqual({ mountId: 90, device: '0:55', mountPoint: '/mnt/with space', fsType: 'fuse.qcow2fs', source: 'qcow2fs' })
    expect(table[3]!.fsType).toBe('tmpfs')
  })

  it('finds the topmost mount at a path', () => {
    const table = parseMountInfo(sample)
    expect(findMount(table, '/mnt/with space')?.fsType).toBe('tmpfs')
    expect(findMount(table, '/mnt')).toBeUndefined()
  })
})

describe('control socket naming', () => {
  it('derives one short socket and one log path per mountpoint', () => {
    const a = controlSocketPath('/mnt/a')
    expect(a).toBe(controlSocketPath('/mnt/a'))
    expect(a).not.toBe(controlSocketPath('/mnt/b'))
    expect(a.endsWith('.sock')).toBe(true)
    expect(serverLogPath('/mnt/a')).toBe(a.replace(/\.sock$/, '.log'))
    // Unix socket paths must stay below 108 bytes even for a long mountpoint.
    expect(controlSocketPath(`/${'x'.repeat(300)}`).length).toBe(a.length)
    expect(a).toMatch(new RegExp(`qcow2fs-${process.getuid!()}/`))
  })
})

describe('control channel', () => {
  it('answers a request whose reply comes after close() started, then closes the connection', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'qcow2fs-control-'))
    const socketPath = join(dir, 'c.sock')
    let release!: () => void
    const gate = new Promise<void>((done) => (release = done))
    let received!: () => void
    const requested = new Promise<void>((done) => (received = done))
    const server = await ControlServer.listen(socketPath, async () => {
      received()
      await gate
      return { ok: true, pid: 42 }
    })
    try {
      const answer = sendControlRequest(socketPath, { op: 'unmount', lazy: false }, 5_000)
      await requested
      // The shutdown closes the control server before the unmount request's reply is ready.
      const closing = server.close()
      release()
      const { reply, closed } = await answer
      expect(reply).toEqual({ ok: true, pid: 42 })
      await closed
      await closing
      await expect(sendControlRequest(socketPath, { op: 'status' }, 5_000)).rejects.toBeInstanceOf(NoServerError)
    } finally {
      await rm(dir, { recursive: true, force: true })
    }
  })
})

/*
 * Image locks in one process: QEMU's lock bytes as open file description locks, taken when an
 * image (and its backing chain) opens and released when it closes. Two opens in one process
 * must see each other like two processes do (process-associated locks would not), and a
 * refused or failed open must change nothing and leave no lock. The locks are read from
 * /proc/locks, not through our addon. QEMU's side is in test/fuse/lock.test.ts.
 */
import { createHash } from 'node:crypto'
import * as fs from 'node:fs'
import * as os from 'node:os'
import * as path from 'node:path'
import { afterAll, afterEach, beforeAll, describe, expect, test } from 'vitest'
import { createImage, type CreateOptions } from '../../lib/engine/create.js'
import { BusyError, NotFoundError } from '../../lib/errors.js'
import { Qcow2Image } from '../../lib/image.js'
import { lockedBytes } from '../../lib/io/image-lock.js'
import { NodeBlockFile } from '../../lib/io/block-file.js'
import { locksOn, lockedBytesOn } from '../helpers/locks.js'

const WRITER_BYTES = [100, 101, 103, 201, 203]
const READER_BYTES = [100, 201, 203]

let dir = ''
let count = 0
/** Everything a test opened, closed after it whatever happened. */
const open: Qcow2Image[] = []

async function newImage(options: CreateOptions = { virtualSize: 4 * 1024 * 1024 }, name = `img${count++}.qcow2`): Promise<string> {
  const imagePath = path.join(dir, name)
  await createImage(imagePath, options, (p) => {
    fs.writeFileSync(p, new Uint8Array(0), { flag: 'wx' })
    return NodeBlockFile.open(p, { readOnly: false, lock: 'none' })
  })
  return imagePath
}

async function openImage(imagePath: string, readOnly: boolean, lock?: boolean): Promise<Qcow2Image> {
  const image = await Qcow2Image.open(imagePath, lock === undefined ? { readOnly } : { readOnly, lock })
  open.push(image)
  return image
}

function sha256(file: string): string {
  return createHash('sha256').update(fs.readFileSync(file)).digest('hex')
}

/** Sorted bytes of several holders together. */
function bytesOf(...holders: number[][]): number[] {
  return holders.flat().sort((a, b) => a - b)
}

beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qcow2fs-lock-'))
})

afterEach(async () => {
  for (const image of open.splice(0)) await image.close()
})

afterAll(() => {
  if (dir) fs.rmSync(dir, { recursive: true, force: true })
})

describe("QEMU's lock bytes", () => {
  test('the modes hold the bytes QEMU 7.2 holds for the same opens', () => {
    expect(lockedBytes('write')).toEqual(WRITER_BYTES)
    expect(lockedBytes('read')).toEqual(READER_BYTES)
    expect(lockedBytes('none')).toEqual([])
  })

  test('a read-write open holds the writer bytes, a read-only open the reader bytes, as OFD read locks; close releases them', async () => {
    const imagePath = await newImage()
    const writer = await openImage(imagePath, false)
    expect(locksOn(imagePath).every((l) => l.kind === 'OFDLCK' && l.type === 'READ')).toBe(true)
    expect(lockedBytesOn(imagePath)).toEqual(WRITER_BYTES)
    await writer.close()
    expect(locksOn(imagePath)).toEqual([])
    const reader = await openImage(imagePath, true)
    expect(locksOn(imagePath).every((l) => l.kind === 'OFDLCK' && l.type === 'READ')).toBe(true)
    expect(lockedBytesOn(imagePath)).toEqual(READER_BYTES)
    await reader.close()
    expect(locksOn(imagePath)).toEqual([])
  })
})

describe('two opens of one image in one process', () => {
  test('read-write + read-write: the second is refused, naming the image, and changes nothing', async () => {
    const imagePath = await newImage()
    await openImage(imagePath, false)
    const before = sha256(imagePath)
    const refusal = Qcow2Image.open(imagePath, { readOnly: false })
    await expect(refusal).rejects.toBeInstanceOf(BusyError)
    await expect(refusal).rejects.toThrow(`'${imagePath}' is in use by another process (locked for writing by QEMU or a qcow2fs mount); close it there first`)
    expect(sha256(imagePath)).toBe(before)
    // Only the first open's locks remain.
    expect(lockedBytesOn(imagePath)).toEqual(WRITER_BYTES)
  })

  test('read-write + read-only: the reader is refused (the image is being written)', async () => {
    const imagePath = await newImage()
    const writer = await openImage(imagePath, false)
    await writer.write(new Uint8Array(4096).fill(7), 0)
    await writer.flush()
    const before = sha256(imagePath)
    await expect(Qcow2Image.open(imagePath, { readOnly: true })).rejects.toThrow(/^'[^']+' is in use by another process \(locked for writing/)
    expect(sha256(imagePath)).toBe(before)
    expect(lockedBytesOn(imagePath)).toEqual(WRITER_BYTES)
  })

  test('read-only + read-write: the writer is refused with a message saying the image is open read-only', async () => {
    const imagePath = await newImage()
    await openImage(imagePath, true)
    const refusal = Qcow2Image.open(imagePath, { readOnly: false })
    await expect(refusal).rejects.toBeInstanceOf(BusyError)
    await expect(refusal).rejects.toThrow(
      `'${imagePath}' is in use by another process (open read-only in QEMU or a qcow2fs mount, which do not share writing); open it read-only, or close it there first`,
    )
    expect(lockedBytesOn(imagePath)).toEqual(READER_BYTES)
  })

  test('read-only + read-only: both open and read; the last one closed releases the image', async () => {
    const imagePath = await newImage()
    const first = await openImage(imagePath, true)
    const second = await openImage(imagePath, true)
    expect(lockedBytesOn(imagePath)).toEqual(bytesOf(READER_BYTES, READER_BYTES))
    const buf = new Uint8Array(512)
    await first.read(buf, 0)
    await second.read(buf, 0)
    // Closing one open drops its locks only: with process-associated locks, closing any
    // descriptor of the file would drop the other's too, and a writer would get in.
    await first.close()
    expect(lockedBytesOn(imagePath)).toEqual(READER_BYTES)
    await expect(Qcow2Image.open(imagePath, { readOnly: false })).rejects.toBeInstanceOf(BusyError)
    await second.close()
    const writer = await openImage(imagePath, false)
    await writer.write(new Uint8Array(512).fill(1), 0)
  })

  test('lock: false neither locks nor checks (QEMU locking=off)', async () => {
    const imagePath = await newImage()
    await openImage(imagePath, false)
    const unlocked = await openImage(imagePath, true, false)
    const buf = new Uint8Array(512)
    await unlocked.read(buf, 0)
    expect(lockedBytesOn(imagePath)).toEqual(WRITER_BYTES)
  })
})

describe('backing files', () => {
  test('are locked read-only and shared: two overlays of one base open read-write together; the base cannot be written meanwhile', async () => {
    const base = await newImage()
    const overlayA = await newImage({ backingFile: path.basename(base), backingFormat: 'qcow2' })
    const overlayB = await newImage({ backingFile: path.basename(base), backingFormat: 'qcow2' })
    const a = await openImage(overlayA, false)
    expect(lockedBytesOn(base)).toEqual(READER_BYTES)
    const b = await openImage(overlayB, false)
    expect(lockedBytesOn(base)).toEqual(bytesOf(READER_BYTES, READER_BYTES))
    expect(lockedBytesOn(overlayA)).toEqual(WRITER_BYTES)
    expect(lockedBytesOn(overlayB)).toEqual(WRITER_BYTES)
    await a.write(new Uint8Array(4096).fill(0xaa), 0)
    await b.write(new Uint8Array(4096).fill(0xbb), 0)
    await expect(Qcow2Image.open(base, { readOnly: false })).rejects.toThrow(/is in use by another process \(open read-only in QEMU or a qcow2fs mount/)
    // A reader of the base is fine.
    await openImage(base, true)
    await a.close()
    await b.close()
    expect(lockedBytesOn(overlayA)).toEqual([])
    expect(lockedBytesOn(base)).toEqual(READER_BYTES)
  })

  test('a raw backing file takes the reader bytes too', async () => {
    const raw = path.join(dir, `raw${count++}.img`)
    fs.writeFileSync(raw, new Uint8Array(1024 * 1024))
    const overlay = await newImage({ backingFile: path.basename(raw), backingFormat: 'raw' })
    await openImage(overlay, false)
    expect(lockedBytesOn(raw)).toEqual(READER_BYTES)
  })
})

describe('failed opens leave no lock', () => {
  test('an overlay whose backing file is missing: refused after the overlay was locked, and unlocked again', async () => {
    const base = await newImage()
    const overlay = await newImage({ backingFile: path.basename(base), backingFormat: 'qcow2' })
    fs.unlinkSync(base)
    const before = sha256(overlay)
    await expect(Qcow2Image.open(overlay, { readOnly: false })).rejects.toBeInstanceOf(NotFoundError)
    expect(locksOn(overlay)).toEqual([])
    expect(sha256(overlay)).toBe(before)
  })

  test('a backing file written elsewhere: the overlay open is refused and neither file keeps a lock of it', async () => {
    const base = await newImage()
    const overlay = await newImage({ backingFile: path.basename(base), backingFormat: 'qcow2' })
    await openImage(base, false)
    const before = sha256(overlay)
    await expect(Qcow2Image.open(overlay, { readOnly: false })).rejects.toThrow(`'${base}' is in use by another process (locked for writing`)
    expect(locksOn(overlay)).toEqual([])
    expect(lockedBytesOn(base)).toEqual(WRITER_BYTES)
    expect(sha256(overlay)).toBe(before)
  })

  test('a refused open of a locked image leaves only the holder locks, however often it is tried', async () => {
    const imagePath = await newImage()
    await openImage(imagePath, false)
    for (let i = 0; i < 5; i++) {
      await expect(Qcow2Image.open(imagePath, { readOnly: i % 2 === 0 })).rejects.toBeInstanceOf(BusyError)
    }
    expect(lockedBytesOn(imagePath)).toEqual(WRITER_BYTES)
  })
})

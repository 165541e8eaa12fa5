/*
 * Mounts made through the compiled CLI (dist/cli/main.js) for the end-to-end FUSE tests, and
 * the cleanup that never leaves one behind:
 *
 *   new CliMounts(dir, timeoutMs)   mountpoints are made inside dir; CLI runs are killed after
 *                                   timeoutMs
 *   mounts.cli(args)                runs `qcow2fs ARGS...` (DEBUG unset), never rejects
 *   mounts.newMountpoint()          a new empty directory, unmounted at cleanup
 *   mounts.newLoopMountpoint()      the same for a loop mount of a raw file (umount -l at cleanup)
 *   mounts.mountImage(image, extra) `qcow2fs mount EXTRA... IMAGE MNT`, which must succeed
 *   mounts.unmount(mnt)             `qcow2fs unmount MNT`, which must succeed and leave nothing
 *                                   mounted; returns its stdout
 *   mounts.cleanup()                loop mounts first, then every mountpoint: unmount --lazy,
 *                                   fusermount -uz, the server log removed
 *
 *   expectIdentical(tools, raw, image)   `qemu-img compare` of a raw file and a qcow2 image
 *   makeExt4With(raw, loop, sources)     mkfs.ext4 on a raw file, a loop mount, cp -a of the
 *                                        sources into it, umount
 *   expectExt4Holds(raw, loop, sources)  e2fsck -fn finds nothing; a read-only loop mount holds
 *                                        each source (diff -r) under its base name
 */
import { mkdir, rm } from 'node:fs/promises'
import { basename, join } from 'node:path'
import { expect } from 'vitest'
import { serverLogPath } from '../../lib/fuse/control.js'
import { CLI_PATH } from '../cli/helpers.js'
import { type ProcessResult, forceUnmount, isMounted, mountEntry, runProcess } from '../fuse/helpers.js'
import type { QemuTools } from './qemu.js'

export class CliMounts {
  private count = 0
  private readonly mountpoints: string[] = []
  private readonly loopMountpoints: string[] = []

  constructor(
    private readonly dir: string,
    private readonly timeoutMs: number,
  ) {}

  /** Runs the CLI with DEBUG unset (its output on stderr would break the checks). */
  cli(args: string[]): Promise<ProcessResult> {
    const env = { ...process.env }
    delete env.DEBUG
    return runProcess(process.execPath, [CLI_PATH, ...args], { timeoutMs: this.timeoutMs, env })
  }

  async newMountpoint(): Promise<string> {
    const mnt = join(this.dir, `mnt${this.count++}`)
    await mkdir(mnt)
    this.mountpoints.push(mnt)
    return mnt
  }

  async newLoopMountpoint(): Promise<string> {
    const loop = join(this.dir, `loop${this.count++}`)
    await mkdir(loop)
    this.loopMountpoints.push(loop)
    return loop
  }

  /** Mounts IMAGE (with extra `mount` arguments); returns the mountpoint, the raw file and mount's stderr. */
  async mountImage(image: string, extra: string[] = []): Promise<{ mnt: string; raw: string; stderr: string }> {
    const mnt = await this.newMountpoint()
    const r = await this.cli(['mount', ...extra, image, mnt])
    expect(r.code, r.stderr).toBe(0)
    return { mnt, raw: r.stdout.toString().trim(), stderr: r.stderr }
  }

  /** Unmounts; returns unmount's stdout (the summary lines of compressed images). */
  async unmount(mnt: string): Promise<string> {
    const r = await this.cli(['unmount', mnt])
    expect(r.code, r.stderr).toBe(0)
    expect(isMounted(mnt)).toBe(false)
    return r.stdout.toString()
  }

  /** Leaves nothing mounted: loop mounts (latest first), then every mountpoint; never throws. */
  async cleanup(): Promise<void> {
    for (const loop of [...this.loopMountpoints].reverse()) {
      if (isMounted(loop)) await runProcess('umount', ['-l', loop]).catch(() => undefined)
    }
    for (const mnt of this.mountpoints) {
      if (mountEntry(mnt)?.fsType === 'fuse.qcow2fs') await this.cli(['unmount', '--lazy', mnt]).catch(() => undefined)
      await forceUnmount(mnt)
      await rm(serverLogPath(mnt), { force: true })
    }
  }
}

/** `qemu-img compare` says the raw file and the qcow2 image hold the same disk. */
export async function expectIdentical(tools: QemuTools, raw: string, image: string): Promise<void> {
  const r = await runProcess(tools.qemuImg, ['compare', '-f', 'raw', '-F', 'qcow2', raw, image])
  expect(r.code, `${r.stdout.toString()}${r.stderr}`).toBe(0)
}

/** mkfs.ext4 on `raw`, a loop mount at `loop`, `cp -a` of every source into it, umount. */
export async function makeExt4With(raw: string, loop: string, sources: string[]): Promise<void> {
  const mkfs = await runProcess('mkfs.ext4', ['-q', '-F', raw])
  expect(mkfs.code, mkfs.stderr).toBe(0)
  let r = await runProcess('mount', ['-o', 'loop', raw, loop])
  expect(r.code, r.stderr).toBe(0)
  r = await runProcess('cp', ['-a', ...sources, loop])
  expect(r.code, r.stderr).toBe(0)
  r = await runProcess('umount', [loop])
  expect(r.code, r.stderr).toBe(0)
}

/** e2fsck -fn of `raw` is clean, and a read-only loop mount of it holds every source unchanged. */
export async function expectExt4Holds(raw: string, loop: string, sources: string[]): Promise<void> {
  const fsck = await runProcess('e2fsck', ['-fn', raw])
  expect(fsck.code, `${fsck.stdout.toString()}${fsck.stderr}`).toBe(0)
  let r = await runProcess('mount', ['-o', 'loop,ro', raw, loop])
  expect(r.code, r.stderr).toBe(0)
  try {
    for (const original of sources) {
      const diff = await runProcess('diff', ['-r', original, join(loop, basename(original))])
      expect(diff.code, diff.stdout.toString()).toBe(0)
    }
  } finally {
    r = await runProcess('umount', [loop])
    expect(r.code, r.stderr).toBe(0)
  }
}

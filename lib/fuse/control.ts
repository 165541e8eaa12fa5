/*
 * The control channel between `qcow2fs unmount` (or a second `mount`) and a running mount
 * server: a Unix socket in the runtime directory ($XDG_RUNTIME_DIR or the temp dir, then
 * qcow2fs-<uid>/, mode 0700), named after a hash of the mountpoint's resolved path, carrying one
 * JSON object per line.
 *
 *   -> {"op":"status"}                 <- {"ok":true,"pid":N,"mountpoint":"...","files":[...]}
 *   -> {"op":"unmount","lazy":false}   <- {"ok":true,"pid":N} once every image is closed and
 *                                         the file system is unmounted; the server exits next
 *                                         ("compression": [...] with compressed writes)
 *                                      <- {"ok":false,"error":"one line"} when it cannot
 *
 * While an unmount finishes images with compressed writes, the server may send progress lines
 * before the reply: {"progress":[{"image":"NAME", ...counters}]}.
 */
import { createHash } from 'node:crypto'
import { lstat, mkdir, stat, unlink } from 'node:fs/promises'
import { createConnection, type Server, type Socket, createServer } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import type { CompressionProgress } from '../disk.js'
import { log } from '../log.js'

export type ControlRequest = { op: 'status' } | { op: 'unmount'; lazy: boolean }

/** Compressed-write counters of one image (named by its file name). */
export type CompressionReport = CompressionProgress & { image: string }

export type ControlReply =
  | { ok: true; pid: number; mountpoint?: string; files?: string[]; compression?: CompressionReport[] }
  | { ok: false; error: string }

/** Where the control sockets and server logs of this user live. */
export function runtimeDir(): string {
  const base = process.env.XDG_RUNTIME_DIR || tmpdir()
  return join(base, `qcow2fs-${process.getuid?.() ?? 0}`)
}

/** Creates the runtime directory, or checks that an existing one is private to this user. */
export async function ensureRuntimeDir(): Promise<string> {
  const dir = runtimeDir()
  await mkdir(dir, { recursive: true, mode: 0o700 })
  const st = await lstat(dir)
  const uid = process.getuid?.() ?? 0
  if (!st.isDirectory() || st.uid !== uid || (st.mode & 0o077) !== 0) {
    throw new Error(`runtime directory '${dir}' is not a directory private to uid ${uid}; remove it`)
  }
  return dir
}

function mountpointKey(realMountpoint: string): string {
  return createHash('sha256').update(realMountpoint).digest('hex').slice(0, 20)
}

/** The control socket of the server for a mountpoint (given as its resolved path). */
export function controlSocketPath(realMountpoint: string): string {
  return join(runtimeDir(), `${mountpointKey(realMountpoint)}.sock`)
}

/** Where a background server's stderr (DEBUG=qcow2fs:* output, crashes) goes. */
export function serverLogPath(realMountpoint: string): string {
  return join(runtimeDir(), `${mountpointKey(realMountpoint)}.log`)
}

/** Deletes a server log that stayed empty (no DEBUG, no crash); keeps anything written. */
export async function removeIfEmpty(logPath: string): Promise<void> {
  try {
    if ((await stat(logPath)).size === 0) await unlink(logPath)
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') log.server('cannot tidy %s: %s', logPath, (err as Error).message)
  }
}

/** Splits a socket's data into JSON lines. */
function onJsonLines(socket: Socket, handler: (message: unknown) => void): void {
  let pending = ''
  socket.setEncoding('utf8')
  socket.on('data', (chunk: string) => {
    pending += chunk
    let newline: number
    while ((newline = pending.indexOf('\n')) >= 0) {
      const line = pending.slice(0, newline)
      pending = pending.slice(newline + 1)
      if (!line.trim()) continue
      let message: unknown
      try {
        message = JSON.parse(line)
      } catch {
        message = undefined
      }
      handler(message)
    }
  })
}

function isControlRequest(message: unknown): message is ControlRequest {
  if (typeof message !== 'object' || message === null) return false
  const op = (message as { op?: unknown }).op
  if (op === 'status') return true
  return op === 'unmount' && typeof (message as { lazy?: unknown }).lazy === 'boolean'
}

/** Answers a request; may send progress lines (compressed writes being finished) before that. */
export type ControlHandler = (request: ControlRequest, progress: (report: CompressionReport[]) => void) => Promise<ControlReply>

/**
 * The server side: answers each request line with one reply line. close() ends a connection
 * only after the replies it still owes are written, so the unmount request that started a
 * shutdown always gets its answer, however the shutdown and the reply race.
 */
export class ControlServer {
  private readonly server: Server
  /** Open connections and how many replies each still owes. */
  private readonly owed = new Map<Socket, number>()
  private closing = false

  private constructor(server: Server) {
    this.server = server
  }

  static listen(socketPath: string, handler: ControlHandler): Promise<ControlServer> {
    const server = createServer((socket) => control.accept(socket, handler))
    const control = new ControlServer(server)
    return new Promise((resolve, reject) => {
      server.once('error', reject)
      server.listen(socketPath, () => {
        server.off('error', reject)
        server.on('error', (err) => log.server('control socket error: %s', err.message))
        resolve(control)
      })
    })
  }

  private accept(socket: Socket, handler: ControlHandler): void {
    if (this.closing) {
      socket.end()
      return
    }
    this.owed.set(socket, 0)
    socket.on('close', () => this.owed.delete(socket))
    socket.on('error', (err) => log.server('control connection error: %s', err.message))
    onJsonLines(socket, (message) => {
      this.owed.set(socket, (this.owed.get(socket) ?? 0) + 1)
      const progress = (report: CompressionReport[]) => {
        if (!socket.destroyed && socket.writable) socket.write(`${JSON.stringify({ progress: report })}\n`)
      }
      const reply: Promise<ControlReply> = isControlRequest(message)
        ? handler(message, progress).catch((err: unknown) => ({ ok: false as const, error: err instanceof Error ? err.message : String(err) }))
        : Promise.resolve({ ok: false as const, error: 'malformed control request' })
      void reply.then((r) => {
        if (!socket.destroyed && socket.writable) socket.write(`${JSON.stringify(r)}\n`)
        const owed = this.owed.get(socket)
        if (owed === undefined) return
        const left = owed - 1
        this.owed.set(socket, left)
        if (this.closing && left === 0) socket.end()
      })
    })
  }

  /** Stops listening (removing the socket file) and ends every connection once answered. */
  close(): Promise<void> {
    this.closing = true
    for (const [socket, owed] of this.owed) if (owed === 0) socket.end()
    return new Promise((resolve) => this.server.close(() => resolve()))
  }
}

export class NoServerError extends Error {
  override name = 'NoServerError'
}

export interface ControlAnswer {
  reply: ControlReply
  /** Resolves when the connection closes (the server closes it when it exits). */
  closed: Promise<void>
  /** Closes the connection from this side. */
  hangUp(): void
}

/**
 * Sends one request (timeoutMs may be Infinity) and resolves with the reply; the connection
 * stays open until the server exits or hangUp(). Rejects with NoServerError when nothing
 * listens on the socket. Progress lines go to onProgress, and each restarts the timeout.
 */
export function sendControlRequest(
  socketPath: string,
  request: ControlRequest,
  timeoutMs: number,
  onProgress?: (report: CompressionReport[]) => void,
): Promise<ControlAnswer> {
  return new Promise((resolve, reject) => {
    const socket = createConnection(socketPath)
    const closed = new Promise<void>((done) => socket.once('close', () => done()))
    let answered = false
    const expire = () => {
      socket.destroy()
      reject(new Error(`no answer from the qcow2fs server within ${Math.round(timeoutMs / 1000)} s`))
    }
    let timer = Number.isFinite(timeoutMs) ? setTimeout(expire, timeoutMs) : undefined
    socket.once('error', (err: NodeJS.ErrnoException) => {
      clearTimeout(timer)
      if (answered) return
      if (err.code === 'ENOENT' || err.code === 'ECONNREFUSED' || err.code === 'ENOTSOCK') reject(new NoServerError(err.message))
      else reject(err)
    })
    socket.once('connect', () => socket.write(`${JSON.stringify(request)}\n`))
    socket.once('close', () => {
      clearTimeout(timer)
      if (!answered) reject(new Error('the qcow2fs server closed the control connection without answering'))
    })
    onJsonLines(socket, (message) => {
      if (answered) return
      const progress = (message as { progress?: unknown } | undefined)?.progress
      if (Array.isArray(progress)) {
        if (timer !== undefined) {
          clearTimeout(timer)
          timer = setTimeout(expire, timeoutMs)
        }
        onProgress?.(progress as CompressionReport[])
        return
      }
      answered = true
      clearTimeout(timer)
      const reply = message as ControlReply
      if (typeof reply !== 'object' || reply === null || typeof reply.ok !== 'boolean') {
        socket.destroy()
        reject(new Error('malformed reply from the qcow2fs server'))
        return
      }
      resolve({ reply, closed, hangUp: () => socket.destroy() })
    })
  })
}

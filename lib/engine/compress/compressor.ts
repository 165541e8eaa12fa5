/*
 * Compression of whole clusters for compressed writes (spec: "Compressed Clusters Descriptor",
 * the compression_type header field), off the event loop and on every core.
 *
 * Design notes:
 *  - zlib (compression type 0): a raw deflate stream (no zlib header) made with QEMU's
 *    parameters: level Z_DEFAULT_COMPRESSION, a 4 KiB window (windowBits 12) and memLevel 9.
 *    The window is not a matter of taste: QEMU inflates with a 4 KiB window, so a stream that
 *    refers further back (any larger window may) is unreadable by qemu-img and QEMU.
 *    Two deflate implementations, chosen by the `compress-zlib` mount option (DeflateChoice):
 *     - 'fast' (the default): node:zlib, which is Chromium's fork of zlib. Per core it deflates
 *       1.5x to 1.8x as fast as the system zlib (measured on 64 KiB clusters: 34.8 against
 *       19.3 MB/s on the benchmark's data, 50.9 against 33.0 on C headers, 34.7 against 19.6
 *       on programs), and its streams are slightly longer: +1.0% on the benchmark's data
 *       (machine code and random bytes), +0.2% on text, +2.3% to +3.0% on programs alone;
 *       no level or memLevel closes that gap.
 *     - 'qemu': the system zlib (libz.so.1) QEMU links, through the qemu_deflate addon
 *       (native/qemu_deflate.c; `make build`): byte for byte the streams of qemu-img convert
 *       -c, for images exactly as small as its. Refused when the addon or libz.so.1 is missing.
 *    The default is speed: a compressed copy is bound by deflate, and 1% on typical data is a
 *    small price for copying 1.5x to 1.8x as fast.
 *  - zstd (compression type 1): one zstd frame per cluster at zstd's default level (3), as
 *    QEMU writes them. Node 20's zlib has no zstd. The encoder is the system libzstd
 *    (libzstd.so.1, the one QEMU links) through the qemu_zstd addon (native/qemu_zstd.c; `make
 *    build`), called as QEMU calls it (one ZSTD_compressStream2(ZSTD_e_end) into cluster size -
 *    1 bytes): the very frames qemu-img convert -c -o compression_type=zstd writes, at about
 *    twice the speed of the fallback. Where the addon is not built or libzstd.so.1 does not load,
 *    @bokuweb/zstd-wasm: zstd compiled to WebAssembly and shipped inside its npm package, so
 *    it needs no compiler and no download outside npm (the npm native bindings, zstd-napi and
 *    @mongodb-js/zstd, fetch prebuilt binaries from GitHub at install time, or build zstd with
 *    a compiler when that fails); its frames decode the same but are not byte for byte QEMU's
 *    (another zstd build), and its sizes differ by a few hundredths of a percent.
 *  - Both run in a pool of worker threads, one per core (worker-pool.ts says why zlib too).
 *  - "Does not shrink": QEMU gives the encoder an output buffer of cluster size - 1 bytes and
 *    stores the cluster uncompressed when the stream does not fit. So a result of cluster size
 *    bytes or more is `undefined` here, and the caller writes a normal cluster (CW-4).
 *  - Results come back in any order; the caller keeps allocation in its own order (CW-10).
 */
import { createRequire } from 'node:module'
import { availableParallelism } from 'node:os'
import * as path from 'node:path'
import { fileURLToPath } from 'node:url'
import * as zlib from 'node:zlib'
import { COMPRESSION_TYPE_ZLIB, COMPRESSION_TYPE_ZSTD } from '../../format/constants.js'
import { UnsupportedFeatureError } from '../../errors.js'
import { log } from '../../log.js'
import { CompressionPool } from './worker-pool.js'

/** QEMU's deflateInit2 arguments for compressed clusters: window bits (-12: raw, 4 KiB window). */
export const QEMU_DEFLATE_WINDOW_BITS = 12
/** QEMU's deflateInit2 memLevel for compressed clusters. */
export const QEMU_DEFLATE_MEM_LEVEL = 9
/** QEMU compresses zstd clusters at zstd's default level (ZSTD_CLEVEL_DEFAULT). */
export const QEMU_ZSTD_LEVEL = 3

/** Compresses one cluster at a time; several calls may be in flight. */
export interface ClusterCompressor {
  /** The compressed stream of `cluster`, or undefined when it is not shorter than the cluster. */
  compress(cluster: Uint8Array): Promise<Uint8Array | undefined>
  /** Stops the worker threads, if any (pending calls reject). */
  close(): Promise<void>
}

const DEFLATE_OPTIONS: zlib.ZlibOptions = {
  level: zlib.constants.Z_DEFAULT_COMPRESSION,
  windowBits: QEMU_DEFLATE_WINDOW_BITS,
  memLevel: QEMU_DEFLATE_MEM_LEVEL,
  strategy: zlib.constants.Z_DEFAULT_STRATEGY,
}

/** The qemu_deflate addon's calls (native/qemu_deflate.c). */
interface QemuDeflateAddon {
  deflate(input: Uint8Array, outputLimit: number, level: number, windowBits: number, memLevel: number, strategy: number): Uint8Array | undefined
  version(): string | undefined
}

/** An addon that was loaded: its file (for the worker threads) and its calls. */
interface LoadedAddon<Calls> {
  path: string
  calls: Calls
}

/** What loadAddon needs to know about one addon, and what it logs. */
interface AddonSpec {
  /** The file name in build/Release, without '.node'. */
  name: string
  /** The system library the addon dlopens, for the error when its version() is undefined. */
  library: string
  /** The log line's prefix: 'deflate' or 'zstd'. */
  codec: string
  /** What is used when the addon is: 'the system zlib'. */
  native: string
  /** What is used when it is not: 'node:zlib'. */
  fallback: string
}

/**
 * The addon `spec.name`, from build/Release of the package root (the repository, both for these
 * sources and for dist/), when it is built and its version() answers (the system library it
 * opens loads); null otherwise. Logs which implementation the codec uses.
 */
function loadAddon<Calls extends { version(): string | undefined }>(spec: AddonSpec): LoadedAddon<Calls> | null {
  const lib = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..')
  const root = path.basename(path.dirname(lib)) === 'dist' ? path.dirname(path.dirname(lib)) : path.dirname(lib)
  const file = path.join(root, 'build', 'Release', `${spec.name}.node`)
  try {
    const calls = createRequire(import.meta.url)(file) as Calls
    const version = calls.version()
    if (version === undefined) throw new Error(`${spec.library} cannot be loaded`)
    log.compress('%s: %s %s (%s)', spec.codec, spec.native, version, file)
    return { path: file, calls }
  } catch (err) {
    log.compress('%s: %s (the %s addon is not usable: %s)', spec.codec, spec.fallback, spec.name, (err as Error).message)
    return null
  }
}

let addon: LoadedAddon<QemuDeflateAddon> | null | undefined

/** The qemu_deflate addon when it is built and the system zlib loads; null otherwise. */
function qemuDeflate(): LoadedAddon<QemuDeflateAddon> | null {
  if (addon === undefined) {
    addon = loadAddon({ name: 'qemu_deflate', library: 'libz.so.1', codec: 'deflate', native: 'the system zlib', fallback: 'node:zlib' })
  }
  return addon
}

/**
 * Which deflate implementation compressed writes use (the `compress-zlib` mount option):
 * 'fast' node:zlib, 'qemu' the system zlib QEMU links (byte-identical streams).
 */
export type DeflateChoice = 'fast' | 'qemu'
export const DEFAULT_DEFLATE: DeflateChoice = 'fast'

/**
 * What `choice` deflates with: 'system zlib 1.2.13' or 'node:zlib'. Throws
 * UnsupportedFeatureError for 'qemu' when the addon or the system zlib is missing.
 */
export function deflateImplementation(choice: DeflateChoice = DEFAULT_DEFLATE): string {
  if (choice === 'fast') return 'node:zlib'
  const found = qemuDeflate()
  if (!found) {
    throw new UnsupportedFeatureError(`compress-zlib=qemu needs the system zlib (libz.so.1) and the qemu_deflate addon, built by 'make build'`)
  }
  return `system zlib ${found.calls.version()}`
}

/**
 * Raw deflate, 4 KiB window, as the workers make it with `choice`; undefined when the stream
 * would not be shorter than the input (synchronous; for tests and tools).
 */
export function deflateClusterSync(cluster: Uint8Array, choice: DeflateChoice = DEFAULT_DEFLATE): Uint8Array | undefined {
  deflateImplementation(choice)
  const found = choice === 'qemu' ? qemuDeflate() : null
  const o = DEFLATE_OPTIONS as Required<Pick<zlib.ZlibOptions, 'level' | 'windowBits' | 'memLevel' | 'strategy'>>
  const out = found
    ? found.calls.deflate(cluster, cluster.length - 1, o.level, -o.windowBits, o.memLevel, o.strategy)
    : zlib.deflateRawSync(cluster, { ...DEFLATE_OPTIONS, chunkSize: Math.max(cluster.length, 64) })
  return out !== undefined && out.length < cluster.length ? out : undefined
}

class PoolCompressor implements ClusterCompressor {
  #pool: CompressionPool

  constructor(pool: CompressionPool) {
    this.#pool = pool
  }

  compress(cluster: Uint8Array): Promise<Uint8Array | undefined> {
    // The pool answers undefined for a stream not shorter than the cluster.
    return this.#pool.compress(cluster)
  }

  close(): Promise<void> {
    return this.#pool.close()
  }
}

/** The qemu_zstd addon's calls (native/qemu_zstd.c). */
interface QemuZstdAddon {
  compress(input: Uint8Array, outputLimit: number, level: number): Uint8Array | undefined
  version(): string | undefined
}

let zstdAddon: LoadedAddon<QemuZstdAddon> | null | undefined

/** The qemu_zstd addon when it is built and the system libzstd loads; null otherwise. */
function qemuZstd(): LoadedAddon<QemuZstdAddon> | null {
  if (zstdAddon === undefined) {
    zstdAddon = loadAddon({ name: 'qemu_zstd', library: 'libzstd.so.1', codec: 'zstd', native: 'the system libzstd', fallback: '@bokuweb/zstd-wasm' })
  }
  return zstdAddon
}

/** Which zstd compressed writes use: 'system libzstd 1.5.4' or '@bokuweb/zstd-wasm'. */
export function zstdImplementation(): string {
  const found = qemuZstd()
  return found ? `system libzstd ${found.calls.version()}` : '@bokuweb/zstd-wasm'
}

/**
 * The zstd frame of `cluster` as the workers make it through the system libzstd (QEMU's frame);
 * undefined when it would not be shorter than the cluster (synchronous; for tests and tools).
 * Throws UnsupportedFeatureError when the qemu_zstd addon is not usable.
 */
export function zstdClusterSync(cluster: Uint8Array): Uint8Array | undefined {
  const found = qemuZstd()
  if (!found) throw new UnsupportedFeatureError(`zstd through the system libzstd needs libzstd.so.1 and the qemu_zstd addon, built by 'make build'`)
  return found.calls.compress(cluster, cluster.length - 1, QEMU_ZSTD_LEVEL)
}

/**
 * The zstd compressor on `threads` worker threads: the system libzstd when the qemu_zstd addon
 * is usable, unless `native` is false; otherwise (and for tests of the fallback)
 * @bokuweb/zstd-wasm.
 */
export function makeZstdCompressor(threads: number = availableParallelism(), native = true): ClusterCompressor {
  const addonPath = native ? qemuZstd()?.path : undefined
  const codec = { codec: 'zstd' as const, zstdLevel: QEMU_ZSTD_LEVEL }
  return new PoolCompressor(new CompressionPool(Math.max(1, threads), addonPath ? { ...codec, addonPath } : codec))
}

/**
 * The compressor for an image's compression_type, on `threads` worker threads; zlib with the
 * `deflate` implementation.
 */
export function makeCompressor(
  compressionType: number,
  threads: number = availableParallelism(),
  deflate: DeflateChoice = DEFAULT_DEFLATE,
): ClusterCompressor {
  const workers = Math.max(1, threads)
  if (compressionType === COMPRESSION_TYPE_ZLIB) {
    deflateImplementation(deflate)
    const addonPath = deflate === 'qemu' ? qemuDeflate()?.path : undefined
    const deflateOptions = DEFLATE_OPTIONS as Record<string, number>
    return new PoolCompressor(new CompressionPool(workers, addonPath ? { codec: 'zlib', deflateOptions, addonPath } : { codec: 'zlib', deflateOptions }))
  }
  if (compressionType === COMPRESSION_TYPE_ZSTD) return makeZstdCompressor(workers)
  throw new UnsupportedFeatureError(`compression type ${compressionType} is not supported for writing`)
}

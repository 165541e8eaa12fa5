/*
 * Raw deflate through the system's zlib, the one QEMU links: byte for byte the streams
 * `qemu-img convert -c` writes (docs/COMPRESSION.md, "Sizes").
 *
 * Why an addon: Node bundles Chromium's fork of zlib, and with QEMU's parameters (level
 * Z_DEFAULT_COMPRESSION, raw, window bits 12, memLevel 9) its streams come out about 2.5%
 * longer than those of the system zlib (measured on programs from /usr/bin). Node's process
 * exports its own zlib's symbols, so linking -lz would bind to those; libz.so.1 is therefore
 * opened with dlopen(RTLD_LOCAL | RTLD_DEEPBIND) and called through dlsym'd pointers.
 *
 * One synchronous call (the compression worker threads call it, lib/engine/compress/
 * worker-pool.ts): deflate(input, outputLimit, level, windowBits, memLevel, strategy) returns
 * a Buffer with the stream, or undefined when it does not fit in outputLimit bytes (QEMU's
 * "could not compress"), like one deflate(Z_FINISH) call into a buffer of that size.
 * version() returns the system zlib's version, or undefined when libz.so.1 cannot be loaded
 * (the caller then uses node:zlib). The N-API parts it shares with qemu_zstd.c (arguments,
 * the result Buffer, undefined) are in napi_cluster.h.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <node_api.h>
#include <stdlib.h>
#include <string.h>

#include "napi_cluster.h"

/* zlib's z_stream, field for field (its layout has not changed since zlib 1.0). */
typedef struct {
  const unsigned char *next_in;
  unsigned avail_in;
  unsigned long total_in;
  unsigned char *next_out;
  unsigned avail_out;
  unsigned long total_out;
  const char *msg;
  void *state;
  void *zalloc;
  void *zfree;
  void *opaque;
  int data_type;
  unsigned long adler;
  unsigned long reserved;
} zstream;

/* zlib constants (zlib.h). */
#define Z_DEFLATED 8
#define Z_FINISH 4
#define Z_STREAM_END 1

typedef int (*init2_fn)(zstream *, int, int, int, int, int, const char *, int);
typedef int (*deflate_fn)(zstream *, int);
typedef int (*end_fn)(zstream *);
typedef const char *(*version_fn)(void);

static init2_fn z_init2;
static deflate_fn z_deflate;
static end_fn z_end;
static version_fn z_version;

static int load_zlib(void) {
  if (z_init2) return 1;
  void *lib = dlopen("libz.so.1", RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND);
  if (!lib) return 0;
  version_fn version = (version_fn)dlsym(lib, "zlibVersion");
  deflate_fn deflate = (deflate_fn)dlsym(lib, "deflate");
  end_fn end = (end_fn)dlsym(lib, "deflateEnd");
  init2_fn init2 = (init2_fn)dlsym(lib, "deflateInit2_");
  if (!version || !deflate || !end || !init2) return 0;
  z_version = version;
  z_deflate = deflate;
  z_end = end;
  z_init2 = init2;
  return 1;
}

static napi_value version_call(napi_env env, napi_callback_info info) {
  (void)info;
  return cluster_version(env, load_zlib() ? z_version() : NULL);
}

static napi_value deflate_call(napi_env env, napi_callback_info info) {
  const void *input;
  size_t length;
  int32_t ints[5];
  if (!cluster_args(env, info, "deflate(input, outputLimit, level, windowBits, memLevel, strategy)", 5, &input, &length, ints)) {
    return NULL;
  }
  int32_t limit = ints[0], level = ints[1], window_bits = ints[2], mem_level = ints[3], strategy = ints[4];
  if (!load_zlib()) {
    napi_throw_error(env, NULL, "libz.so.1 cannot be loaded");
    return NULL;
  }
  if (limit <= 0) return cluster_undefined(env);
  unsigned char *out = malloc((size_t)limit);
  if (!out) {
    napi_throw_error(env, NULL, "out of memory");
    return NULL;
  }
  zstream stream;
  memset(&stream, 0, sizeof stream);
  if (z_init2(&stream, level, Z_DEFLATED, window_bits, mem_level, strategy, z_version(), (int)sizeof stream) != 0) {
    free(out);
    napi_throw_error(env, NULL, "deflateInit2 failed");
    return NULL;
  }
  stream.next_in = input;
  stream.avail_in = (unsigned)length;
  stream.next_out = out;
  stream.avail_out = (unsigned)limit;
  int status = z_deflate(&stream, Z_FINISH);
  size_t produced = (size_t)limit - stream.avail_out;
  z_end(&stream);
  napi_value result = status == Z_STREAM_END ? cluster_result(env, out, produced) : cluster_undefined(env);
  free(out);
  return result;
}

NAPI_MODULE_INIT() {
  cluster_export(env, exports, "deflate", deflate_call);
  cluster_export(env, exports, "version", version_call);
  return exports;
}

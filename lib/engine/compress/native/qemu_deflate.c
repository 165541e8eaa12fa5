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
 * (the caller then uses node:zlib).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <node_api.h>
#include <stdlib.h>
#include <string.h>

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

static napi_value undefined_value(napi_env env) {
  napi_value out;
  napi_get_undefined(env, &out);
  return out;
}

static napi_value version_call(napi_env env, napi_callback_info info) {
  (void)info;
  if (!load_zlib()) return undefined_value(env);
  napi_value out;
  napi_create_string_utf8(env, z_version(), NAPI_AUTO_LENGTH, &out);
  return out;
}

static napi_value deflate_call(napi_env env, napi_callback_info info) {
  size_t argc = 6;
  napi_value argv[6];
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 6) {
    napi_throw_type_error(env, NULL, "deflate(input, outputLimit, level, windowBits, memLevel, strategy)");
    return NULL;
  }
  if (!load_zlib()) {
    napi_throw_error(env, NULL, "libz.so.1 cannot be loaded");
    return NULL;
  }
  napi_typedarray_type type;
  size_t length;
  void *input;
  if (napi_get_typedarray_info(env, argv[0], &type, &length, &input, NULL, NULL) != napi_ok || type != napi_uint8_array) {
    napi_throw_type_error(env, NULL, "input must be a Uint8Array");
    return NULL;
  }
  int32_t limit, level, window_bits, mem_level, strategy;
  napi_get_value_int32(env, argv[1], &limit);
  napi_get_value_int32(env, argv[2], &level);
  napi_get_value_int32(env, argv[3], &window_bits);
  napi_get_value_int32(env, argv[4], &mem_level);
  napi_get_value_int32(env, argv[5], &strategy);
  if (limit <= 0) return undefined_value(env);
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
  napi_value result = undefined_value(env);
  if (status == Z_STREAM_END) napi_create_buffer_copy(env, produced, out, NULL, &result);
  free(out);
  return result;
}

NAPI_MODULE_INIT() {
  napi_value fn;
  napi_create_function(env, "deflate", NAPI_AUTO_LENGTH, deflate_call, NULL, &fn);
  napi_set_named_property(env, exports, "deflate", fn);
  napi_create_function(env, "version", NAPI_AUTO_LENGTH, version_call, NULL, &fn);
  napi_set_named_property(env, exports, "version", fn);
  return exports;
}

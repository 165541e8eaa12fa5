/*
 * zstd frames for compressed clusters through the system's libzstd, the one QEMU links: the
 * frames `qemu-img convert -c -o compression_type=zstd` writes (docs/COMPRESSION.md, "Codecs").
 *
 * Why an addon: Node 20 has no zstd, and zstd compiled to WebAssembly (@bokuweb/zstd-wasm, the
 * fallback) takes about twice the CPU of the native library per cluster, and its frames are not
 * QEMU's bytes. libzstd.so.1 is
 * opened with dlopen(RTLD_LOCAL | RTLD_DEEPBIND), like libz.so.1 in qemu_deflate.c, so that no
 * symbol of the Node process (later Node versions bundle a zstd of their own) is bound instead,
 * and its functions are called through dlsym'd pointers with prototypes declared here (the
 * stable API of zstd 1.4.0 and later; no zstd.h is needed to build).
 *
 * How QEMU makes a cluster's frame: a fresh compression context with every parameter at its
 * default (level 3, content size in the frame header, no checksum, no dictionary ID), one
 * ZSTD_compressStream2(ZSTD_e_end) call with the whole cluster as input and an output buffer of
 * cluster size - 1 bytes. A call that returns 0 has written the whole frame; anything else (the
 * frame does not fit, or an error) makes QEMU store the cluster uncompressed. The first call of
 * a frame with ZSTD_e_end tells zstd the input size, so the frame header carries the content
 * size and the parameters are those zstd picks for that size.
 *
 * Here the same call, with the level passed in (QEMU's is zstd's default, 3): compress(input,
 * outputLimit, level) returns a Buffer with the frame, or undefined when the call does not
 * return 0 with outputLimit bytes of room. One compression context per JavaScript environment
 * (the main thread and each worker thread have their own, as instance data freed with the
 * environment), reset with its parameters before every frame: a reused context makes the same
 * frames as a fresh one, without allocating its tables for every cluster. The output buffer is
 * kept with it. version() returns libzstd's version, or undefined when libzstd.so.1 cannot be
 * loaded (the caller then uses the WebAssembly build). The N-API parts it shares with
 * qemu_deflate.c (arguments, the result Buffer, undefined) are in napi_cluster.h.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <node_api.h>
#include <pthread.h>
#include <stdlib.h>

#include "napi_cluster.h"

/* zstd's stream buffers (zstd.h), field for field. */
typedef struct {
  const void *src;
  size_t size;
  size_t pos;
} zstd_in;

typedef struct {
  void *dst;
  size_t size;
  size_t pos;
} zstd_out;

/* zstd constants (zstd.h): ZSTD_e_end, ZSTD_reset_session_and_parameters, ZSTD_c_compressionLevel. */
#define ZSTD_E_END 2
#define ZSTD_RESET_SESSION_AND_PARAMETERS 3
#define ZSTD_C_COMPRESSION_LEVEL 100

typedef void *(*create_fn)(void);
typedef size_t (*free_fn)(void *);
typedef size_t (*reset_fn)(void *, int);
typedef size_t (*set_parameter_fn)(void *, int, int);
typedef size_t (*compress_stream2_fn)(void *, zstd_out *, zstd_in *, int);
typedef unsigned (*is_error_fn)(size_t);
typedef const char *(*error_name_fn)(size_t);
typedef const char *(*version_fn)(void);

static struct {
  create_fn create;
  free_fn free;
  reset_fn reset;
  set_parameter_fn set_parameter;
  compress_stream2_fn compress_stream2;
  is_error_fn is_error;
  error_name_fn error_name;
  version_fn version;
  int loaded;
} zstd;

static pthread_once_t zstd_once = PTHREAD_ONCE_INIT;

/* Once per process (worker threads load the addon too). */
static void load_once(void) {
  void *lib = dlopen("libzstd.so.1", RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND);
  if (!lib) return;
  zstd.create = (create_fn)dlsym(lib, "ZSTD_createCCtx");
  zstd.free = (free_fn)dlsym(lib, "ZSTD_freeCCtx");
  zstd.reset = (reset_fn)dlsym(lib, "ZSTD_CCtx_reset");
  zstd.set_parameter = (set_parameter_fn)dlsym(lib, "ZSTD_CCtx_setParameter");
  zstd.compress_stream2 = (compress_stream2_fn)dlsym(lib, "ZSTD_compressStream2");
  zstd.is_error = (is_error_fn)dlsym(lib, "ZSTD_isError");
  zstd.error_name = (error_name_fn)dlsym(lib, "ZSTD_getErrorName");
  zstd.version = (version_fn)dlsym(lib, "ZSTD_versionString");
  zstd.loaded = zstd.create && zstd.free && zstd.reset && zstd.set_parameter && zstd.compress_stream2 &&
                zstd.is_error && zstd.error_name && zstd.version;
}

static int load_zstd(void) {
  pthread_once(&zstd_once, load_once);
  return zstd.loaded;
}

/* What one environment (thread) keeps between calls. */
typedef struct {
  void *cctx;
  unsigned char *out;
  size_t out_size;
} env_state;

static void free_state(napi_env env, void *data, void *hint) {
  (void)env;
  (void)hint;
  env_state *state = data;
  if (state->cctx) zstd.free(state->cctx);
  free(state->out);
  free(state);
}

static napi_value version_call(napi_env env, napi_callback_info info) {
  (void)info;
  return cluster_version(env, load_zstd() ? zstd.version() : NULL);
}

/* This environment's context and an output buffer of at least `limit` bytes; NULL (thrown) if not. */
static env_state *state_for(napi_env env, size_t limit) {
  env_state *state = NULL;
  napi_get_instance_data(env, (void **)&state);
  if (!state) {
    state = calloc(1, sizeof *state);
    if (!state || !(state->cctx = zstd.create())) {
      free(state);
      napi_throw_error(env, NULL, "ZSTD_createCCtx failed");
      return NULL;
    }
    if (napi_set_instance_data(env, state, free_state, NULL) != napi_ok) {
      zstd.free(state->cctx);
      free(state);
      napi_throw_error(env, NULL, "cannot keep the zstd context");
      return NULL;
    }
  }
  if (state->out_size < limit) {
    unsigned char *out = realloc(state->out, limit);
    if (!out) {
      napi_throw_error(env, NULL, "out of memory");
      return NULL;
    }
    state->out = out;
    state->out_size = limit;
  }
  return state;
}

static napi_value compress_call(napi_env env, napi_callback_info info) {
  const void *input;
  size_t length;
  int32_t ints[2];
  if (!cluster_args(env, info, "compress(input, outputLimit, level)", 2, &input, &length, ints)) return NULL;
  int32_t limit = ints[0], level = ints[1];
  if (!load_zstd()) {
    napi_throw_error(env, NULL, "libzstd.so.1 cannot be loaded");
    return NULL;
  }
  if (limit <= 0) return cluster_undefined(env);
  env_state *state = state_for(env, (size_t)limit);
  if (!state) return NULL;
  size_t status = zstd.reset(state->cctx, ZSTD_RESET_SESSION_AND_PARAMETERS);
  if (!zstd.is_error(status)) status = zstd.set_parameter(state->cctx, ZSTD_C_COMPRESSION_LEVEL, level);
  if (zstd.is_error(status)) {
    napi_throw_error(env, NULL, zstd.error_name(status));
    return NULL;
  }
  zstd_in in = {input, length, 0};
  zstd_out out = {state->out, (size_t)limit, 0};
  /* 0: the frame is complete. More: it does not fit (or an error); QEMU stores such a cluster
   * uncompressed, and so does the caller. The next call resets the context. */
  if (zstd.compress_stream2(state->cctx, &out, &in, ZSTD_E_END) != 0) return cluster_undefined(env);
  return cluster_result(env, state->out, out.pos);
}

NAPI_MODULE_INIT() {
  cluster_export(env, exports, "compress", compress_call);
  cluster_export(env, exports, "version", version_call);
  return exports;
}

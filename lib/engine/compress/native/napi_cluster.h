/*
 * The N-API parts the two cluster compression addons share (qemu_deflate.c, qemu_zstd.c): both
 * export a call that compresses one cluster, name(input, outputLimit, ...) with the cluster in a
 * Uint8Array and whole numbers after it, which returns a Buffer with the stream or undefined
 * when it does not fit in outputLimit bytes; and version(), the system library's version or
 * undefined when it cannot be loaded. Static inline functions only: each addon includes this
 * header and gets its own copy.
 */
#ifndef QCOW2FS_NAPI_CLUSTER_H
#define QCOW2FS_NAPI_CLUSTER_H

#include <node_api.h>
#include <stddef.h>
#include <stdint.h>

/* The most whole numbers a cluster call takes after its input (deflate's five). */
#define CLUSTER_MAX_INTS 5

/* undefined: what a cluster call returns when the stream does not fit (QEMU then stores the
 * cluster uncompressed), and version() when the library cannot be loaded. */
static inline napi_value cluster_undefined(napi_env env) {
  napi_value out;
  napi_get_undefined(env, &out);
  return out;
}

/* version(): `version` as a string, or undefined when it is NULL (the library did not load). */
static inline napi_value cluster_version(napi_env env, const char *version) {
  if (!version) return cluster_undefined(env);
  napi_value out;
  if (napi_create_string_utf8(env, version, NAPI_AUTO_LENGTH, &out) != napi_ok) return NULL;
  return out;
}

/*
 * The arguments of a cluster call: a Uint8Array (its bytes in *input and *length), then
 * `int_count` whole numbers (into ints[0..int_count-1]; ints[0] is outputLimit). Returns 1; or
 * 0 with a TypeError thrown (`usage` when arguments are missing).
 */
static inline int cluster_args(napi_env env, napi_callback_info info, const char *usage, size_t int_count,
                               const void **input, size_t *length, int32_t *ints) {
  napi_value argv[1 + CLUSTER_MAX_INTS];
  size_t argc = 1 + int_count;
  if (int_count > CLUSTER_MAX_INTS || napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok ||
      argc < 1 + int_count) {
    napi_throw_type_error(env, NULL, usage);
    return 0;
  }
  napi_typedarray_type type;
  void *data;
  if (napi_get_typedarray_info(env, argv[0], &type, length, &data, NULL, NULL) != napi_ok || type != napi_uint8_array) {
    napi_throw_type_error(env, NULL, "input must be a Uint8Array");
    return 0;
  }
  *input = data;
  for (size_t i = 0; i < int_count; i++) {
    if (napi_get_value_int32(env, argv[1 + i], &ints[i]) != napi_ok) {
      napi_throw_type_error(env, NULL, "the arguments after input must be numbers");
      return 0;
    }
  }
  return 1;
}

/* A Buffer with a copy of the `length` bytes at `data`; NULL (an exception pending) if not. */
static inline napi_value cluster_result(napi_env env, const void *data, size_t length) {
  napi_value result;
  if (napi_create_buffer_copy(env, length, data, NULL, &result) != napi_ok) return NULL;
  return result;
}

/* exports[name] = a function that runs `call`. */
static inline void cluster_export(napi_env env, napi_value exports, const char *name, napi_callback call) {
  napi_value fn;
  napi_create_function(env, name, NAPI_AUTO_LENGTH, call, NULL, &fn);
  napi_set_named_property(env, exports, name, fn);
}

#endif

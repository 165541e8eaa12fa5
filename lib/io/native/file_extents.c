/*
 * file_extents: where a file holds data and where it has holes, for lib/io/block-file.ts.
 *
 * Why an addon: Node has no lseek(). `qcow2fs map` reports holes of raw files (and of data
 * clusters of images with preallocated metadata) the way `qemu-img map` does, and QEMU finds
 * them with lseek(SEEK_DATA) and lseek(SEEK_HOLE); reading the bytes cannot tell a hole from
 * written zeros.
 *
 * One call:
 *   seek(fd, offset, wantHole)  lseek(fd, offset, wantHole ? SEEK_HOLE : SEEK_DATA): the offset
 *                               found (>= 0), or minus the errno value (ENXIO: no data at or
 *                               after offset; EINVAL or ENOTSUP where the file system cannot
 *                               tell). Never throws for a failed lseek.
 * The file position of `fd` moves; the callers use positioned reads and writes only.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <unistd.h>
#include <node_api.h>

#if !defined(SEEK_DATA) || !defined(SEEK_HOLE)
#define SEEK_DATA 3
#define SEEK_HOLE 4
#define HAVE_SEEK_HOLE 0
#else
#define HAVE_SEEK_HOLE 1
#endif

static napi_value seek(napi_env env, napi_callback_info info)
{
    size_t argc = 3;
    napi_value argv[3];
    int32_t fd;
    int64_t offset;
    bool want_hole;
    off_t found;
    napi_value out;

    if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok)
        return NULL;
    if (argc != 3 || napi_get_value_int32(env, argv[0], &fd) != napi_ok ||
        napi_get_value_int64(env, argv[1], &offset) != napi_ok ||
        napi_get_value_bool(env, argv[2], &want_hole) != napi_ok || fd < 0 || offset < 0) {
        napi_throw_type_error(env, NULL, "expected (fd, offset, wantHole)");
        return NULL;
    }
#if HAVE_SEEK_HOLE
    found = lseek(fd, (off_t)offset, want_hole ? SEEK_HOLE : SEEK_DATA);
    if (found < 0)
        found = -(off_t)errno;
#else
    (void)want_hole;
    found = -(off_t)ENOTSUP;
#endif
    napi_create_int64(env, (int64_t)found, &out);
    return out;
}

static napi_value init(napi_env env, napi_value exports)
{
    napi_value fn;

    if (napi_create_function(env, "seek", NAPI_AUTO_LENGTH, seek, NULL, &fn) != napi_ok ||
        napi_set_named_property(env, exports, "seek", fn) != napi_ok)
        return NULL;
    return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)

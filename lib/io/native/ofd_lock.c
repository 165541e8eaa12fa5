/*
 * ofd_lock: single-byte open file description locks for lib/io/image-lock.ts.
 *
 * Why an addon: Node has no fcntl(), and the npm packages that lock files offer flock() or
 * process-associated F_SETLK locks only. QEMU locks images with OFD locks (F_OFD_SETLK), and
 * the two kinds differ where it matters: a process-associated lock belongs to the process, so
 * two opens of one image in one process never conflict, and closing any descriptor of the file
 * drops every lock the process holds on it. OFD locks belong to one open() and conflict with
 * every other open() of the file, in this process or another, as QEMU's do.
 *
 * Two calls, each on one byte at `offset` of the file open as `fd`, each returning 0 or an
 * errno value (never throwing for a failed fcntl):
 *   lockByte(fd, offset)   takes a shared (read) lock; EAGAIN/EACCES: another open holds an
 *                          exclusive lock there
 *   testByte(fd, offset)   0 when this open could take an exclusive lock on the byte, EAGAIN
 *                          when another open holds any lock on it
 * ENOSYS where the system has no OFD locks. There is no unlock: closing the descriptor (the
 * last one of its open file description) releases every lock it holds.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <node_api.h>

/* Where the system has no OFD locks, every call answers ENOSYS. */
#ifdef F_OFD_SETLK
#define HAVE_OFD_LOCKS 1
#else
#define HAVE_OFD_LOCKS 0
#define F_OFD_SETLK 0
#define F_OFD_GETLK 0
#endif

/* One fcntl on one byte; `found` receives the l_type F_OFD_GETLK answers. */
static int byte_lock(int cmd, int fd, int64_t offset, short type, short *found)
{
#if HAVE_OFD_LOCKS
    struct flock fl;
    int ret;

    memset(&fl, 0, sizeof(fl));
    fl.l_whence = SEEK_SET;
    fl.l_start = offset;
    fl.l_len = 1;
    fl.l_type = type;
    do {
        ret = fcntl(fd, cmd, &fl);
    } while (ret == -1 && errno == EINTR);
    if (ret == -1)
        return errno;
    if (found)
        *found = fl.l_type;
    return 0;
#else
    (void)cmd; (void)fd; (void)offset; (void)type; (void)found;
    return ENOSYS;
#endif
}

/* Reads (fd, offset) from the call; false (with a pending JS exception) when they are wrong. */
static bool fd_and_offset(napi_env env, napi_callback_info info, int32_t *fd, int64_t *offset)
{
    size_t argc = 2;
    napi_value argv[2];

    if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok)
        return false;
    if (argc != 2 || napi_get_value_int32(env, argv[0], fd) != napi_ok ||
        napi_get_value_int64(env, argv[1], offset) != napi_ok || *fd < 0 || *offset < 0) {
        napi_throw_type_error(env, NULL, "expected (fd, offset): two non-negative integers");
        return false;
    }
    return true;
}

static napi_value number(napi_env env, int value)
{
    napi_value out;
    napi_create_int32(env, value, &out);
    return out;
}

static napi_value lock_byte(napi_env env, napi_callback_info info)
{
    int32_t fd;
    int64_t offset;

    if (!fd_and_offset(env, info, &fd, &offset))
        return NULL;
    return number(env, byte_lock(F_OFD_SETLK, fd, offset, F_RDLCK, NULL));
}

static napi_value test_byte(napi_env env, napi_callback_info info)
{
    int32_t fd;
    int64_t offset;
    short found = F_UNLCK;
    int err;

    if (!fd_and_offset(env, info, &fd, &offset))
        return NULL;
    /* F_OFD_GETLK leaves l_type F_UNLCK when the lock could be taken. */
    err = byte_lock(F_OFD_GETLK, fd, offset, F_WRLCK, &found);
    if (err)
        return number(env, err);
    return number(env, found == F_UNLCK ? 0 : EAGAIN);
}

static napi_value init(napi_env env, napi_value exports)
{
    napi_property_descriptor props[] = {
        { "lockByte", NULL, lock_byte, NULL, NULL, NULL, napi_enumerable, NULL },
        { "testByte", NULL, test_byte, NULL, NULL, NULL, napi_enumerable, NULL },
    };

    if (napi_define_properties(env, exports, sizeof(props) / sizeof(props[0]), props) != napi_ok)
        return NULL;
    return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)

/*
 * file_writeback: starts the kernel's writeback of a range of a file without waiting for it,
 * for lib/io/writeback.ts.
 *
 * Why an addon: Node has no sync_file_range(). A long sequential write (dd conv=fsync, cp, a
 * compressed copy and its unmount) ends with an fdatasync that must then write everything the
 * page cache holds, after the copy, while the disk idled during it. sync_file_range with
 * SYNC_FILE_RANGE_WRITE starts writeback of a range that is already complete, so the disk
 * works while later data arrives and the final fdatasync has little left. It waits for
 * nothing, but it can block while the device queue is full, so it runs on libuv's thread pool
 * and never on the event loop that answers FUSE requests.
 *
 * Calls:
 *   start(fd, offset, length, done)  queues sync_file_range(fd, offset, length,
 *                                    SYNC_FILE_RANGE_WRITE) on the thread pool; done(errno) is
 *                                    called on the event loop afterwards (0: started). Throws
 *                                    only for bad arguments.
 *   waitIdle()                       blocks until no started call is still in its system call:
 *                                    a caller that closes `fd` waits first, so the call never
 *                                    runs on a descriptor that was closed (or reused).
 *   inFlight()                       how many calls are queued or running.
 *
 * Errors: a writeback error found here stays recorded in the file for the next fsync or
 * fdatasync of every descriptor (this call does not consume it), which is where the caller
 * learns of it; done(errno) is for logging.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <node_api.h>

typedef struct {
    napi_async_work work;
    napi_ref done;
    int fd;
    int64_t offset;
    int64_t length;
    int error;
} writeback_call;

/* Calls queued or in their system call (waitIdle waits for this to drop to 0). */
static pthread_mutex_t busy_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t busy_idle = PTHREAD_COND_INITIALIZER;
static int busy_calls;
/* Calls whose completion has not run yet (inFlight). */
static int pending_calls;

static void execute(napi_env env, void *data)
{
    writeback_call *call = data;
    (void)env;
    if (sync_file_range(call->fd, (off64_t)call->offset, (off64_t)call->length, SYNC_FILE_RANGE_WRITE) != 0)
        call->error = errno;
    pthread_mutex_lock(&busy_lock);
    if (--busy_calls == 0)
        pthread_cond_broadcast(&busy_idle);
    pthread_mutex_unlock(&busy_lock);
}

static void complete(napi_env env, napi_status status, void *data)
{
    writeback_call *call = data;
    napi_value done, global, code;
    pending_calls--;
    if (status == napi_cancelled) {
        /* Never ran: execute did not count it down. */
        pthread_mutex_lock(&busy_lock);
        if (--busy_calls == 0)
            pthread_cond_broadcast(&busy_idle);
        pthread_mutex_unlock(&busy_lock);
        call->error = ECANCELED;
    }
    if (napi_get_reference_value(env, call->done, &done) == napi_ok && napi_get_global(env, &global) == napi_ok &&
        napi_create_int32(env, call->error, &code) == napi_ok)
        napi_call_function(env, global, done, 1, &code, NULL);
    napi_delete_reference(env, call->done);
    napi_delete_async_work(env, call->work);
    free(call);
}

static napi_value start(napi_env env, napi_callback_info info)
{
    size_t argc = 4;
    napi_value argv[4], name;
    napi_valuetype done_type;
    int32_t fd;
    int64_t offset, length;
    writeback_call *call;

    if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok)
        return NULL;
    if (argc != 4 || napi_get_value_int32(env, argv[0], &fd) != napi_ok ||
        napi_get_value_int64(env, argv[1], &offset) != napi_ok ||
        napi_get_value_int64(env, argv[2], &length) != napi_ok || napi_typeof(env, argv[3], &done_type) != napi_ok ||
        done_type != napi_function || fd < 0 || offset < 0 || length < 0) {
        napi_throw_type_error(env, NULL, "expected (fd, offset, length, done)");
        return NULL;
    }
    call = calloc(1, sizeof(*call));
    if (call == NULL) {
        napi_throw_error(env, NULL, "out of memory");
        return NULL;
    }
    call->fd = fd;
    call->offset = offset;
    call->length = length;
    if (napi_create_reference(env, argv[3], 1, &call->done) != napi_ok ||
        napi_create_string_utf8(env, "qcow2fs:writeback", NAPI_AUTO_LENGTH, &name) != napi_ok ||
        napi_create_async_work(env, NULL, name, execute, complete, call, &call->work) != napi_ok) {
        free(call);
        napi_throw_error(env, NULL, "cannot queue the writeback call");
        return NULL;
    }
    pthread_mutex_lock(&busy_lock);
    busy_calls++;
    pthread_mutex_unlock(&busy_lock);
    pending_calls++;
    if (napi_queue_async_work(env, call->work) != napi_ok) {
        pthread_mutex_lock(&busy_lock);
        busy_calls--;
        pthread_mutex_unlock(&busy_lock);
        pending_calls--;
        napi_delete_reference(env, call->done);
        napi_delete_async_work(env, call->work);
        free(call);
        napi_throw_error(env, NULL, "cannot queue the writeback call");
    }
    return NULL;
}

static napi_value wait_idle(napi_env env, napi_callback_info info)
{
    (void)env;
    (void)info;
    pthread_mutex_lock(&busy_lock);
    while (busy_calls > 0)
        pthread_cond_wait(&busy_idle, &busy_lock);
    pthread_mutex_unlock(&busy_lock);
    return NULL;
}

static napi_value in_flight(napi_env env, napi_callback_info info)
{
    napi_value out;
    (void)info;
    napi_create_int32(env, pending_calls, &out);
    return out;
}

static napi_value init(napi_env env, napi_value exports)
{
    napi_property_descriptor calls[] = {
        {"start", NULL, start, NULL, NULL, NULL, napi_default_method, NULL},
        {"waitIdle", NULL, wait_idle, NULL, NULL, NULL, napi_default_method, NULL},
        {"inFlight", NULL, in_flight, NULL, NULL, NULL, napi_default_method, NULL},
    };
    if (napi_define_properties(env, exports, sizeof(calls) / sizeof(calls[0]), calls) != napi_ok)
        return NULL;
    return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)

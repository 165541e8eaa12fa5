/*
 * read_ahead: the reads of the read-ahead of lib/io/read-ahead.ts, on libuv's thread pool.
 *
 * Why an addon: the read-ahead reads the image file with O_DIRECT, so that the disk's DMA
 * lands in our buffer with no page cache work on either CPU and no read-ahead of the kernel's
 * on top of ours. Node cannot do two things that needs:
 *  - allocate memory aligned to the device's logical block size (an O_DIRECT read into other
 *    memory fails with EINVAL), or tell where a Buffer's memory lies;
 *  - tell whether the page cache already holds a range. O_DIRECT reads go to the disk even
 *    when the file is cached, which made reads of a cached image 40% slower than the plain
 *    reads of the engine; so the read-ahead leaves alone what the page cache holds. It asks
 *    with cachestat(2) (Linux 6.5), else with mincore(2) on a mapping of the range; neither
 *    reads anything. (preadv2 with RWF_NOWAIT is no such question: measured here, it starts
 *    the kernel's read-ahead, and the file was read twice.)
 *
 * Calls:
 *   alloc(bytes)       a Buffer of `bytes` bytes (1 byte to 1 GiB) whose memory starts at a
 *                      multiple of ALIGNMENT, freed when the Buffer is collected.
 *   cached(fd, offset, length)
 *                      whether the page cache holds every page of the file in [offset,
 *                      offset + length) (the part before the end of the file); false when
 *                      that cannot be told. Synchronous: one system call (three with mincore).
 *   read(fd, buffer, offset, done)
 *                      queues the read of buffer.length bytes at `offset` from fd (opened
 *                      with O_DIRECT; offset, length and buffer multiples of ALIGNMENT) on the
 *                      thread pool. done(errno, bytes) runs on the event loop afterwards: bytes
 *                      read (short only at the end of the file, or when an error stopped the
 *                      read after some bytes), or errno when it stopped before any. Throws
 *                      only for bad arguments. The caller keeps fd open until done has run.
 *   alignment          ALIGNMENT.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <node_api.h>

/* A page: a multiple of every logical block size Linux supports (512 to 4096 bytes). */
#define ALIGNMENT 4096
#define MAX_BYTES ((int64_t)1 << 30)

/* cachestat(2), Linux 6.5; glibc 2.36 has no wrapper. */
#ifndef __NR_cachestat
#define __NR_cachestat 451
#endif
struct cachestat_range {
    uint64_t off;
    uint64_t len;
};
struct cachestat {
    uint64_t nr_cache;
    uint64_t nr_dirty;
    uint64_t nr_writeback;
    uint64_t nr_evicted;
    uint64_t nr_recently_evicted;
};

typedef struct {
    napi_async_work work;
    napi_ref done;
    napi_ref buffer;
    int fd;
    uint8_t *data;
    size_t length;
    int64_t offset;
    size_t bytes;
    int error;
} read_call;

static void release(napi_env env, void *data, void *hint)
{
    (void)env;
    (void)hint;
    free(data);
}

static napi_value alloc(napi_env env, napi_callback_info info)
{
    size_t argc = 1;
    napi_value argv[1], out;
    int64_t bytes;
    void *memory;

    if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok)
        return NULL;
    if (argc != 1 || napi_get_value_int64(env, argv[0], &bytes) != napi_ok || bytes < 1 || bytes > MAX_BYTES) {
        napi_throw_range_error(env, NULL, "expected a size of 1 byte to 1 GiB");
        return NULL;
    }
    if (posix_memalign(&memory, ALIGNMENT, (size_t)bytes) != 0) {
        napi_throw_error(env, NULL, "out of memory");
        return NULL;
    }
    if (napi_create_external_buffer(env, (size_t)bytes, memory, release, NULL, &out) != napi_ok) {
        free(memory);
        napi_throw_error(env, NULL, "cannot wrap the memory in a Buffer");
        return NULL;
    }
    return out;
}

/* Whether the page cache holds every page of the file in [offset, offset + length). */
static int cached_whole(int fd, int64_t offset, size_t length)
{
    struct stat st;
    long page = sysconf(_SC_PAGESIZE);
    size_t pages, i;
    struct cachestat_range range;
    struct cachestat stat_out;
    unsigned char *resident;
    void *map;
    int whole;

    if (fstat(fd, &st) != 0 || offset >= st.st_size)
        return 0;
    if ((int64_t)length > st.st_size - offset)
        length = (size_t)(st.st_size - offset);
    pages = (length + (size_t)page - 1) / (size_t)page;
    range.off = (uint64_t)offset;
    range.len = length;
    if (syscall(__NR_cachestat, fd, &range, &stat_out, 0) == 0)
        return stat_out.nr_cache >= pages;
    if (errno != ENOSYS)
        return 0;
    map = mmap(NULL, length, PROT_READ, MAP_SHARED, fd, (off_t)offset);
    if (map == MAP_FAILED)
        return 0;
    resident = malloc(pages);
    whole = resident != NULL && mincore(map, length, resident) == 0;
    for (i = 0; whole && i < pages; i++)
        whole = resident[i] & 1;
    free(resident);
    munmap(map, length);
    return whole;
}

static napi_value cached(napi_env env, napi_callback_info info)
{
    size_t argc = 3;
    napi_value argv[3], out;
    int32_t fd;
    int64_t offset, length;

    if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok)
        return NULL;
    if (argc != 3 || napi_get_value_int32(env, argv[0], &fd) != napi_ok || napi_get_value_int64(env, argv[1], &offset) != napi_ok ||
        napi_get_value_int64(env, argv[2], &length) != napi_ok || fd < 0 || offset < 0 || length < 1 || length > MAX_BYTES) {
        napi_throw_type_error(env, NULL, "expected (fd, offset, length)");
        return NULL;
    }
    napi_get_boolean(env, cached_whole(fd, offset, (size_t)length), &out);
    return out;
}

static void execute(napi_env env, void *data)
{
    read_call *call = data;
    size_t done = 0;
    (void)env;
    while (done < call->length) {
        ssize_t n = pread(call->fd, call->data + done, call->length - done, (off_t)(call->offset + (int64_t)done));
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            if (done == 0)
                call->error = errno;
            break;
        }
        if (n == 0)
            break;
        done += (size_t)n;
    }
    call->bytes = done;
}

static void complete(napi_env env, napi_status status, void *data)
{
    read_call *call = data;
    napi_value done, global, argv[2];
    if (status == napi_cancelled)
        call->error = ECANCELED;
    if (napi_get_reference_value(env, call->done, &done) == napi_ok && napi_get_global(env, &global) == napi_ok &&
        napi_create_int32(env, call->error, &argv[0]) == napi_ok &&
        napi_create_int64(env, call->error != 0 ? 0 : (int64_t)call->bytes, &argv[1]) == napi_ok)
        napi_call_function(env, global, done, 2, argv, NULL);
    napi_delete_reference(env, call->done);
    napi_delete_reference(env, call->buffer);
    napi_delete_async_work(env, call->work);
    free(call);
}

static napi_value read_chunk(napi_env env, napi_callback_info info)
{
    size_t argc = 4, length;
    napi_value argv[4], name;
    napi_valuetype done_type;
    bool is_buffer;
    int32_t fd;
    int64_t offset;
    void *memory;
    read_call *call;

    if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok)
        return NULL;
    if (argc != 4 || napi_get_value_int32(env, argv[0], &fd) != napi_ok || napi_is_buffer(env, argv[1], &is_buffer) != napi_ok ||
        !is_buffer || napi_get_buffer_info(env, argv[1], &memory, &length) != napi_ok ||
        napi_get_value_int64(env, argv[2], &offset) != napi_ok || napi_typeof(env, argv[3], &done_type) != napi_ok ||
        done_type != napi_function || fd < 0 || offset < 0 || length == 0 || offset % ALIGNMENT != 0 ||
        length % ALIGNMENT != 0 || (uintptr_t)memory % ALIGNMENT != 0) {
        napi_throw_type_error(env, NULL, "expected (fd, aligned buffer, aligned offset, done)");
        return NULL;
    }
    call = calloc(1, sizeof(*call));
    if (call == NULL) {
        napi_throw_error(env, NULL, "out of memory");
        return NULL;
    }
    call->fd = fd;
    call->data = memory;
    call->length = length;
    call->offset = offset;
    /* The buffer stays referenced (alive) until the read has completed. */
    if (napi_create_reference(env, argv[3], 1, &call->done) != napi_ok) {
        free(call);
        napi_throw_error(env, NULL, "cannot queue the read");
        return NULL;
    }
    if (napi_create_reference(env, argv[1], 1, &call->buffer) != napi_ok ||
        napi_create_string_utf8(env, "qcow2fs:read-ahead", NAPI_AUTO_LENGTH, &name) != napi_ok ||
        napi_create_async_work(env, NULL, name, execute, complete, call, &call->work) != napi_ok ||
        napi_queue_async_work(env, call->work) != napi_ok) {
        napi_delete_reference(env, call->done);
        if (call->buffer != NULL)
            napi_delete_reference(env, call->buffer);
        if (call->work != NULL)
            napi_delete_async_work(env, call->work);
        free(call);
        napi_throw_error(env, NULL, "cannot queue the read");
    }
    return NULL;
}

static napi_value init(napi_env env, napi_value exports)
{
    napi_value alignment;
    napi_property_descriptor calls[] = {
        {"alloc", NULL, alloc, NULL, NULL, NULL, napi_default_method, NULL},
        {"cached", NULL, cached, NULL, NULL, NULL, napi_default_method, NULL},
        {"read", NULL, read_chunk, NULL, NULL, NULL, napi_default_method, NULL},
        {"alignment", NULL, NULL, NULL, NULL, NULL, napi_enumerable, NULL},
    };
    if (napi_create_int32(env, ALIGNMENT, &alignment) != napi_ok)
        return NULL;
    calls[3].value = alignment;
    if (napi_define_properties(env, exports, sizeof(calls) / sizeof(calls[0]), calls) != napi_ok)
        return NULL;
    return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)

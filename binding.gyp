# The native addons of lib/io: image locks (lib/io/native/ofd_lock.c), file holes for map
# (lib/io/native/file_extents.c), early writeback of written ranges
# (lib/io/native/file_writeback.c) and the read-ahead's reads
# (lib/io/native/read_ahead.c); and QEMU's deflate
# (lib/engine/compress/native/qemu_deflate.c) and zstd (lib/engine/compress/native/qemu_zstd.c)
# for compressed writes. Each file says why it exists.
# Built by `make build` (node-gyp rebuild, against the running Node's own headers).
{
  "targets": [
    {
      "target_name": "qemu_deflate",
      "sources": ["lib/engine/compress/native/qemu_deflate.c"],
      "defines": ["NAPI_VERSION=8"],
      "cflags": ["-Wall", "-Wextra"],
      "libraries": ["-ldl"]
    },
    {
      "target_name": "qemu_zstd",
      "sources": ["lib/engine/compress/native/qemu_zstd.c"],
      "defines": ["NAPI_VERSION=8"],
      "cflags": ["-Wall", "-Wextra"],
      "libraries": ["-ldl", "-lpthread"]
    },
    {
      "target_name": "ofd_lock",
      "sources": ["lib/io/native/ofd_lock.c"],
      "defines": ["NAPI_VERSION=8"],
      "cflags": ["-Wall", "-Wextra"]
    },
    {
      "target_name": "file_extents",
      "sources": ["lib/io/native/file_extents.c"],
      "defines": ["NAPI_VERSION=8"],
      "cflags": ["-Wall", "-Wextra"]
    },
    {
      "target_name": "file_writeback",
      "sources": ["lib/io/native/file_writeback.c"],
      "defines": ["NAPI_VERSION=8"],
      "cflags": ["-Wall", "-Wextra"],
      "libraries": ["-lpthread"]
    },
    {
      "target_name": "read_ahead",
      "sources": ["lib/io/native/read_ahead.c"],
      "defines": ["NAPI_VERSION=8"],
      "cflags": ["-Wall", "-Wextra"]
    }
  ]
}

# The native addons of lib/io: image locks (lib/io/native/ofd_lock.c) and file holes for map
# (lib/io/native/file_extents.c); each file says why it exists.
# Built by `make build` (node-gyp rebuild, against the running Node's own headers).
{
  "targets": [
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
    }
  ]
}

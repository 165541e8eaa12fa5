# The native addon of lib/io/image-lock.ts (see lib/io/native/ofd_lock.c for why there is one).
# Built by `make build` (node-gyp rebuild, against the running Node's own headers).
{
  "targets": [
    {
      "target_name": "ofd_lock",
      "sources": ["lib/io/native/ofd_lock.c"],
      "defines": ["NAPI_VERSION=8"],
      "cflags": ["-Wall", "-Wextra"]
    }
  ]
}

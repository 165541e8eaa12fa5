/*
 * Logging namespaces. Enable with DEBUG=qcow2fs:* (or one namespace, e.g. DEBUG=qcow2fs:fuse).
 */
import createDebug from 'debug'

export const log = {
  open: createDebug('qcow2fs:open'),
  read: createDebug('qcow2fs:read'),
  cache: createDebug('qcow2fs:cache'),
  backing: createDebug('qcow2fs:backing'),
  io: createDebug('qcow2fs:io'),
  compress: createDebug('qcow2fs:compress'),
  fuse: createDebug('qcow2fs:fuse'),
  cli: createDebug('qcow2fs:cli'),
  server: createDebug('qcow2fs:server'),
}

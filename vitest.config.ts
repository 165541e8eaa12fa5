/*
 * Test runner settings. Test files: every *.test.ts under test/, importing the TypeScript
 * sources directly; CLI and mount tests run the compiled dist/cli/main.js (`make test` builds first).
 * One test file at a time: the FUSE tests mount for real, the machine has two cores, and
 * interop tests call qemu-img on multi-MiB images.
 */
import { defineConfig } from 'vitest/config'

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    // Child processes (qemu-img, mounts, the CLI) make interop and FUSE tests slow but bounded.
    testTimeout: 120_000,
    hookTimeout: 120_000,
    teardownTimeout: 60_000,
    // Forks, not worker threads: fuse-native is a native addon with its own threads.
    pool: 'forks',
    fileParallelism: false,
    // The default reporter ends with vitest's summary (Test Files / Tests / Duration).
    reporters: ['default'],
  },
})

/*
 * The native addons of lib/io (lib/io/native/*.c, built by `make build` into build/Release of
 * the package root), loaded here because lib/io is the only layer that touches files.
 */
import * as fs from 'node:fs'
import { createRequire } from 'node:module'
import * as path from 'node:path'
import { fileURLToPath } from 'node:url'
import { log } from '../log.js'

/**
 * The file of addon `name`: build/Release/NAME.node under the package root, the nearest
 * directory above this module with a package.json (the repository both for lib/io/*.ts and
 * for dist/lib/io/*.js).
 */
export function ioAddonFile(name: string): string {
  let dir = path.dirname(fileURLToPath(import.meta.url))
  while (!fs.existsSync(path.join(dir, 'package.json')) && path.dirname(dir) !== dir) dir = path.dirname(dir)
  return path.join(dir, 'build', 'Release', `${name}.node`)
}

/** Loads addon `name`; throws what require() throws when it is not built or cannot load. */
export function loadIoAddon<Calls>(name: string): Calls {
  return createRequire(import.meta.url)(ioAddonFile(name)) as Calls
}

/**
 * For an addon the engine can do without: a getter that loads addon `name` on first use and
 * answers null from then on when it is not built or cannot load, logging once why and what is
 * done without it (`without`).
 */
export function optionalIoAddon<Calls>(name: string, without: string): () => Calls | null {
  let addon: Calls | null | undefined
  return () => {
    if (addon === undefined) {
      try {
        addon = loadIoAddon<Calls>(name)
      } catch (err) {
        log.io('%s: %s', without, (err as Error).message)
        addon = null
      }
    }
    return addon
  }
}

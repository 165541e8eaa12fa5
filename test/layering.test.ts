/*
 * The layering of lib/, checked on the import lines of every source file:
 *  - lib/format/ is pure: it imports only lib/format/ and lib/errors.ts;
 *  - only lib/io/ touches the file system (node:fs);
 *  - only lib/fuse/ imports fuse-native;
 *  - the engine (format, io, meta, engine, image.ts) never imports lib/fuse/ or cli/.
 */
import * as fs from 'node:fs'
import * as path from 'node:path'
import { describe, expect, test } from 'vitest'

const root = path.resolve(__dirname, '..')

function sourcesUnder(dir: string): string[] {
  const out: string[] = []
  for (const entry of fs.readdirSync(path.join(root, dir), { withFileTypes: true })) {
    const rel = path.join(dir, entry.name)
    if (entry.isDirectory()) out.push(...sourcesUnder(rel))
    else if (entry.name.endsWith('.ts')) out.push(rel)
  }
  return out
}

function importsOf(file: string): string[] {
  const text = fs.readFileSync(path.join(root, file), 'utf8')
  return [...text.matchAll(/^\s*(?:import|export)\b[^'"]*?from\s+['"]([^'"]+)['"]/gm), ...text.matchAll(/import\(\s*['"]([^'"]+)['"]\s*\)/g)].map(
    (m) => m[1]!,
  )
}

/** The repo-relative path an import resolves to, or the bare module name. */
function target(file: string, spec: string): string {
  if (!spec.startsWith('.')) return spec
  return path.normalize(path.join(path.dirname(file), spec)).replace(/\.js$/, '.ts')
}

const libFiles = sourcesUnder('lib')
const engineFiles = libFiles.filter((f) => !f.startsWith('lib/fuse/'))

describe('layering', () => {
  test('lib/format imports only lib/format and lib/errors.ts', () => {
    for (const file of libFiles.filter((f) => f.startsWith('lib/format/'))) {
      for (const spec of importsOf(file)) {
        const to = target(file, spec)
        expect(to.startsWith('lib/format/') || to === 'lib/errors.ts', `${file} imports ${spec}`).toBe(true)
      }
    }
  })

  test('only lib/io touches node:fs', () => {
    for (const file of engineFiles.filter((f) => !f.startsWith('lib/io/'))) {
      for (const spec of importsOf(file)) {
        expect(['fs', 'node:fs', 'fs/promises', 'node:fs/promises'].includes(spec), `${file} imports ${spec}`).toBe(false)
      }
    }
  })

  test('only lib/fuse imports fuse-native', () => {
    for (const file of [...sourcesUnder('lib'), ...sourcesUnder('cli')].filter((f) => !f.startsWith('lib/fuse/'))) {
      expect(importsOf(file).includes('fuse-native'), `${file} imports fuse-native`).toBe(false)
    }
  })

  test('the engine never imports lib/fuse or cli', () => {
    for (const file of engineFiles) {
      for (const spec of importsOf(file)) {
        const to = target(file, spec)
        expect(to.startsWith('lib/fuse/') || to.startsWith('cli/'), `${file} imports ${spec}`).toBe(false)
      }
    }
  })
})

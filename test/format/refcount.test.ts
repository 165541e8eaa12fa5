/*
 * Refcount table entries (lib/format/refcount.ts): the block offset of an entry, also when its
 * high word has bit 31 set (a damaged table must never give a negative offset).
 */
import { describe, expect, it } from 'vitest'
import { reftableEntryOffset } from '../../lib/format/refcount.js'

describe('reftableEntryOffset', () => {
  it('takes bits 9-63 of the entry', () => {
    expect(reftableEntryOffset(0, 0x20000)).toBe(0x20000)
    expect(reftableEntryOffset(0, 0x201ff)).toBe(0x20000)
    expect(reftableEntryOffset(0x1, 0x200)).toBe(0x1_0000_0200)
  })

  it('is never negative, whatever the high word', () => {
    expect(reftableEntryOffset(0x8c1de700, 0)).toBe(0x8c1de700 * 2 ** 32)
    expect(reftableEntryOffset(0xffffffff, 0xffffffff)).toBeGreaterThan(2 ** 53)
  })
})

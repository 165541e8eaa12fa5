/*
 * A small co-process that runs programs for a test: one JSON request per stdin line,
 * {"id":N,"file":"/usr/bin/qemu-img","args":[...]}, one JSON answer per stdout line,
 * {"id":N,"code":C,"signal":S,"stdout":"...","stderr":"..."}. Requests run concurrently.
 *
 * Why: a test process that holds hundreds of MiB of recorded writes pays for that in every
 * fork; this process stays small, so starting qemu-img from it is cheap.
 */
import { execFile } from 'node:child_process'
import { createInterface } from 'node:readline'

const lines = createInterface({ input: process.stdin })
lines.on('line', (line) => {
  const { id, file, args } = JSON.parse(line)
  execFile(file, args, { encoding: 'utf8', maxBuffer: 64 * 1024 * 1024, timeout: 120_000 }, (err, stdout, stderr) => {
    const code = err ? (typeof err.code === 'number' ? err.code : -1) : 0
    const signal = err && err.signal ? err.signal : null
    process.stdout.write(JSON.stringify({ id, code, signal, stdout, stderr }) + '\n')
  })
})

// The receiving end of a RAM state save, as a process of its own that outlives the daemon: QEMU
// streams its migration into the unix socket this listens on, and this writes it to the partial
// file. Were the daemon the receiver, its death would break the stream mid-way, and QEMU 7.2
// never releases guest RAM from a background snapshot that did not complete (the guest's vCPUs
// stay stuck in userfaultfd until SIGKILL). With this process the stream runs to its end and the
// next daemon finds a whole file.
//
// Plain JavaScript on purpose: it must start in tens of ms with no TypeScript loader, and it
// must not share anything with the daemon. No logic beyond receiving a stream lives here.
//
// Run with cwd = the directory of the socket: `node receiver.mjs SOCKET_NAME PARTIAL_FILE`.
// Reports on stdout, one line each: `listening`, `received <bytes>` (the stream ended: every byte
// is in the file, not yet flushed), `synced` (fsynced; exit 0), or `error <message>` (exit 1).
import { closeSync, fsyncSync, openSync, rmSync, writeSync } from 'node:fs'
import { createServer } from 'node:net'

const [socketName, partial] = process.argv.slice(2)
// The daemon may be gone: a write to its closed pipe must not end the transfer.
process.stdout.on('error', () => {})
const say = (line) => process.stdout.write(`${line}\n`)
const fail = (err) => {
  say(`error ${err?.code ?? ''} ${err?.message ?? err}`.replace(/\s+/g, ' ').trim())
  process.exit(1)
}

let fd
try {
  fd = openSync(partial, 'wx', 0o600)
} catch (err) {
  fail(err)
}
const server = createServer({ allowHalfOpen: false }, (conn) => {
  server.close()
  rmSync(socketName, { force: true })
  let bytes = 0
  let broken = false
  conn.on('data', (chunk) => {
    if (broken) return
    try {
      for (let off = 0; off < chunk.length; ) off += writeSync(fd, chunk, off)
      bytes += chunk.length
    } catch (err) {
      // The file cannot take the stream (ENOSPC, EIO). Keep reading and dropping the rest: a
      // background snapshot that QEMU 7.2 cannot complete leaves the guest wedged, so the stream
      // must reach its end; the daemon cancels the other kinds of save itself.
      broken = true
      say(`error ${err?.code ?? ''} ${err?.message ?? err}`.replace(/\s+/g, ' ').trim())
    }
  })
  conn.on('error', fail)
  conn.on('end', () => {
    if (broken) process.exit(1)
    say(`received ${bytes}`)
    try {
      fsyncSync(fd)
      closeSync(fd)
    } catch (err) {
      fail(err)
    }
    say('synced')
    process.exit(0)
  })
})
server.on('error', fail)
server.listen(socketName, () => say('listening'))

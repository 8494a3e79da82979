/**
 * Line framing for QMP. QEMU writes one JSON document per line, terminated by "\r\n"
 * (docs/interop/qmp-spec.rst: "all QMP input and output is ... terminated by CRLF"); the input
 * side accepts plain "\n". Lines can be huge (query-named-block-nodes on a long backing chain
 * repeats every backing image per node: tens of MiB), so partial data is kept as a list of
 * Buffers and joined once when the newline arrives, instead of appending to a string (O(n²)).
 * Splitting happens on bytes and each complete line is decoded at once, so a multi-byte UTF-8
 * character cut across two chunks is never decoded in halves.
 */

import { QmpdError } from '../errors.ts'

const LF = 0x0a

/** Default cap on one line: far above anything QEMU 7.2 sends, low enough to stop a runaway peer. */
export const DEFAULT_MAX_LINE_BYTES = 256 * 1024 * 1024

/** Splits a byte stream into UTF-8 text lines; feed it socket chunks in order. One per connection. */
export class LineSplitter {
  readonly maxLineBytes: number
  private parts: Buffer[] = []
  private partialBytes = 0

  constructor(opts: { maxLineBytes?: number } = {}) {
    this.maxLineBytes = opts.maxLineBytes ?? DEFAULT_MAX_LINE_BYTES
  }

  /** Bytes of an unfinished line currently held (for tests and diagnostics). */
  get pendingBytes(): number {
    return this.partialBytes
  }

  /**
   * Consumes one chunk and returns the complete lines it finished, without their terminator
   * ("\n" or "\r\n"); blank lines are skipped. Throws QmpdError('QMP_PROTOCOL_ERROR') when a
   * line grows beyond maxLineBytes; the splitter is unusable afterwards (the session must end).
   */
  push(chunk: Buffer): string[] {
    const lines: string[] = []
    let start = 0
    for (;;) {
      const nl = chunk.indexOf(LF, start)
      if (nl === -1) break
      let line: Buffer
      if (this.parts.length === 0) {
        line = chunk.subarray(start, nl)
      } else {
        this.parts.push(chunk.subarray(start, nl))
        line = Buffer.concat(this.parts, this.partialBytes + (nl - start))
        this.parts = []
        this.partialBytes = 0
      }
      this.checkLength(line.length)
      const text = decodeLine(line)
      if (text.length > 0) lines.push(text)
      start = nl + 1
    }
    if (start < chunk.length) {
      const rest = chunk.subarray(start)
      this.partialBytes += rest.length
      this.checkLength(this.partialBytes)
      // Copy only when the chunk is mostly consumed, so a small tail does not pin a large
      // socket buffer in memory while we wait for the rest of the line.
      this.parts.push(rest.length < chunk.length / 2 ? Buffer.from(rest) : rest)
    }
    return lines
  }

  /** Drops any partial line (on disconnect). */
  reset(): void {
    this.parts = []
    this.partialBytes = 0
  }

  private checkLength(n: number): void {
    if (n > this.maxLineBytes) {
      this.reset()
      throw new QmpdError('QMP_PROTOCOL_ERROR', `QMP line longer than ${this.maxLineBytes} bytes`, {
        maxLineBytes: this.maxLineBytes,
      })
    }
  }
}

function decodeLine(line: Buffer): string {
  const end = line.length > 0 && line[line.length - 1] === 0x0d ? line.length - 1 : line.length
  return line.toString('utf8', 0, end)
}

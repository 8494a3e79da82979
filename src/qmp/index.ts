/** Public surface of the QMP layer: the client, the typed command/event maps and the timeout table. */

export * from './client.ts'
export * from './commands.ts'
export * from './events.ts'
export * from './timeouts.ts'
export { LineSplitter, DEFAULT_MAX_LINE_BYTES } from './framing.ts'

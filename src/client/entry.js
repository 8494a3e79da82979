// The `qmpd/client` export for Node consumers: loads the TypeScript sources through tsx's scoped
// loader (no build step, and the consumer's own module loading is left alone).
import { tsImport } from 'tsx/esm/api'

const m = await tsImport('./index.ts', import.meta.url)
export const { ApiError, createQmpdClient, expectOk, parseDaemonUrl, followEvents, parseBlock, getJob, isFinalState, waitForJob } = m

// The public surface of qmpd/client: the typed client and its job and event helpers; nothing here
// runs the daemon.
export { ApiError, createQmpdClient, expectOk, parseDaemonUrl, type Job, type JsonOf, type QmpdClient, type QmpdClientOptions } from './http.ts'
export { followEvents, parseBlock, type FollowOptions, type JobEventData, type StreamEvent } from './sse.ts'
export { getJob, isFinalState, waitForJob, type WaitOptions } from './wait.ts'
export type { paths } from './schema.d.ts'

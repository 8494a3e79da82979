// qmpd's version string, in a module of its own so the client commands can print it without
// loading the daemon.

/** qmpd's version, reported by /healthz, the OpenAPI document and `qmpd --version`. */
export const VERSION = '0.1.0'

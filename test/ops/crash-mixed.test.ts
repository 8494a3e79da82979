// Crash matrix of reverts to internal snapshots whose tags are in images external snapshots froze
// (src/snapshot/revert-mixed.ts; test/helpers/crash-matrix.ts says what is judged). A CI run tries the
// partial copy and the checkpoint's load; npm run test:crash tries every step.
import t from 'tap'
import { runMatrix } from '../helpers/crash-matrix.ts'
import { EXT, INT, revertTo } from '../helpers/crash-scenarios.ts'

runMatrix(t, [
  { ...revertTo('revert internal disk snapshot in a frozen image', 'mxd', [INT('i0', false), EXT('s0')], 'i0', ['copy']), family: 'mixed' },
  { ...revertTo('revert internal checkpoint in a frozen image', 'mxc', [INT('k0'), EXT('s0')], 'k0', ['snapshot-load']), family: 'mixed' },
])

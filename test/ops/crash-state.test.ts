// Crash matrix of the state operations (test/helpers/crash-matrix.ts says what is judged).
import t from 'tap'
import { runMatrix } from '../helpers/crash-matrix.ts'
import { familyOf, SCENARIOS } from '../helpers/crash-scenarios.ts'

runMatrix(t, SCENARIOS.filter((sc) => familyOf(sc) === 'state'))

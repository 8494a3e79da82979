// The journal bodies of the RAM-state operations (save, managed save, restore): what recovery
// needs to know, validated when read back. No logic here.
import { z } from 'zod'

/** Journal name of save and managed save. */
export const SAVE_OP = 'save'
/** Journal name of a restore from a user's file. */
export const RESTORE_OP = 'restore'

/** A save in progress: where RAM goes, whether it is the managed save, and the guest's state before. */
export const SavePlan = z.strictObject({ file: z.string(), managed: z.boolean(), wasRunning: z.boolean() })
export type SavePlan = z.output<typeof SavePlan>

/** A restore in progress: the file it loads. */
export const RestorePlan = z.strictObject({ file: z.string() })
export type RestorePlan = z.output<typeof RestorePlan>

// zod schema of the VM view (GET/PATCH /v1/vms/{vm} answers) for response validation; no logic.
import { z } from 'zod'
import { VmState } from '../vm/definition.ts'

/**
 * One VM as the API shows it (VmManager.view). Loose objects: fields other parts of qmpd add to the
 * view or the definition pass through rather than being stripped by the serializer.
 */
export const VmViewBody = z.looseObject({
  name: z.string(),
  state: z.union([VmState, z.literal('quarantined')]),
  reason: z.string().optional(),
  pid: z.number().int().optional(),
  adopted: z.boolean(),
  definition: z.looseObject({ name: z.string() }).describe('the stored definition, paths resolved'),
  disks: z.array(
    z.object({
      id: z.string(),
      node: z.string().optional(),
      file: z.string(),
      format: z.string(),
      chain: z.array(
        z.object({
          file: z.string(),
          format: z.string(),
          node: z.string().optional(),
          virtualSize: z.number().optional(),
          actualSize: z.number().optional(),
          backingFile: z.string().optional(),
        }),
      ),
      chainError: z.string().optional(),
    }),
  ),
  createdAt: z.string(),
  updatedAt: z.string(),
})

// Routes of snapshot schedules (create, list, get, change, delete); they validate and call
// ScheduleService, nothing more.
import type { FastifyReply } from 'fastify'
import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod'
import { z } from 'zod'
import { ScheduleBody, ScheduleId, SchedulePatch, ScheduleView as ScheduleViewSchema } from '../../sched/model.ts'
import { Name } from '../../vm/definition.ts'
import type { Services } from '../app.ts'
import { errors } from '../replies.ts'
import { VmParams } from '../schemas.ts'

const ScheduleParams = z.strictObject({ vm: Name, id: ScheduleId })
const ScheduleView = ScheduleViewSchema.meta({ id: 'Schedule' })
const ScheduleList = z.object({ schedules: z.array(ScheduleView) })

/** /v1/vms/{vm}/schedules: cron schedules that take snapshots, with retention and expiry. */
export const scheduleRoutes: FastifyPluginAsyncZod<{ services: Services }> = async (app, { services }) => {
  const { schedules } = services

  app.post(
    '/v1/vms/:vm/schedules',
    {
      // It answers the schedule, not a VM or job a key could replay; a retry with the same id is 409 SCHEDULE_EXISTS.
      config: { idempotencyKey: false },
      schema: {
        summary: 'Add a schedule: a cron expression, the snapshot it takes, its retention and expiry',
        tags: ['schedules'],
        operationId: 'createSchedule',
        params: VmParams,
        body: ScheduleBody,
        response: { 201: ScheduleView, ...errors(409) },
      },
    },
    async (req, reply) => (reply as FastifyReply).code(201).send(schedules.create(req.params.vm, req.body)),
  )

  app.get(
    '/v1/vms/:vm/schedules',
    { schema: { summary: "A VM's schedules with their next slot, last run and pending deletes", tags: ['schedules'], operationId: 'listSchedules', params: VmParams, response: { 200: ScheduleList } } },
    async (req) => ({ schedules: schedules.list(req.params.vm) }),
  )

  app.get(
    '/v1/vms/:vm/schedules/:id',
    { schema: { summary: 'One schedule with its next slot, last run and pending deletes', tags: ['schedules'], operationId: 'getSchedule', params: ScheduleParams, response: { 200: ScheduleView } } },
    async (req) => schedules.get(req.params.vm, req.params.id),
  )

  app.patch(
    '/v1/vms/:vm/schedules/:id',
    {
      schema: {
        summary: 'Change a schedule (the fields given; null removes tz, retention or expiry)',
        tags: ['schedules'],
        operationId: 'patchSchedule',
        params: ScheduleParams,
        body: SchedulePatch,
        response: { 200: ScheduleView },
      },
    },
    async (req) => schedules.patch(req.params.vm, req.params.id, req.body),
  )

  app.delete(
    '/v1/vms/:vm/schedules/:id',
    {
      schema: {
        summary: 'Delete a schedule (the snapshots it took stay, with their expiry)',
        tags: ['schedules'],
        operationId: 'deleteSchedule',
        params: ScheduleParams,
        response: { 204: z.null().describe('deleted') },
      },
    },
    async (req, reply) => {
      schedules.delete(req.params.vm, req.params.id)
      return (reply as FastifyReply).code(204).send()
    },
  )
}

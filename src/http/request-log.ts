// Where fastify's per-request log lines go: debug, not info; logs nothing else itself.
import { LogController, type FastifyReply, type FastifyRequest } from 'fastify'

/**
 * fastify's log controller with the two per-request lines ("incoming request", "request
 * completed") at debug: at info they were most of a busy daemon's log. Errors keep their levels.
 */
export class DebugRequestLog extends LogController {
  override incomingRequest(request: FastifyRequest): void {
    if (this.isLogDisabled(request)) return
    request.log.debug({ req: request }, 'incoming request')
  }

  override requestCompleted(error: Error | null | undefined, request: FastifyRequest, reply: FastifyReply, metadata?: Record<string, unknown>): void {
    if (error) {
      super.requestCompleted(error, request, reply, metadata)
      return
    }
    if (this.isLogDisabled(request)) return
    reply.log.debug({ res: reply, responseTime: reply.elapsedTime }, 'request completed')
  }
}

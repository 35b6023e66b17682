"""grpc.health.v1 (Check and Watch) whose Watch streams end when graceful shutdown begins.

grpc_health's reference servicer keeps a Watch stream open through shutdown: it sends NOT_SERVING and waits for the
next change, which never comes, so `server.stop(grace)` waits out the whole grace period for a watcher (a load
balancer, a sidecar) that has nothing left to learn. Here a watcher is told NOT_SERVING and its stream ends with OK.
"""

import asyncio
import functools

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.echo import echo

_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthServicer(health_pb2_grpc.HealthServicer):
    def __init__(self) -> None:
        self._statuses: dict[str, int] = {}
        self._changed = asyncio.Condition()
        self._shutting_down = False

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        status = self._statuses.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no service {echo(request.service)}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> None:
        sent = None
        while True:
            status = self._statuses.get(request.service, _UNKNOWN)
            if status != sent:
                # Written outside the lock: a client slow to read must not block `set` for everyone.
                await context.write(health_pb2.HealthCheckResponse(status=status))
                sent = status
            if self._shutting_down:
                return
            async with self._changed:
                await self._changed.wait_for(functools.partial(self._has_news, request.service, sent))

    def _has_news(self, service: str, sent: int) -> bool:
        return self._shutting_down or self._statuses.get(service, _UNKNOWN) != sent

    async def set(self, service: str, status: int) -> None:
        """Sets `service`'s status; ignored once shutting down (it stays NOT_SERVING)."""
        async with self._changed:
            if not self._shutting_down:
                self._statuses[service] = status
                self._changed.notify_all()

    async def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING for good; open Watch streams send it and end."""
        async with self._changed:
            self._shutting_down = True
            self._statuses = dict.fromkeys(self._statuses, _NOT_SERVING)
            self._changed.notify_all()

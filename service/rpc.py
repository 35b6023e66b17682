"""What every RPC shares: a request id (logs and trailing metadata), metrics, and exceptions mapped to status codes.

Every handler goes through one path: a servicer method decorated with `@rpc_handler(...)` runs inside the servicer's
`CallScope`, which is where exceptions become status codes, as KServe's servicers hand every call to one data plane.
The mapping is docs/ARCHITECTURE.md contract 6. A client's mistake always maps to a specific code; only a bug of ours
yields INTERNAL, logged with its traceback and answered with the request id (never the exception text) so it can be
found.
"""

import asyncio
import contextvars
import functools
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, cast

import grpc
from google.protobuf.message import DecodeError, Message

from service.batcher import BatcherStoppedError, BatchTooLargeError, DeadlineExceededError, QueueFullError
from service.echo import bounded, echo
from service.log import request_id_var
from service.metrics import UNKNOWN_MODEL, ServiceMetrics
from service.preprocess import ImageTooLargeError, InvalidImageError
from service.served_models import ModelNotFoundError, ModelNotReadyError

logger = logging.getLogger(__name__)

T = TypeVar("T")
REQUEST_ID_KEY = "x-request-id"
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


class RpcError(Exception):
    """Raised by servicers to answer with `code` and `message`."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def invalid_argument(message: str) -> RpcError:
    """The RpcError of a request the client got wrong (INVALID_ARGUMENT), `message` saying what to send instead."""
    return RpcError(grpc.StatusCode.INVALID_ARGUMENT, message)


@dataclass(frozen=True)
class WireRequest:
    """A unary request as it came off the wire (service/wire.py): the messages the client sent, still bytes, parsed
    by `@rpc_handler` where the scope maps errors, so garbage or a missing message gets INVALID_ARGUMENT like any
    other mistake. Holds at most two messages: one more than a unary call may carry is enough to refuse it."""

    messages: Sequence[bytes]
    message_type: type[Message]

    def parse(self) -> Message:
        name = self.message_type.DESCRIPTOR.full_name
        if len(self.messages) != 1:
            sent = "no message" if not self.messages else "more than one message"
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"the call sent {sent}; it takes exactly one {name}")
        try:
            return self.message_type.FromString(self.messages[0])
        except DecodeError:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid {name} message") from None


@dataclass(frozen=True)
class Failure:
    """How one call ended when it did not succeed: the status code and the message for the client."""

    code: grpc.StatusCode
    message: str


_STATUS_OF_ERROR: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (ModelNotFoundError, grpc.StatusCode.NOT_FOUND),
    (ModelNotReadyError, grpc.StatusCode.UNAVAILABLE),  # ModelLoadError too
    (BatcherStoppedError, grpc.StatusCode.UNAVAILABLE),
    (QueueFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ImageTooLargeError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (InvalidImageError, grpc.StatusCode.INVALID_ARGUMENT),
    (BatchTooLargeError, grpc.StatusCode.INVALID_ARGUMENT),
)


class CallScope:
    """Runs a servicer's handler for one RPC: request id, latency and code metrics, error translation."""

    def __init__(self, metrics: ServiceMetrics, is_known_model: Callable[[str], bool]) -> None:
        self._metrics = metrics
        self._is_known_model = is_known_model

    async def run(
        self, method: str, model: str, context: grpc.aio.ServicerContext, handler: Callable[[], Awaitable[T]]
    ) -> T:
        """Awaits `handler()` and returns its response, or aborts the RPC with the code its exception maps to."""
        outcome = await self.attempt(method, model, context, handler)
        if isinstance(outcome, Failure):
            await context.abort(outcome.code, outcome.message)  # raises: the RPC ends with this status
        return outcome

    async def attempt(
        self, method: str, model: str, context: grpc.aio.ServicerContext, handler: Callable[[], Awaitable[T]]
    ) -> T | Failure:
        """Awaits `handler()` and returns its response, or the Failure its exception maps to, leaving the RPC open:
        a stream answers one of its requests with the failure and carries on."""
        started = time.perf_counter()
        request_id = _request_id(context)
        token = request_id_var.set(request_id)
        context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
        model_label = model if self._is_known_model(model) else (UNKNOWN_MODEL if model else "")
        timeout = context.time_remaining()
        code = grpc.StatusCode.OK
        try:
            return await handler()
        except asyncio.CancelledError:
            # The client went away or its deadline passed; gRPC has already answered it.
            expired = deadline_passed(context.time_remaining(), timeout)
            code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
            logger.info("%s %s: %s", method, echo(model), code.name)
            raise
        except Exception as error:
            code, message = _status_of(error, method, model, request_id)
        finally:
            self._metrics.record_request(model_label, method, code.name, time.perf_counter() - started)
            request_id_var.reset(token)
        return Failure(code, message)


class ScopedServicer(Protocol):
    """A servicer whose handlers run in `call_scope` (the one the server gives all its servicers)."""

    call_scope: CallScope


# An RPC method of a servicer: async (self, request, context) -> response.
HandlerT = TypeVar("HandlerT", bound=Callable[..., Awaitable[Any]])


def rpc_handler(model_of: Callable[[Any], str] | None = None) -> Callable[[HandlerT], HandlerT]:
    """Decorates a servicer's RPC method so that it runs in the servicer's CallScope, under the method's name and
    the model `model_of(request)` names (none when not given): the one error-mapping path of every handler."""

    def decorate(handler: HandlerT) -> HandlerT:
        method = handler.__name__

        @functools.wraps(handler)
        async def scoped(servicer: ScopedServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
            scope = servicer.call_scope
            if isinstance(request, WireRequest):
                try:
                    request = request.parse()
                except RpcError as error:  # answered by the scope like any mistake, under no model
                    return await scope.run(method, "", context, functools.partial(_reraise, error))
            model = "" if model_of is None else model_of(request)
            return await scope.run(method, model, context, lambda: handler(servicer, request, context))

        scoped.__rpc_scoped__ = True  # type: ignore[attr-defined]
        return cast(HandlerT, scoped)

    return decorate


def is_scoped(behaviour: object) -> bool:
    """Whether `behaviour` (a bound servicer method) was decorated with `@rpc_handler`."""
    return getattr(behaviour, "__rpc_scoped__", False) is True


async def _reraise(error: Exception) -> None:
    raise error


def deadline_passed(remaining: float | None, timeout: float | None) -> bool:
    """Whether a call cancelled with `remaining` seconds left on our clock, of the `timeout` it arrived with, was
    cancelled by its deadline rather than by its client.

    The client's deadline is not on the wire: the grpc-timeout header carries the time left when the client sent, and
    gRPC rounds it up to a coarser unit to fit 8 digits (1 ms under 1 s, 10 ms under 10 s, 100 ms under 100 s, ...;
    at most 1% + 1 ms, src/core/lib/transport/timeout_encoding.cc). So our deadline may fall up to that much after
    the client's, and the cancellation its deadline causes reaches us with that much left. Anything earlier is the
    client cancelling.
    """
    if remaining is None or timeout is None:
        return False
    return remaining <= 0.01 * timeout + 0.001


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The RPC's deadline in time.monotonic() seconds, or None."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


async def run_blocking(executor: Executor, function: Callable[..., T], *args: object, **kwargs: object) -> T:
    """`function(*args, **kwargs)` on `executor`, in this request's context (its log lines carry the request id)."""
    context = contextvars.copy_context()
    call = functools.partial(context.run, function, *args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(executor, call)


def _status_of(error: Exception, method: str, model: str, request_id: str) -> tuple[grpc.StatusCode, str]:
    """The status for `error` and its message, logged: client mistakes at INFO, our bugs with their traceback."""
    code: grpc.StatusCode | None
    if isinstance(error, RpcError):
        code = error.code
    else:
        code = next((code for error_type, code in _STATUS_OF_ERROR if isinstance(error, error_type)), None)
    if code is None:
        logger.exception("%s %s failed", method, echo(model))
        return grpc.StatusCode.INTERNAL, f"internal error (request id {request_id})"
    message = bounded(str(error))
    logger.info("%s %s: %s: %s", method, echo(model), code.name, message)
    return code, message


def _request_id(context: grpc.aio.ServicerContext) -> str:
    """The client's x-request-id when it sent a sane one, else a fresh one."""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _CLIENT_REQUEST_ID.fullmatch(value):
            return value
    return uuid.uuid4().hex[:16]

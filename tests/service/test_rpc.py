"""The one error-mapping path of every RPC, in process (contract 6): CallScope and the @rpc_handler decorator, with a
stand-in for grpc.aio's servicer context. tests/service/test_api.py checks the same codes end to end."""

from __future__ import annotations

import asyncio
import logging
import re

import grpc
import pytest

from service.batcher import BatcherStoppedError, BatchTooLargeError, DeadlineExceededError, QueueFullError
from service.metrics import UNKNOWN_MODEL, ServiceMetrics
from service.preprocess import ImageTooLargeError, InvalidImageError
from service.rpc import REQUEST_ID_KEY, CallScope, RpcError, WireRequest, deadline_passed, rpc_handler
from service.served_models import ModelNotFoundError, ModelNotReadyError

KNOWN_MODEL = "digits"


class Aborted(Exception):
    """What grpc.aio's context.abort raises to end the handler."""


class FakeContext:
    """The parts of grpc.aio.ServicerContext that CallScope uses."""

    def __init__(self, metadata: tuple[tuple[str, str], ...] = (), remaining: float | None = None) -> None:
        self._metadata = metadata
        self.remaining = remaining
        self.trailing: tuple[tuple[str, str], ...] = ()
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def set_trailing_metadata(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.trailing = metadata

    def time_remaining(self) -> float | None:
        return self.remaining

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise Aborted


def requests_counted(metrics: ServiceMetrics, model: str, method: str, code: str) -> float:
    return metrics.registry.get_sample_value("resnet_requests_total", {"model": model, "method": method, "code": code})


def run_in_scope(handler, *, model: str = KNOWN_MODEL, context: FakeContext | None = None):
    """(context, metrics, response or None) of `handler` run in a fresh CallScope as method "Infer"."""
    metrics = ServiceMetrics()
    scope = CallScope(metrics, lambda name: name == KNOWN_MODEL)
    context = context or FakeContext()

    async def main():
        try:
            return await scope.run("Infer", model, context, handler)
        except Aborted:
            return None

    return context, metrics, asyncio.run(main())


def raising(error: BaseException):
    async def handler():
        raise error

    return handler


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (ModelNotFoundError("no model named 'x'"), grpc.StatusCode.NOT_FOUND),
        (ModelNotReadyError("model 'digits' is not ready: loading"), grpc.StatusCode.UNAVAILABLE),
        (BatcherStoppedError("not accepting requests"), grpc.StatusCode.UNAVAILABLE),
        (QueueFullError("queue is full (8 requests)"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (ImageTooLargeError("image is 5000x4000"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (DeadlineExceededError("deadline passed while queued"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (InvalidImageError("not a JPEG, PNG, WebP or BMP image"), grpc.StatusCode.INVALID_ARGUMENT),
        (BatchTooLargeError("a request must carry 1 to 4 rows"), grpc.StatusCode.INVALID_ARGUMENT),
        (RpcError(grpc.StatusCode.NOT_FOUND, "no version '2'"), grpc.StatusCode.NOT_FOUND),
        (RpcError(grpc.StatusCode.INVALID_ARGUMENT, "top_k 11 is more than 10"), grpc.StatusCode.INVALID_ARGUMENT),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, Exception) else value.name,
)
def test_each_client_mistake_maps_to_its_code_with_its_message(error: Exception, code: grpc.StatusCode):
    context, metrics, response = run_in_scope(raising(error))
    assert response is None
    assert context.aborted == (code, str(error))
    assert requests_counted(metrics, KNOWN_MODEL, "Infer", code.name) == 1


def test_our_bug_is_internal_with_the_request_id_not_the_exception_text(caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.ERROR, logger="service.rpc"):
        context, metrics, _ = run_in_scope(raising(KeyError("secret internals")))
    code, message = context.aborted
    request_id = dict(context.trailing)[REQUEST_ID_KEY]
    assert code == grpc.StatusCode.INTERNAL
    assert message == f"internal error (request id {request_id})" and "secret" not in message
    assert any(record.exc_info for record in caplog.records), "an INTERNAL answer is logged with its traceback"
    assert requests_counted(metrics, KNOWN_MODEL, "Infer", "INTERNAL") == 1


def test_an_answer_passes_through_with_the_request_id_in_trailing_metadata():
    async def handler():
        return "response"

    context, metrics, response = run_in_scope(handler, context=FakeContext(metadata=((REQUEST_ID_KEY, "client-42"),)))
    assert response == "response" and context.aborted is None
    assert context.trailing == ((REQUEST_ID_KEY, "client-42"),)  # a sane client id is kept
    assert requests_counted(metrics, KNOWN_MODEL, "Infer", "OK") == 1


@pytest.mark.parametrize("sent", ["has spaces", "x" * 65, ""])
def test_an_unusable_client_request_id_is_replaced(sent: str):
    async def handler():
        return "response"

    context, _, _ = run_in_scope(handler, context=FakeContext(metadata=((REQUEST_ID_KEY, sent),)))
    assert re.fullmatch(r"[0-9a-f]{16}", dict(context.trailing)[REQUEST_ID_KEY])


def test_unknown_model_names_share_one_metrics_label():
    _, metrics, _ = run_in_scope(raising(ModelNotFoundError("no model named 'typo'")), model="typo")
    assert requests_counted(metrics, UNKNOWN_MODEL, "Infer", "NOT_FOUND") == 1
    assert requests_counted(metrics, "typo", "Infer", "NOT_FOUND") is None  # a client cannot grow the series


@pytest.mark.parametrize(
    ("timeout", "remaining", "code"),
    [
        (5.0, 0.0, "DEADLINE_EXCEEDED"),
        (5.0, 0.04, "DEADLINE_EXCEEDED"),  # within grpc-timeout's rounding (10 ms units under 10 s)
        (5.0, 0.3, "CANCELLED"),  # the client gave up 0.3 s early: not its deadline
        (60.0, 0.5, "DEADLINE_EXCEEDED"),  # 100 ms units: 60 s may arrive as up to 60.1 s, at most 1% + 1 ms
        (60.0, 0.7, "CANCELLED"),
        (None, None, "CANCELLED"),
    ],
)
def test_a_cancelled_call_is_counted_as_its_deadline_passing_or_as_cancelled(
    timeout: float | None, remaining: float | None, code: str
):
    metrics = ServiceMetrics()
    scope = CallScope(metrics, lambda name: True)
    context = FakeContext(remaining=timeout)

    async def cancelled_with_time_left():
        context.remaining = remaining
        raise asyncio.CancelledError

    async def main():
        await scope.run("Infer", KNOWN_MODEL, context, cancelled_with_time_left)

    with pytest.raises(asyncio.CancelledError):  # gRPC has answered already: the scope only records it
        asyncio.run(main())
    assert context.aborted is None
    assert requests_counted(metrics, KNOWN_MODEL, "Infer", code) == 1


def test_the_deadline_bound_is_the_timeout_encodings_rounding():
    assert deadline_passed(0.0011, 0.01) and not deadline_passed(0.0021, 0.01)  # under 1 s: 1 ms units
    assert deadline_passed(0.99, 99.0) and not deadline_passed(1.0, 99.0)  # 100 ms units under 100 s


class Servicer:
    """A servicer as the server builds them: a call scope and decorated handlers."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self.call_scope = CallScope(metrics, lambda name: name == KNOWN_MODEL)

    @rpc_handler(lambda request: request["model"])
    async def ModelInfer(self, request: dict, context: FakeContext) -> str:
        if request["model"] != KNOWN_MODEL:
            raise ModelNotFoundError(f"no model named {request['model']!r}")
        return f"logits of {request['model']}"

    @rpc_handler()
    async def ServerLive(self, request: dict, context: FakeContext) -> str:
        return "live"


def test_decorated_handlers_run_in_the_scope_under_their_own_name_and_model():
    metrics = ServiceMetrics()
    servicer = Servicer(metrics)

    async def main():
        answered = await servicer.ModelInfer({"model": KNOWN_MODEL}, FakeContext())
        missing = FakeContext()
        with pytest.raises(Aborted):
            await servicer.ModelInfer({"model": "nope"}, missing)
        live = await servicer.ServerLive({}, FakeContext())
        return answered, missing.aborted, live

    answered, aborted, live = asyncio.run(main())
    assert (answered, live) == ("logits of digits", "live")
    assert aborted == (grpc.StatusCode.NOT_FOUND, "no model named 'nope'")
    assert requests_counted(metrics, KNOWN_MODEL, "ModelInfer", "OK") == 1
    assert requests_counted(metrics, UNKNOWN_MODEL, "ModelInfer", "NOT_FOUND") == 1
    assert requests_counted(metrics, "", "ServerLive", "OK") == 1
    assert Servicer.ModelInfer.__name__ == "ModelInfer"  # gRPC's generated code registers handlers by attribute


def test_wire_requests_are_parsed_in_the_scope_and_bad_ones_counted_as_invalid_argument():
    from service._proto import classifier_pb2

    metrics = ServiceMetrics()

    class ClassifyServicer:
        call_scope = CallScope(metrics, lambda name: name == KNOWN_MODEL)

        @rpc_handler(lambda request: request.model)
        async def Classify(self, request: classifier_pb2.ClassifyRequest, context: FakeContext) -> str:
            return request.model

    good = classifier_pb2.ClassifyRequest(model=KNOWN_MODEL).SerializeToString()
    cases = {"garbage": [b"\xff\xff\xff"], "none": [], "two": [good, good]}

    async def main():
        answered = await ClassifyServicer().Classify(WireRequest([good], classifier_pb2.ClassifyRequest), FakeContext())
        refused = {}
        for name, messages in cases.items():
            context = FakeContext()
            with pytest.raises(Aborted):
                await ClassifyServicer().Classify(WireRequest(messages, classifier_pb2.ClassifyRequest), context)
            refused[name] = context.aborted
        return answered, refused

    answered, refused = asyncio.run(main())
    assert answered == KNOWN_MODEL
    assert refused == {
        "garbage": (grpc.StatusCode.INVALID_ARGUMENT, "the request is not a valid resnet.v1.ClassifyRequest message"),
        "none": (
            grpc.StatusCode.INVALID_ARGUMENT,
            "the call sent no message; it takes exactly one resnet.v1.ClassifyRequest",
        ),
        "two": (
            grpc.StatusCode.INVALID_ARGUMENT,
            "the call sent more than one message; it takes exactly one resnet.v1.ClassifyRequest",
        ),
    }
    assert requests_counted(metrics, "", "Classify", "INVALID_ARGUMENT") == 3

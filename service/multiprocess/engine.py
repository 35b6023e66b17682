"""The engine process: the models' batchers and backends, serving the frontends' requests on a Unix socket.

Each frontend keeps one connection. Every request it sends gets exactly one answer (RESULT or FAILED), also when it
is cancelled, and only then may the frontend reuse the request's slot. A request's tensor is a view of the frontend's
slot, so the batcher's one copy (into the batch, or into the backend's staging memory) is the only one. When a
frontend's connection ends (it stopped or died), its requests still queued are withdrawn and never computed, and
nothing more is written into its slots: a new connection from the same frontend index first closes the old one.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Sequence
from pathlib import Path

import torch
from aiohttp import web

from service.batcher import BatchResult
from service.metrics import ServiceMetrics
from service.model_loader import load_model_parts
from service.model_manager import LoadParts, ModelManager
from service.multiprocess import messages
from service.multiprocess.messages import Hello, InferRequest, InferResult, Kind
from service.multiprocess.model_views import describe
from service.multiprocess.slots import SlotFile
from service.repository import ModelConfig
from service.server import ServerSettings, ServerStartError, local_models, serve_until_signalled
from service.statistics import RequestTimes

logger = logging.getLogger(__name__)

SOCKET_NAME = "engine.sock"


class Engine:
    def __init__(
        self,
        settings: ServerSettings,
        configs: Sequence[ModelConfig],
        socket_path: Path,
        load_parts: LoadParts = load_model_parts,
    ) -> None:
        self._settings = settings
        self._socket_path = socket_path
        self.metrics = ServiceMetrics()
        self.models = local_models(settings, configs, self.metrics, self._broadcast_state, load_parts)
        self._connections: dict[int, _FrontendConnection] = {}  # by frontend index
        self._server: asyncio.AbstractServer | None = None
        self._metrics_runner: web.AppRunner | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._accept, path=str(self._socket_path))
        settings = self._settings
        if settings.metrics_port:
            try:
                self._metrics_runner = await self.metrics.serve_http(
                    settings.metrics_host or settings.host, settings.metrics_port
                )
            except OSError as error:
                raise ServerStartError(f"cannot bind the metrics port: {error}") from error
        logger.info("engine listening on %s", self._socket_path)
        self.models.start_loading()

    async def stop(self, grace_s: float) -> None:
        """Drains every model (what is queued is computed and answered) for up to `grace_s`, then closes every
        connection: a request still unanswered then gets UNAVAILABLE in its frontend."""
        if self._server is not None:
            self._server.close()
        try:
            async with asyncio.timeout(grace_s):
                await self.models.stop()
        except TimeoutError:
            logger.warning("the batchers did not drain within the %.1f s grace period; closing", grace_s)
        for connection in list(self._connections.values()):
            connection.close()
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        message = await messages.read_frame(reader)
        if message is None or message[0] is not Kind.HELLO:
            writer.close()
            return
        _, hello = messages.unpack_pickled(message[1])
        previous = self._connections.get(hello.frontend)
        if previous is not None:
            previous.close()
        connection = _FrontendConnection(self.models, reader, writer, hello)
        self._connections[hello.frontend] = connection
        logger.info("frontend %d (pid %d) connected", hello.frontend, hello.pid)
        connection.send(messages.pack_pickled(Kind.STATE, describe(self.models)))
        await connection.serve()
        if self._connections.get(hello.frontend) is connection:
            del self._connections[hello.frontend]
        logger.info("frontend %d (pid %d) disconnected", hello.frontend, hello.pid)

    async def _broadcast_state(self) -> None:
        state = messages.pack_pickled(Kind.STATE, describe(self.models))
        for connection in self._connections.values():
            connection.send(state)


class _FrontendConnection:
    def __init__(
        self, models: ModelManager, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, hello: Hello
    ) -> None:
        self._models = models
        self._reader = reader
        self._writer = messages.CoalescingWriter(writer)
        self._slots = SlotFile(Path(hello.slot_file), hello.slot_bytes)
        self._requests: dict[int, asyncio.Task[None]] = {}
        self._calls: set[asyncio.Task[None]] = set()  # load, unload, statistics
        self._closed = False

    async def serve(self) -> None:
        """Until the frontend's side ends or close() is called."""
        while not self._closed and (message := await messages.read_frame(self._reader)) is not None:
            kind, body = message
            if kind is Kind.INFER:
                request = messages.unpack_infer(body)
                self._requests[request.request_id] = asyncio.create_task(self._infer(request))
            elif kind is Kind.CANCEL:
                task = self._requests.get(messages.unpack_id(body))
                if task is not None:
                    task.cancel()
            elif kind is Kind.CALL:
                request_id, (operation, argument) = messages.unpack_pickled(body, with_id=True)
                call = asyncio.create_task(self._call(request_id, operation, argument))
                self._calls.add(call)
                call.add_done_callback(self._calls.discard)
            elif kind is Kind.RECORD:
                _, records = messages.unpack_pickled(body)
                for record in records:
                    self._record(*record)
        self.close()

    def send(self, data: bytes) -> None:
        if not self._closed:
            self._writer.write(data)

    def close(self) -> None:
        """No more reads or writes; the requests still queued are withdrawn (their tasks cancelled)."""
        if self._closed:
            return
        self._closed = True
        for task in self._requests.values():
            task.cancel()
        self._writer.close()

    async def _infer(self, request: InferRequest) -> None:
        try:
            if request.slot >= 0:
                inputs = self._slots.view(request.slot, request.dtype, request.shape)
            else:
                inputs = messages.inline_tensor(request.inline, request.dtype, request.shape)
            async with self._models.serving(request.model) as loaded:
                result = await loaded.batcher.submit(inputs, deadline=request.deadline)
            answer = self._result(request, result.logits.contiguous(), result)
        except asyncio.CancelledError:
            answer = messages.pack_pickled(Kind.FAILED, ("CancelledError", "cancelled"), request.request_id)
        except Exception as error:
            if not isinstance(error, messages.ENGINE_ERRORS):
                logger.exception("request %d for %s failed", request.request_id, request.model)
            answer = messages.pack_pickled(Kind.FAILED, messages.error_of(error), request.request_id)
        finally:
            self._requests.pop(request.request_id, None)
        self.send(answer)

    def _result(self, request: InferRequest, logits: torch.Tensor, result: BatchResult) -> bytes:
        rows, classes = logits.shape
        inline = b""
        slot = request.slot
        if slot >= 0 and logits.numel() * logits.element_size() <= self._slots.slot_bytes:
            if not self._closed:  # a closed connection's slots may belong to its frontend's successor
                self._slots.view(slot, logits.dtype, (rows, classes)).copy_(logits)
        else:
            slot, inline = -1, logits.numpy().tobytes()
        return messages.pack_result(
            InferResult(
                request.request_id, slot, result.queue_us, result.compute_us, result.batch_size, rows, classes, inline
            )
        )

    async def _call(self, request_id: int, operation: str, argument: str) -> None:
        try:
            answer: object = None
            if operation == "load":
                await self._models.load(argument)
            elif operation == "unload":
                await self._models.unload(argument)
            elif operation == "statistics":
                answer = await self._models.statistics_snapshot()
            else:
                raise ValueError(f"unknown call {operation!r}")
            reply = messages.pack_pickled(Kind.ANSWER, answer, request_id)
        except Exception as error:
            reply = messages.pack_pickled(Kind.FAILED, messages.error_of(error), request_id)
        self.send(reply)

    def _record(self, model: str, rows: int, total_ns: int, times: RequestTimes | None) -> None:
        if not self._models.is_known(model):
            return
        stats = self._models.request_statistics(model)
        if times is None:
            stats.record_failure(total_ns)
        else:
            stats.record_success(rows, total_ns, times)


async def serve_engine(settings: ServerSettings, configs: Sequence[ModelConfig], run_dir: Path) -> bool:
    """Runs the engine until SIGTERM (the supervisor sends it once every frontend has stopped); as
    service.server.serve for the result."""
    engine = Engine(settings, configs, run_dir / SOCKET_NAME)
    return await serve_until_signalled(engine, settings.grace_period_s, (signal.SIGTERM,))

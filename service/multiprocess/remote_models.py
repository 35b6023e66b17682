"""A frontend's models: a mirror of the engine's, whose batchers forward each request to the engine.

The engine sends its models' states on connecting and after every change; the mirror takes them as they come (it has
no transitions of its own, so it sets states rather than entering them). While the engine is not connected (it is
starting, or restarting after it died) every model is Loading and the frontend is not ready, and a request gets
UNAVAILABLE at once; requests in flight when the connection ends get UNAVAILABLE too, never a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import models
from service.batcher import BatcherStoppedError, BatchResult
from service.lifecycle import Draining, Failed, Loaded, Loading, ModelState, OutputSpec, Ready, ServedModel, Unloaded
from service.multiprocess import messages
from service.multiprocess.messages import Hello, InferRequest, Kind
from service.multiprocess.model_views import EngineState, ModelView
from service.multiprocess.slots import SlotPool
from service.repository import ModelConfig
from service.served_models import ModelTable
from service.statistics import InferenceStatistics, RequestTimes

logger = logging.getLogger(__name__)

RECONNECT_S = 0.2  # between attempts to reach the engine
RECORDS_EVERY_S = 0.01  # finished requests' counts go to the engine together, at most this long after the first


class EngineUnavailableError(BatcherStoppedError):
    """The engine is not connected, or its connection ended with the request in flight (UNAVAILABLE)."""


@dataclass
class _Pending:
    future: asyncio.Future[Any]
    slot: int  # -1: none held


class EngineLink:
    """One frontend's connection to the engine, reconnecting whenever it ends. `on_state` is awaited with each state
    the engine sends, and with None when the connection ends."""

    def __init__(
        self,
        socket_path: Path,
        hello: Hello,
        slots: SlotPool,
        on_state: Callable[[EngineState | None], Awaitable[None]],
    ) -> None:
        self._socket_path = socket_path
        self._hello = hello
        self._slots = slots
        self._on_state = on_state
        self._writer: messages.CoalescingWriter | None = None
        self._records: list[tuple[str, int, int, RequestTimes | None]] = []
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._connect_forever())

    async def close(self) -> None:
        """Sends the counts not yet sent, then ends the connection."""
        self._send_records()
        if self._writer is not None:
            self._writer.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def infer(self, model: str, inputs: torch.Tensor, deadline: float | None) -> BatchResult:
        writer = self._connected()
        request_id = next(self._ids)
        slot = self._slots.take() if self._slots.fits(inputs) else None
        shape = tuple(inputs.shape)
        if slot is None:  # larger than a slot, or every slot in use
            request = InferRequest(request_id, model, deadline, -1, inputs.dtype, shape, inputs.numpy().tobytes())
        else:
            self._slots.file.view(slot, inputs.dtype, shape).copy_(inputs)
            request = InferRequest(request_id, model, deadline, slot, inputs.dtype, shape)
        future = asyncio.get_running_loop().create_future()
        self._pending[request_id] = _Pending(future, -1 if slot is None else slot)
        writer.write(messages.pack_infer(request))
        try:
            return await future
        except asyncio.CancelledError:
            # The engine withdraws it; its slot stays taken until the engine's answer says it is done with it.
            if request_id in self._pending and self._writer is writer:
                writer.write(messages.pack_cancel(request_id))
            raise

    async def call(self, operation: str, argument: str = "") -> Any:
        """The engine's answer to a load, unload or statistics call (or the error it raised)."""
        writer = self._connected()
        request_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[request_id] = _Pending(future, -1)
        writer.write(messages.pack_pickled(Kind.CALL, (operation, argument), request_id))
        return await future

    def record(self, model: str, rows: int, total_ns: int, times: RequestTimes | None) -> None:
        """Counts a finished request in the engine's statistics, within RECORDS_EVERY_S (lost while the engine is not
        connected)."""
        if self._writer is None:
            return
        if not self._records:
            asyncio.get_running_loop().call_later(RECORDS_EVERY_S, self._send_records)
        self._records.append((model, rows, total_ns, times))

    def _send_records(self) -> None:
        records, self._records = self._records, []
        if records and self._writer is not None:
            self._writer.write(messages.pack_pickled(Kind.RECORD, records))

    def _connected(self) -> messages.CoalescingWriter:
        if self._writer is None:
            raise EngineUnavailableError("the engine is not connected (it is starting or restarting); retry shortly")
        return self._writer

    async def _connect_forever(self) -> None:
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(str(self._socket_path))
            except OSError:
                await asyncio.sleep(RECONNECT_S)
                continue
            writer.write(messages.pack_pickled(Kind.HELLO, self._hello))
            self._writer = messages.CoalescingWriter(writer)
            logger.info("connected to the engine")
            try:
                await self._read(reader)
            finally:
                self._writer = None
                self._records.clear()
                writer.close()
                self._fail_pending()
            logger.warning("the engine's connection ended; reconnecting")
            await self._on_state(None)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while (message := await messages.read_frame(reader)) is not None:
            kind, body = message
            if kind is Kind.STATE:
                await self._on_state(messages.unpack_pickled(body)[1])
            elif kind is Kind.RESULT:
                self._deliver_result(messages.unpack_result(body))
            elif kind is Kind.FAILED:
                request_id, (name, text) = messages.unpack_pickled(body, with_id=True)
                self._settle(request_id, error=messages.raised(name, text))
            elif kind is Kind.ANSWER:
                request_id, value = messages.unpack_pickled(body, with_id=True)
                self._settle(request_id, value=value)

    def _deliver_result(self, result: messages.InferResult) -> None:
        shape = (result.rows, result.classes)
        if result.slot >= 0:
            logits = self._slots.file.view(result.slot, torch.float32, shape).clone()
        else:
            logits = messages.inline_tensor(result.inline, torch.float32, shape)
        self._settle(
            result.request_id, value=BatchResult(logits, result.queue_us, result.compute_us, result.batch_size)
        )

    def _settle(self, request_id: int, *, value: Any = None, error: Exception | None = None) -> None:
        pending = self._pending.pop(request_id, None)
        if pending is None:
            return
        if pending.slot >= 0:
            self._slots.give_back(pending.slot)
        if pending.future.done():  # its caller was cancelled
            return
        if error is None:
            pending.future.set_result(value)
        else:
            pending.future.set_exception(error)

    def _fail_pending(self) -> None:
        pending, self._pending = self._pending, {}
        for entry in pending.values():
            if entry.slot >= 0:
                self._slots.give_back(entry.slot)
            if not entry.future.done():
                entry.future.set_exception(
                    EngineUnavailableError("the engine stopped while this request was in flight; retry")
                )


class RemoteBatcher:
    """A model's batcher as the frontend sees it: the engine's, behind the link."""

    def __init__(self, link: EngineLink, model: str) -> None:
        self._link = link
        self._model = model

    async def submit(self, inputs: torch.Tensor, deadline: float | None = None) -> BatchResult:
        return await self._link.infer(self._model, inputs, deadline)

    async def stop(self) -> None:
        """Nothing of the frontend's to stop: the engine drains its own batcher."""


class _ForwardedRecorder:
    def __init__(self, link: EngineLink, model: str) -> None:
        self._link = link
        self._model = model

    def record_success(self, rows: int, total_ns: int, times: RequestTimes) -> None:
        self._link.record(self._model, rows, total_ns, times)

    def record_failure(self, total_ns: int) -> None:
        self._link.record(self._model, 0, total_ns, None)


class RemoteModels(ModelTable):
    """service.served_models.ServedModels for a frontend process. `on_change` is awaited after each state change."""

    def __init__(
        self,
        configs: Sequence[ModelConfig],
        *,
        default_backend: str,
        default_queue_size: int,
        socket_path: Path,
        hello: Hello,
        slots: SlotPool,
        on_change: Callable[[], Awaitable[None]],
    ) -> None:
        super().__init__(
            ServedModel(
                config,
                backend_kind=config.backend or default_backend,  # the engine's resolved kind once it says
                max_queue_size=config.max_queue_size or default_queue_size,
                state=Loading("waiting for the engine"),
            )
            for config in configs
        )
        self._inputs = {config.name: models.input_spec(config.arch, config.input_size) for config in configs}
        self._link = EngineLink(socket_path, hello, slots, self._mirror)
        self._on_change = on_change
        self._settled = False

    @property
    def settled(self) -> bool:
        return self._settled

    @contextlib.asynccontextmanager
    async def serving(self, name: str) -> AsyncIterator[Loaded]:
        """`ready_model(name)`; the engine counts the request in flight while it holds it."""
        yield self.ready_model(name)

    async def load(self, name: str) -> None:
        self.find(name)
        await self._link.call("load", name)

    async def unload(self, name: str) -> None:
        self.find(name)
        await self._link.call("unload", name)

    def request_statistics(self, name: str) -> _ForwardedRecorder:
        return _ForwardedRecorder(self._link, name)

    async def statistics_snapshot(self) -> InferenceStatistics:
        statistics: InferenceStatistics = await self._link.call("statistics")
        return statistics

    def start_loading(self) -> None:
        self._link.start()

    async def stop(self) -> None:
        await self._link.close()

    async def wait_for_loader(self, timeout_s: float) -> bool:
        return True  # nothing loads in a frontend

    async def _mirror(self, state: EngineState | None) -> None:
        if state is None:
            self._settled = False
            for model in self._models.values():
                model.state = Loading("the engine is restarting")
        else:
            self._settled = state.settled
            for view in state.models:
                mirrored = self._models.get(view.name)
                if mirrored is not None:
                    mirrored.backend_kind = view.backend_kind
                    mirrored.max_queue_size = view.max_queue_size
                    mirrored.state = self._state_of(mirrored, view)
        await self._on_change()

    def _state_of(self, model: ServedModel, view: ModelView) -> ModelState:
        if view.state is Loading or view.state is Failed or view.state is Unloaded:
            return view.state(view.reason)
        assert view.backend is not None, f"the engine sent {view.state.__name__} without its backend"
        loaded = Loaded(
            model.name,
            model.config.precision,
            view.backend,
            RemoteBatcher(self._link, model.name),
            self._inputs[model.name],
            OutputSpec(view.labels),
        )
        return Ready(loaded) if view.state is Ready else Draining(loaded)

"""The engine and a frontend's mirror of its models, in one process over a real Unix socket and slot file: tensors
cross the slots (or inline when too large) unchanged, a cancelled request keeps its slot until the engine answers
and is never computed, the requests in flight when the engine goes get UNAVAILABLE at once, and a peer that sends no
frame of ours loses its connection alone."""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import torch

from models import digits
from service.lifecycle import Loading, Ready, Unloaded
from service.multiprocess.engine import Engine
from service.multiprocess.messages import MAX_FRAME_BYTES, Hello, Kind, pack_pickled
from service.multiprocess.remote_models import RECORDS_EVERY_S, EngineUnavailableError, RemoteModels
from service.multiprocess.slots import SlotFile, SlotPool, create_slot_file
from service.repository import ModelConfig
from service.server import ServerSettings
from service.statistics import RequestTimes
from tests.service.test_model_manager import DIGITS, FakeBackend, parts_of

SLOTS = 4
ROW_BYTES = 3 * digits.INPUT_SIZE * digits.INPUT_SIZE * 4
SLOT_BYTES = 2 * ROW_BYTES  # two float32 rows: a batch of 4 travels inline


class Pair:
    """An engine over one FakeBackend model "m" and a frontend's RemoteModels connected to it."""

    def __init__(self, tmp_path: Path, backend: FakeBackend) -> None:
        self.backend = backend
        self.runs = 0
        self.changes = asyncio.Event()
        configs = [ModelConfig(name="m", **DIGITS)]
        self.engine = Engine(
            ServerSettings(metrics_port=0, backend="eager"), configs, tmp_path / "engine.sock", load_parts=self._load
        )
        slot_path = tmp_path / "slots-0"
        create_slot_file(slot_path, SLOTS, SLOT_BYTES)
        self.slots = SlotPool(SlotFile(slot_path, SLOT_BYTES))
        self.frontend = RemoteModels(
            configs,
            default_backend="eager",
            default_queue_size=8,
            socket_path=tmp_path / "engine.sock",
            hello=Hello(0, os.getpid(), str(slot_path), SLOT_BYTES),
            slots=self.slots,
            on_change=self._changed,
        )

    def _load(self, config: ModelConfig, backend_kind: str):
        original = self.backend.run

        def counted(batch: torch.Tensor) -> torch.Tensor:
            self.runs += 1
            return original(batch)

        self.backend.run = counted  # type: ignore[method-assign]
        return parts_of(self.backend)

    async def _changed(self) -> None:
        self.changes.set()

    async def wait_for(self, condition: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
        async with asyncio.timeout(timeout_s):
            while not condition():
                await asyncio.sleep(0.005)
        assert condition(), what


def with_pair(tmp_path: Path, body: Callable[[Pair], Awaitable[None]], *, hold: bool = False) -> None:
    """Runs `body` against a started Pair (its backend holding each batch until released when `hold`)."""

    async def main() -> None:
        pair = Pair(tmp_path, FakeBackend(hold=hold))
        await pair.engine.start()
        pair.frontend.start_loading()
        try:
            await pair.wait_for(lambda: pair.frontend.settled and pair.frontend.any_ready, "the mirror to see m ready")
            await body(pair)
        finally:
            pair.backend.release.set()
            await pair.frontend.stop()
            await pair.engine.stop(grace_s=10)

    asyncio.run(main())


def test_the_mirror_shows_the_engines_model_with_its_backend_and_labels(tmp_path: Path) -> None:
    async def body(pair: Pair) -> None:
        model = pair.frontend.find("m")
        assert isinstance(model.state, Ready)
        loaded = pair.frontend.ready_model("m")
        assert (loaded.backend.name, loaded.backend.device.type) == ("eager", "cpu")
        assert loaded.output.labels == ("0", "1", "2")
        assert model.backend_kind == "eager"

    with_pair(tmp_path, body)


def test_tensors_cross_a_slot_or_inline_unchanged(tmp_path: Path) -> None:
    async def body(pair: Pair) -> None:
        generator = torch.Generator().manual_seed(0)
        for rows in (1, 2, 4):  # 4 rows do not fit a slot: inline both ways
            inputs = torch.randn(rows, 3, digits.INPUT_SIZE, digits.INPUT_SIZE, generator=generator)
            result = await pair.frontend.ready_model("m").batcher.submit(inputs)
            torch.testing.assert_close(result.logits, inputs.mean(dim=(2, 3)), rtol=0, atol=0)
            assert result.batch_size == rows
        assert pair.slots.free == SLOTS

    with_pair(tmp_path, body)


def test_a_cancelled_request_keeps_its_slot_until_the_engine_answers_and_is_never_computed(tmp_path: Path) -> None:
    async def body(pair: Pair) -> None:
        batcher = pair.frontend.ready_model("m").batcher
        image = torch.randn(1, 3, digits.INPUT_SIZE, digits.INPUT_SIZE)
        running = asyncio.create_task(batcher.submit(image))
        await pair.wait_for(pair.backend.running.is_set, "the first batch to run")
        queued = asyncio.create_task(batcher.submit(image + 1))
        await pair.wait_for(lambda: pair.engine.models.ready_model("m").batcher.queue_depth == 1, "the second to queue")
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        # The engine's answer to the cancel frees the slot; until then no other request may write into it.
        await pair.wait_for(lambda: pair.slots.free == SLOTS - 1, "the cancelled request's slot to come back")
        pair.backend.release.set()
        result = await running
        torch.testing.assert_close(result.logits, image.mean(dim=(2, 3)), rtol=0, atol=0)
        assert pair.runs == 1 and pair.slots.free == SLOTS

    with_pair(tmp_path, body, hold=True)


def test_requests_in_flight_when_the_engine_goes_get_unavailable_and_the_mirror_unready(tmp_path: Path) -> None:
    async def body(pair: Pair) -> None:
        batcher = pair.frontend.ready_model("m").batcher
        running = asyncio.create_task(batcher.submit(torch.randn(1, 3, digits.INPUT_SIZE, digits.INPUT_SIZE)))
        await pair.wait_for(pair.backend.running.is_set, "the batch to run")
        pair.changes.clear()
        for connection in list(pair.engine._connections.values()):  # what the engine process dying does to the socket
            connection.close()
        with pytest.raises(EngineUnavailableError):
            await asyncio.wait_for(running, timeout=5)
        await pair.wait_for(lambda: not pair.frontend.settled, "the mirror to leave settled")
        assert isinstance(pair.frontend.find("m").state, Loading) and pair.slots.free == SLOTS
        # It reconnects by itself (the engine still listens here) and serves again.
        pair.backend.release.set()
        await pair.wait_for(lambda: pair.frontend.any_ready, "the mirror to reconnect")

    with_pair(tmp_path, body, hold=True)


def test_load_unload_and_statistics_are_the_engines(tmp_path: Path) -> None:
    async def body(pair: Pair) -> None:
        await pair.frontend.unload("m")
        await pair.wait_for(lambda: isinstance(pair.frontend.find("m").state, Unloaded), "the mirror to see the unload")
        await pair.frontend.load("m")
        await pair.wait_for(lambda: pair.frontend.any_ready, "the mirror to see the load")
        await pair.frontend.ready_model("m").batcher.submit(torch.randn(1, 3, digits.INPUT_SIZE, digits.INPUT_SIZE))
        pair.frontend.request_statistics("m").record_success(1, 5000, RequestTimes(1, 2, 3, 4))
        pair.frontend.request_statistics("m").record_failure(7000)
        # The counts leave within RECORDS_EVERY_S, together.
        await asyncio.sleep(RECORDS_EVERY_S * 2)
        stats = (await pair.frontend.statistics_snapshot()).of("m")
        assert (stats.success.count, stats.success.ns, stats.fail.count, stats.fail.ns) == (1, 5000, 1, 7000)
        assert (stats.execution_count, stats.inference_count) == (1, 1)

    with_pair(tmp_path, body)


@pytest.mark.parametrize("header", [struct.pack("<IB", MAX_FRAME_BYTES + 1, Kind.INFER), struct.pack("<IB", 0, 200)],
                         ids=["oversize", "unknown-kind"])  # fmt: skip
def test_a_peer_sending_no_frame_of_ours_loses_its_connection_and_nobody_else_does(tmp_path: Path, header) -> None:
    async def body(pair: Pair) -> None:
        slot_path = tmp_path / "slots-1"
        create_slot_file(slot_path, SLOTS, SLOT_BYTES)
        reader, writer = await asyncio.open_unix_connection(str(tmp_path / "engine.sock"))
        writer.write(pack_pickled(Kind.HELLO, Hello(1, os.getpid(), str(slot_path), SLOT_BYTES)))
        writer.write(header)
        async with asyncio.timeout(10):
            while await reader.read(1 << 16):  # the engine's state, then the end of the stream
                pass
        writer.close()
        inputs = torch.randn(1, 3, digits.INPUT_SIZE, digits.INPUT_SIZE)
        result = await pair.frontend.ready_model("m").batcher.submit(inputs)
        torch.testing.assert_close(result.logits, inputs.mean(dim=(2, 3)), rtol=0, atol=0)
        assert list(pair.engine._connections) == [0]

    with_pair(tmp_path, body)

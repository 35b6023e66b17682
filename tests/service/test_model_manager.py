"""The typed model lifecycle, in process: ModelManager with a stand-in loader (fast), then once with the real one.

Loading -> Ready(Loaded) / Failed(reason) -> Draining (-> Unloaded -> Loading, a client's unload and load), the
readiness gauge, the batcher given the backend's preferred batch sizes. tests/service/test_lifecycle.py checks
start-up and shutdown end to end through a subprocess.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import pytest
import torch

import models
from models import digits
from models.precision import FLOAT32
from models.pretrained import WeightsUnavailableError
from service.batch_plan import BucketPolicy
from service.batcher import BatcherStoppedError
from service.lifecycle import Draining, Failed, Loaded, Loading, OutputSpec, Ready, ServedModel, Unloaded
from service.metrics import ServiceMetrics
from service.model_loader import ModelParts
from service.model_manager import ModelLoadError, ModelManager
from service.repository import ModelConfig
from service.served_models import ModelNotFoundError, ModelNotReadyError
from tests.support.numerics import CROSS_BACKEND_TOLERANCE, assert_relative_close

CLASSES = 3
DIGITS = {"arch": "digits_resnet", "input_size": digits.INPUT_SIZE, "max_batch_size": 4, "max_queue_delay_us": 0}


class FakeBackend:
    """Per-row logits [n, CLASSES] from the channel means; `hold` keeps a batch running until released."""

    name = "eager"
    device = torch.device("cpu")
    dtype = torch.float32

    def __init__(self, preferred_batch_sizes: tuple[int, ...] = (), hold: bool = False) -> None:
        self.preferred_batch_sizes = preferred_batch_sizes
        self.running = threading.Event()
        self.release = threading.Event()
        if not hold:
            self.release.set()

    def run(self, batch: torch.Tensor) -> torch.Tensor:
        self.running.set()
        assert self.release.wait(timeout=10), "test never released the backend"
        return batch.mean(dim=(2, 3))


def parts_of(backend: FakeBackend) -> ModelParts:
    output = OutputSpec(tuple(str(i) for i in range(CLASSES)))
    return ModelParts(backend, models.input_spec("digits_resnet", digits.INPUT_SIZE), output)


class Harness:
    """A ModelManager over `outcomes` (name -> parts or the error its load raises), each load held until `go`;
    `entry` overrides the repository entry's keys."""

    def __init__(self, outcomes: dict[str, ModelParts | Exception], **entry: object) -> None:
        self.metrics = ServiceMetrics()
        self.changes = 0
        self.loading = threading.Event()
        self.go = threading.Event()
        self._outcomes = outcomes
        self.manager = ModelManager(
            [ModelConfig(name=name, **{**DIGITS, **entry}) for name in outcomes],
            default_backend="eager",
            default_queue_size=8,
            metrics=self.metrics,
            on_change=self._changed,
            load_parts=self._load,
        )

    def _load(self, config: ModelConfig, backend_kind: str) -> ModelParts:
        assert backend_kind == "eager"  # the server's default, resolved before loading
        self.loading.set()
        assert self.go.wait(timeout=10), "test never let the loader go"
        outcome = self._outcomes[config.name]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def _changed(self) -> None:
        self.changes += 1

    def ready_gauge(self, name: str) -> float:
        return self.metrics.registry.get_sample_value("resnet_model_ready", {"model": name})

    async def settle(self) -> None:
        self.go.set()
        await wait_until(lambda: self.manager.settled)


async def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    async def poll():
        while not condition():
            await asyncio.sleep(0.005)

    await asyncio.wait_for(poll(), timeout_s)


def test_models_load_to_ready_or_failed_and_only_a_ready_one_has_a_batcher():
    backend = FakeBackend()
    harness = Harness({"good": parts_of(backend), "bad": WeightsUnavailableError("no checkpoint offline")})
    manager = harness.manager

    async def main():
        manager.start_loading()
        await asyncio.to_thread(harness.loading.wait, 10)
        assert [type(model.state) for model in manager.models] == [Loading, Loading]
        assert not manager.settled and not manager.any_ready and harness.ready_gauge("good") == 0
        with pytest.raises(ModelNotReadyError, match="'good' is not ready: loading"):
            manager.ready_model("good")
        with pytest.raises(ModelNotFoundError, match="no model named 'typo'; models: good, bad"):
            manager.find("typo")

        await harness.settle()
        good, bad = manager.models
        assert isinstance(good.state, Ready) and good.ready and good.reason == ""
        assert bad.state == Failed("WeightsUnavailableError: no checkpoint offline") and bad.loaded is None
        assert manager.any_ready and harness.changes == 2
        assert (harness.ready_gauge("good"), harness.ready_gauge("bad")) == (1, 0)
        with pytest.raises(ModelNotReadyError, match="WeightsUnavailableError: no checkpoint offline"):
            manager.ready_model("bad")

        loaded = manager.ready_model("good")
        assert isinstance(loaded, Loaded) and loaded is good.loaded
        assert (loaded.name, loaded.backend, loaded.output.num_classes) == ("good", backend, CLASSES)
        assert loaded.preprocessing == digits.INPUT and loaded.precision.name == "float32"
        x = torch.randn(2, 3, 4, 4)
        result = await loaded.batcher.submit(x)
        torch.testing.assert_close(result.logits, x.mean(dim=(2, 3)), rtol=0, atol=0)
        await manager.stop()

    asyncio.run(main())


def test_the_batcher_is_given_the_backends_preferred_batch_sizes():
    harness = Harness({"bucketed": parts_of(FakeBackend(preferred_batch_sizes=(1, 2, 4)))})

    async def main():
        harness.manager.start_loading()
        await harness.settle()
        assert harness.manager.ready_model("bucketed").batcher.preferred_batch_sizes == (1, 2, 4)
        await harness.manager.stop()

    asyncio.run(main())


class LaunchingBackend(FakeBackend):
    """Keeps batches in flight (service/backends/base.py, LaunchesBatches): the batcher must launch, never run."""

    def run(self, batch: torch.Tensor) -> torch.Tensor:
        raise AssertionError("a backend that launches batches is not run")

    def launch(self, parts: list[torch.Tensor]) -> Callable[[], torch.Tensor]:
        logits = torch.cat(parts).mean(dim=(2, 3)) + 1.0
        return lambda: logits


def test_a_backend_that_launches_batches_is_launched_and_the_policy_comes_from_the_entry():
    harness = Harness({"launching": parts_of(LaunchingBackend())}, bucket_policy=BucketPolicy.FILL)

    async def main():
        harness.manager.start_loading()
        await harness.settle()
        batcher = harness.manager.ready_model("launching").batcher
        assert batcher.bucket_policy is BucketPolicy.FILL
        x = torch.randn(2, 3, 4, 4)
        torch.testing.assert_close((await batcher.submit(x)).logits, x.mean(dim=(2, 3)) + 1.0, rtol=0, atol=0)
        await harness.manager.stop()

    asyncio.run(main())


def test_a_model_whose_batcher_cannot_start_fails_with_the_reason():
    # Sizes past max_batch_size (4) are a backend the batcher cannot serve: that model fails, the others serve.
    harness = Harness({"odd": parts_of(FakeBackend(preferred_batch_sizes=(8,))), "fine": parts_of(FakeBackend())})

    async def main():
        harness.manager.start_loading()
        await harness.settle()
        odd, fine = harness.manager.models
        assert isinstance(odd.state, Failed) and "preferred_batch_sizes must ascend within 1..4" in odd.reason
        assert fine.ready
        await harness.manager.stop()

    asyncio.run(main())


def test_unload_drains_queued_work_then_refuses_and_load_serves_again():
    backend = FakeBackend(hold=True)
    harness = Harness({"busy": parts_of(backend)})
    manager = harness.manager

    async def main():
        manager.start_loading()
        await harness.settle()
        queued = manager.ready_model("busy")
        in_flight = asyncio.create_task(queued.batcher.submit(torch.randn(1, 3, 4, 4)))
        await asyncio.to_thread(backend.running.wait, 10)
        unloading = asyncio.create_task(manager.unload("busy"))
        await wait_until(lambda: isinstance(manager.find("busy").state, Draining))
        with pytest.raises(ModelNotReadyError, match="'busy' is not ready: draining"):
            manager.ready_model("busy")
        with pytest.raises(ModelNotReadyError, match="draining; load it once that has finished"):
            await manager.load("busy")
        backend.release.set()
        assert (await in_flight).logits.shape == (1, CLASSES)  # answered before the unload finished
        await unloading
        assert manager.find("busy").state == Unloaded() and harness.ready_gauge("busy") == 0
        assert manager.settled  # still: the server stays ready through a client's unload and load
        with pytest.raises(ModelNotReadyError, match="'busy' is not ready: unloaded"):
            manager.ready_model("busy")
        await manager.unload("busy")  # nothing left to unload: not an error

        await manager.load("busy")
        reloaded = manager.ready_model("busy")
        assert reloaded is not queued and harness.ready_gauge("busy") == 1
        assert (await reloaded.batcher.submit(torch.randn(2, 3, 4, 4))).logits.shape == (2, CLASSES)
        await manager.load("busy")  # already serving: nothing to do
        assert manager.ready_model("busy") is reloaded
        with pytest.raises(ModelNotFoundError, match="no model named 'typo'"):
            await manager.unload("typo")
        await manager.stop()

    asyncio.run(main())


def test_unload_waits_for_requests_in_flight_before_it_stops_the_batcher():
    harness = Harness({"m": parts_of(FakeBackend())})
    manager = harness.manager

    async def main():
        manager.start_loading()
        await harness.settle()
        async with manager.serving("m") as loaded:  # a request still decoding its input
            unloading = asyncio.create_task(manager.unload("m"))
            await wait_until(lambda: isinstance(manager.find("m").state, Draining))
            with pytest.raises(ModelNotReadyError, match="draining"):
                async with manager.serving("m"):
                    pass
            await asyncio.sleep(0.05)
            assert not unloading.done()
            # Its batcher still runs for it.
            assert (await loaded.batcher.submit(torch.randn(1, 3, 4, 4))).logits.shape == (1, CLASSES)
        await asyncio.wait_for(unloading, 10)
        assert manager.find("m").state == Unloaded()
        with pytest.raises(BatcherStoppedError):
            await loaded.batcher.submit(torch.randn(1, 3, 4, 4))
        await manager.stop()

    asyncio.run(main())


def test_a_load_that_fails_raises_its_reason_and_leaves_the_model_failed():
    harness = Harness({"bad": WeightsUnavailableError("no checkpoint offline")})
    manager = harness.manager

    async def main():
        manager.start_loading()
        await harness.settle()
        with pytest.raises(ModelLoadError, match="'bad' failed to load: WeightsUnavailableError: no checkpoint"):
            await manager.load("bad")
        assert isinstance(manager.find("bad").state, Failed)
        await manager.stop()

    asyncio.run(main())


def test_stop_drains_ready_models_finishing_queued_work_and_refusing_new():
    backend = FakeBackend(hold=True)
    harness = Harness({"busy": parts_of(backend)})
    manager = harness.manager

    async def main():
        manager.start_loading()
        await harness.settle()
        loaded = manager.ready_model("busy")
        in_flight = asyncio.create_task(loaded.batcher.submit(torch.randn(1, 3, 4, 4)))
        await asyncio.to_thread(backend.running.wait, 10)
        stopping = asyncio.create_task(manager.stop())
        await wait_until(lambda: isinstance(manager.find("busy").state, Draining))
        assert harness.ready_gauge("busy") == 0 and manager.find("busy").reason == "draining"
        with pytest.raises(ModelNotReadyError, match="draining"):
            manager.ready_model("busy")
        with pytest.raises(BatcherStoppedError):
            await loaded.batcher.submit(torch.randn(1, 3, 4, 4))
        backend.release.set()
        assert (await in_flight).logits.shape == (1, 3)  # queued before the drain: answered
        await stopping

    asyncio.run(main())


def test_a_model_still_loading_when_the_server_stops_never_becomes_ready():
    harness = Harness({"late": parts_of(FakeBackend())})

    async def main():
        harness.manager.start_loading()
        await asyncio.to_thread(harness.loading.wait, 10)
        await harness.manager.stop()
        harness.go.set()
        await asyncio.sleep(0.2)  # the loader hands its outcome over; the stopped manager drops it
        assert isinstance(harness.manager.find("late").state, Loading) and harness.changes == 0

    asyncio.run(main())


# A placeholder payload: the lifecycle never looks inside it.
LOADED = Loaded("m", FLOAT32, FakeBackend(), None, digits.INPUT, OutputSpec(("a",)))


@pytest.mark.parametrize(
    ("start", "target"),
    [
        (Loading(), Draining(LOADED)),
        (Failed("x"), Ready(LOADED)),
        (Draining(LOADED), Loading()),  # a model reloads only once it is Unloaded
        (Unloaded(), Ready(LOADED)),  # through Loading only
        (Ready(LOADED), Loading()),
        (Ready(LOADED), Failed("x")),
        (Draining(LOADED), Ready(LOADED)),
    ],
    ids=lambda state: type(state).__name__,
)
def test_transitions_outside_the_lifecycle_are_refused(start, target):
    model = ServedModel(ModelConfig(name="m", **DIGITS), backend_kind="eager", max_queue_size=1, state=start)
    with pytest.raises(RuntimeError, match="no transition"):
        model.enter(target)
    assert model.state == start


def test_the_real_loader_serves_digits_on_eager_like_the_model_itself():
    metrics = ServiceMetrics()

    async def noop() -> None:
        pass

    manager = ModelManager(
        [ModelConfig(name="digits", weights="pretrained", backend="eager", **DIGITS)],
        default_backend="onnxruntime",  # the entry's own backend wins
        default_queue_size=8,
        metrics=metrics,
        on_change=noop,
    )
    images = digits.load_split()[1].images[:3]
    x = digits.preprocess_images(images)
    with torch.inference_mode():
        expected = models.build("digits_resnet", "pretrained")(x)

    async def main():
        manager.start_loading()
        await wait_until(lambda: manager.settled, timeout_s=120)
        loaded = manager.ready_model("digits")
        assert loaded.backend.name == "eager" and loaded.output.labels == tuple("0123456789")
        result = await loaded.batcher.submit(x)
        await manager.stop()
        return result.logits

    assert_relative_close(asyncio.run(main()), expected, CROSS_BACKEND_TOLERANCE, what="served digits logits")

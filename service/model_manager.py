"""The served models by name, each in one state of its lifecycle (service/lifecycle.py), loaded in the background.

Models load one after the other, in repository order, in a daemon thread (build the network, its labels, its
backend: export, compile, warm up), so the server answers health and metadata calls from the first moment, and a
model that fails to load (weights that can't be had, a backend this machine lacks) is Failed with the reason while
the others serve. One at a time because loading is not thread-safe: torch.onnx.export keeps global state, and a CUDA
graph capture fails when another thread touches the GPU meanwhile. Every state change happens on the event loop,
where the batchers live: the loader thread hands each outcome over and the loop starts the batcher.

At run time a client may unload a model (RepositoryModelUnload: it drains, then answers UNAVAILABLE) and load one
of the repository again (RepositoryModelLoad), in a worker thread under the same lock as the startup loads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from models.pretrained import WeightsUnavailableError
from service.backends import BackendUnavailableError, LaunchesBatches, resolve_backend_kind
from service.batcher import DynamicBatcher
from service.lifecycle import Draining, Failed, Loaded, Loading, ModelState, Ready, ServedModel, Unloaded
from service.metrics import ServiceMetrics
from service.model_loader import ModelParts, load_model_parts
from service.repository import ModelConfig
from service.served_models import ModelNotReadyError, ModelTable
from service.statistics import InferenceStatistics, ModelStats

logger = logging.getLogger(__name__)

# Failures that say what is wrong in their message; anything else is logged with its traceback.
_EXPECTED_LOAD_ERRORS = (WeightsUnavailableError, BackendUnavailableError, OSError, ValueError)

LoadParts = Callable[[ModelConfig, str], ModelParts]  # (entry, resolved backend kind) -> parts; blocking


class ModelLoadError(ModelNotReadyError):
    """A load asked for at run time failed; the message holds the reason (UNAVAILABLE, as the model is)."""


class ModelManager(ModelTable):
    """The served models by name. `on_change` is awaited on the event loop after each model settles.

    `load_parts` is the blocking loader (service/model_loader.py); tests pass a fast one. `statistics` counts every
    model's requests and batches in Triton's terms (service/statistics.py).
    """

    def __init__(
        self,
        configs: Sequence[ModelConfig],
        *,
        default_backend: str,
        default_queue_size: int,
        metrics: ServiceMetrics,
        on_change: Callable[[], Awaitable[None]],
        load_parts: LoadParts = load_model_parts,
        statistics: InferenceStatistics | None = None,
    ) -> None:
        super().__init__(
            ServedModel(
                config,
                backend_kind=resolve_backend_kind(config.backend or default_backend),
                max_queue_size=config.max_queue_size or default_queue_size,
            )
            for config in configs
        )
        self._metrics = metrics
        self._on_change = on_change
        self._load_parts = load_parts
        self.statistics = statistics or InferenceStatistics()
        self._load_lock = threading.Lock()  # one load at a time (see above)
        self._started_up = not self._models  # every model has settled once
        self._in_flight: Counter[str] = Counter()  # requests inside `serving(name)`, by model
        self._in_flight_changed = asyncio.Condition()
        self._stopped = False
        self._loader: threading.Thread | None = None
        for name in self._models:
            metrics.model_ready.labels(name).set(0)

    @property
    def settled(self) -> bool:
        """Every model has finished its startup load, one way or the other (a load at run time leaves this true, so
        the server stays ready meanwhile)."""
        return self._started_up

    @contextlib.asynccontextmanager
    async def serving(self, name: str) -> AsyncIterator[Loaded]:
        """`ready_model(name)`, counted in flight until the block ends: an unload lets every such request finish
        (its batcher still runs) before it stops the batcher."""
        loaded = self.ready_model(name)
        self._in_flight[name] += 1
        try:
            yield loaded
        finally:
            self._in_flight[name] -= 1
            async with self._in_flight_changed:
                self._in_flight_changed.notify_all()

    def request_statistics(self, name: str) -> ModelStats:
        return self.statistics.of(name)

    async def statistics_snapshot(self) -> InferenceStatistics:
        return self.statistics

    def start_loading(self) -> None:
        """Starts the loader thread and returns at once."""
        loop = asyncio.get_running_loop()
        self._loader = threading.Thread(target=self._load_all, args=(loop,), name="model-loader", daemon=True)
        self._loader.start()

    async def wait_for_loader(self, timeout_s: float) -> bool:
        """After `stop`: waits up to `timeout_s` for the model being loaded to finish (no other one starts); True when
        the loader thread has ended."""
        loader = self._loader
        if loader is None:
            return True
        await asyncio.to_thread(loader.join, timeout_s)
        if loader.is_alive():
            loading = [model.name for model in self._models.values() if isinstance(model.state, Loading)]
            logger.warning("still loading %s after %.1f s; leaving it unfinished", ", ".join(loading), timeout_s)
        return not loader.is_alive()

    async def load(self, name: str) -> None:
        """Loads model `name` of the repository again after an unload or a failure; nothing to do when it serves.
        ModelNotReadyError while it is loading or draining, ModelLoadError when the load fails."""
        model = self.find(name)
        if isinstance(model.state, Ready):
            return
        if not isinstance(model.state, Failed | Unloaded):
            raise ModelNotReadyError(f"model {name!r} is {model.reason}; load it once that has finished")
        self._enter(model, Loading())
        outcome, seconds = await asyncio.to_thread(self._load_one, model)
        await self._settle(model, outcome, seconds)
        if not model.ready:
            raise ModelLoadError(f"model {name!r} failed to load: {model.reason}")

    async def unload(self, name: str) -> None:
        """Stops serving model `name`: new requests get UNAVAILABLE at once, those in flight (`serving`) and in its
        queue are answered, then it is Unloaded. Nothing to do when it serves nothing; ModelNotReadyError while it is
        loading or draining."""
        model = self.find(name)
        if isinstance(model.state, Failed | Unloaded):
            return
        if not isinstance(model.state, Ready):
            raise ModelNotReadyError(f"model {name!r} is {model.reason}; unload it once that has finished")
        loaded = model.state.loaded
        self._enter(model, Draining(loaded))
        async with self._in_flight_changed:
            await self._in_flight_changed.wait_for(lambda: not self._in_flight[name])
        await loaded.batcher.stop()
        self._enter(model, Unloaded())
        logger.info("model %s unloaded", name)
        await self._on_change()

    async def stop(self) -> None:
        """Drains every ready model: its batcher finishes the work already queued, then stops. Models still loading
        never start."""
        self._stopped = True
        draining = []
        for model in self._models.values():
            if isinstance(model.state, Ready):
                self._enter(model, Draining(model.state.loaded))
                draining.append(model.state.loaded.batcher)
        await asyncio.gather(*(batcher.stop() for batcher in draining))

    def _enter(self, model: ServedModel, state: ModelState) -> None:
        model.enter(state)
        self._metrics.model_ready.labels(model.name).set(1 if model.ready else 0)

    def _load_all(self, loop: asyncio.AbstractEventLoop) -> None:
        """Loader thread: each model in turn, handing the outcome to the event loop."""
        for model in self._models.values():
            if self._stopped:
                return
            outcome, seconds = self._load_one(model)
            try:
                asyncio.run_coroutine_threadsafe(self._settle(model, outcome, seconds), loop)
            except RuntimeError:  # the loop has closed: the server stopped while this model loaded
                return

    def _load_one(self, model: ServedModel) -> tuple[ModelParts | BaseException, float]:
        """Blocking: the model's parts or the error its load raised, and the seconds it took."""
        with self._load_lock:
            started = time.monotonic()
            try:
                outcome: ModelParts | BaseException = self._load_parts(model.config, model.backend_kind)
            except Exception as error:
                outcome = error
            return outcome, time.monotonic() - started

    async def _settle(self, model: ServedModel, outcome: ModelParts | BaseException, seconds: float) -> None:
        if self._stopped:
            return
        if isinstance(outcome, ModelParts):
            try:
                await self._activate(model, outcome, seconds)
            except Exception as error:
                self._fail(model, error)
        else:
            self._fail(model, outcome)
        if not any(isinstance(served.state, Loading) for served in self._models.values()):
            self._started_up = True
        await self._on_change()

    async def _activate(self, model: ServedModel, parts: ModelParts, seconds: float) -> None:
        config = model.config
        batcher = DynamicBatcher(
            parts.backend.run,
            max_batch_size=config.max_batch_size,
            max_queue_delay_us=config.max_queue_delay_us,
            max_queue_size=model.max_queue_size,
            preferred_batch_sizes=parts.backend.preferred_batch_sizes,
            bucket_policy=config.bucket_policy,
            name=model.name,
            on_batch=_each(self._metrics.batch_observer(model.name), self.statistics.batch_observer(model.name)),
            on_padded_rows=self._metrics.padded_rows.labels(model.name).inc,
            launch_batch=parts.backend.launch if isinstance(parts.backend, LaunchesBatches) else None,
        )
        await batcher.start()
        self._metrics.track_queue_depth(model.name, lambda: batcher.queue_depth)
        loaded = Loaded(model.name, config.precision, parts.backend, batcher, parts.preprocessing, parts.output)
        self._enter(model, Ready(loaded))
        logger.info(
            "model %s ready: %s %s on %s, %d classes, input %d, loaded in %.1f s",
            model.name, config.arch, config.precision.name, model.backend_kind, loaded.output.num_classes,
            config.input_size, seconds,
        )  # fmt: skip

    def _fail(self, model: ServedModel, error: BaseException) -> None:
        self._enter(model, Failed(f"{type(error).__name__}: {error}"))
        logger.error(
            "model %s is not ready: %s",
            model.name, model.reason,
            exc_info=None if isinstance(error, _EXPECTED_LOAD_ERRORS) else error,
        )  # fmt: skip


def _each(*observers: Callable[[int, int, int], None]) -> Callable[[int, int, int], None]:
    """One on_batch callback that calls every observer in turn."""

    def on_batch(size: int, queue_us: int, compute_us: int) -> None:
        for observer in observers:
            observer(size, queue_us, compute_us)

    return on_batch

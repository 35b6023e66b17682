"""Loads every model of the repository in the background and holds what serving one needs.

Models load one after the other, in repository order, in a daemon thread (build the network, its labels, its
backend: export, compile, warm up), so the server answers health and metadata calls from the first moment, and a
model that fails to load (weights that can't be had, a backend this machine lacks) is marked not ready with the
reason while the others serve. One at a time because loading is not thread-safe: torch.onnx.export keeps global
state, and a CUDA graph capture fails when another thread touches the GPU meanwhile. The batcher of a loaded model
is started on the event loop, where it lives.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

import models
from models.pretrained import WeightsUnavailableError
from service.backends import Backend, BackendUnavailableError, create_backend, resolve_backend_kind
from service.batcher import DynamicBatcher
from service.labels import load_labels
from service.metrics import ServiceMetrics
from service.preprocess import PreprocessSpec, spec_for
from service.repository import ModelConfig

logger = logging.getLogger(__name__)

# Failures that say what is wrong in their message; anything else is logged with its traceback.
_EXPECTED_LOAD_ERRORS = (WeightsUnavailableError, BackendUnavailableError, OSError, ValueError)


class ModelNotFoundError(LookupError):
    """No model of that name in the repository (NOT_FOUND)."""


class ModelNotReadyError(RuntimeError):
    """The model is loading or failed to load (UNAVAILABLE)."""


class ModelState(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


@dataclass
class ServedModel:
    """One repository entry and, once READY, everything a request needs."""

    config: ModelConfig
    backend_kind: str  # resolved: "eager" | "fused" | "onnxruntime"
    max_queue_size: int
    state: ModelState = ModelState.LOADING
    reason: str = "loading"  # why it is not ready; empty once READY
    num_classes: int = 0
    dtype: str = ""
    labels: list[str] = field(default_factory=list)
    spec: PreprocessSpec | None = None
    batcher: DynamicBatcher | None = None

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def ready(self) -> bool:
        return self.state is ModelState.READY


@dataclass
class _Loaded:
    backend: Backend
    num_classes: int
    labels: list[str]
    spec: PreprocessSpec


class ModelManager:
    """The served models by name. `on_change` is awaited on the event loop after each model settles."""

    def __init__(
        self,
        configs: Sequence[ModelConfig],
        *,
        default_backend: str,
        default_queue_size: int,
        metrics: ServiceMetrics,
        on_change: Callable[[], Awaitable[None]],
    ) -> None:
        self._models = {
            config.name: ServedModel(
                config,
                backend_kind=resolve_backend_kind(config.backend or default_backend),
                max_queue_size=config.max_queue_size or default_queue_size,
            )
            for config in configs
        }
        self._metrics = metrics
        self._on_change = on_change
        self._stopped = False
        for name in self._models:
            metrics.model_ready.labels(name).set(0)

    @property
    def models(self) -> list[ServedModel]:
        return list(self._models.values())

    @property
    def settled(self) -> bool:
        """Every model has finished loading, one way or the other."""
        return all(model.state is not ModelState.LOADING for model in self._models.values())

    @property
    def any_ready(self) -> bool:
        return any(model.ready for model in self._models.values())

    def is_known(self, name: str) -> bool:
        return name in self._models

    def find(self, name: str) -> ServedModel:
        try:
            return self._models[name]
        except KeyError:
            raise ModelNotFoundError(f"no model named {name!r}; models: {', '.join(self._models)}") from None

    def ready_model(self, name: str) -> ServedModel:
        model = self.find(name)
        if not model.ready:
            raise ModelNotReadyError(f"model {name!r} is not ready: {model.reason}")
        return model

    def start_loading(self) -> None:
        """Starts the loader thread and returns at once."""
        loop = asyncio.get_running_loop()
        threading.Thread(target=self._load_all, args=(loop,), name="model-loader", daemon=True).start()

    async def stop(self) -> None:
        """Finishes the work already queued in every batcher, then stops them. Models still loading never start."""
        self._stopped = True
        batchers = [model.batcher for model in self._models.values() if model.batcher is not None]
        await asyncio.gather(*(batcher.stop() for batcher in batchers))

    def _load_all(self, loop: asyncio.AbstractEventLoop) -> None:
        """Loader thread: each model in turn, handing the outcome to the event loop."""
        for model in self._models.values():
            if self._stopped:
                return
            started = time.monotonic()
            try:
                outcome: _Loaded | BaseException = _load_blocking(model.config, model.backend_kind)
            except Exception as error:
                outcome = error
            seconds = time.monotonic() - started
            try:
                asyncio.run_coroutine_threadsafe(self._settle(model, outcome, seconds), loop)
            except RuntimeError:  # the loop has closed: the server stopped while this model loaded
                return

    async def _settle(self, model: ServedModel, outcome: _Loaded | BaseException, seconds: float) -> None:
        if self._stopped:
            return
        if isinstance(outcome, _Loaded):
            try:
                await self._activate(model, outcome, seconds)
            except Exception as error:
                self._fail(model, error)
        else:
            self._fail(model, outcome)
        await self._on_change()

    async def _activate(self, model: ServedModel, loaded: _Loaded, seconds: float) -> None:
        config = model.config
        batcher = DynamicBatcher(
            loaded.backend.run,
            max_batch_size=config.max_batch_size,
            max_queue_delay_us=config.max_queue_delay_us,
            max_queue_size=model.max_queue_size,
            name=model.name,
            on_batch=self._metrics.batch_observer(model.name),
        )
        await batcher.start()
        model.batcher = batcher
        model.num_classes = loaded.num_classes
        model.labels = loaded.labels
        model.spec = loaded.spec
        model.dtype = str(loaded.backend.dtype).removeprefix("torch.")
        model.state, model.reason = ModelState.READY, ""
        self._metrics.track_queue_depth(model.name, lambda: batcher.queue_depth)
        self._metrics.model_ready.labels(model.name).set(1)
        logger.info(
            "model %s ready: %s %s on %s, %d classes, input %d, loaded in %.1f s",
            model.name, config.arch, model.dtype, model.backend_kind, model.num_classes, config.input_size, seconds,
        )  # fmt: skip

    @staticmethod
    def _fail(model: ServedModel, error: BaseException) -> None:
        model.state, model.reason = ModelState.FAILED, f"{type(error).__name__}: {error}"
        logger.error(
            "model %s is not ready: %s",
            model.name, model.reason,
            exc_info=None if isinstance(error, _EXPECTED_LOAD_ERRORS) else error,
        )  # fmt: skip


def _load_blocking(config: ModelConfig, backend_kind: str) -> _Loaded:
    """The slow part of loading, in a loader thread: cheap checks first, the backend (export, warm-up) last."""
    spec = spec_for(config.arch, config.input_size)
    network = models.build(config.arch, weights=config.weights, seed=config.seed, num_classes=config.num_classes)
    num_classes = _num_classes(network)
    labels = load_labels(config.labels, num_classes)
    backend = create_backend(
        backend_kind,
        network,
        input_size=config.input_size,
        max_batch_size=config.max_batch_size,
        dtype=getattr(torch, config.dtype),
    )
    return _Loaded(backend, num_classes, labels, spec)


def _num_classes(network: nn.Module) -> int:
    """Output width of the classifier head: the last Linear layer's."""
    linears = [module for module in network.modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(network).__name__} has no Linear head to count its classes")
    return linears[-1].out_features

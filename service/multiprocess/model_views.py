"""What the engine tells its frontends of its models: each one's state, and once loaded what the servicers say of it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from service.lifecycle import ModelState
from service.model_manager import ModelManager


@dataclass(frozen=True)
class EngineBackend:
    """The engine's backend of a model, as service.lifecycle.BackendInfo."""

    name: str
    device: torch.device
    preferred_batch_sizes: tuple[int, ...]


@dataclass(frozen=True)
class ModelView:
    name: str
    backend_kind: str
    max_queue_size: int
    state: type[ModelState]
    reason: str
    backend: EngineBackend | None = None  # held while Ready or Draining
    labels: tuple[str, ...] = ()


@dataclass(frozen=True)
class EngineState:
    settled: bool
    models: tuple[ModelView, ...]


def describe(models: ModelManager) -> EngineState:
    views = []
    for model in models.models:
        loaded = model.loaded
        backend = None
        labels: tuple[str, ...] = ()
        if loaded is not None:
            info = loaded.backend
            backend = EngineBackend(info.name, info.device, tuple(info.preferred_batch_sizes))
            labels = loaded.output.labels
        views.append(
            ModelView(
                model.name, model.backend_kind, model.max_queue_size, type(model.state), model.reason, backend, labels
            )
        )
    return EngineState(models.settled, tuple(views))

"""The slow, blocking half of loading one model, run in the loader thread: network, labels, preprocessing, backend.

Cheap checks come first and the backend (export, compile, warm-up) last, so a mistake in the entry fails in
milliseconds. What this returns is turned into a `Loaded` on the event loop, where the model's batcher is started.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

import models
from models.inputs import InputSpec
from service.backends import Backend, create_backend
from service.labels import load_labels
from service.lifecycle import OutputSpec
from service.repository import ModelConfig


@dataclass(frozen=True)
class ModelParts:
    """A loaded model but for its batcher."""

    backend: Backend
    preprocessing: InputSpec
    output: OutputSpec


def load_model_parts(config: ModelConfig, backend_kind: str) -> ModelParts:
    """Build `config`'s network and load it into backend `backend_kind` (resolved). Blocking: seconds to minutes."""
    preprocessing = models.input_spec(config.arch, config.input_size)
    network = models.build(config.arch, weights=config.weights, seed=config.seed, num_classes=config.num_classes)
    output = OutputSpec(tuple(load_labels(config.labels, _num_classes(network))))
    backend = create_backend(
        backend_kind,
        network,
        input_size=config.input_size,
        max_batch_size=config.max_batch_size,
        dtype=config.precision.dtype,
        allow_tf32=config.precision.allow_tf32,
        input_mean=preprocessing.mean,  # Classify sends raw uint8 images, normalized by the backend
        input_std=preprocessing.std,
    )
    return ModelParts(backend, preprocessing, output)


def _num_classes(network: nn.Module) -> int:
    """Output width of the classifier head: the last Linear layer's."""
    linears = [module for module in network.modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(network).__name__} has no Linear head to count its classes")
    return linears[-1].out_features

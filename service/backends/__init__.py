"""Backends: one loaded model that computes batches (eager PyTorch, fused Triton kernels, or ONNX Runtime).

`create_backend` is what the model manager calls; each backend module is imported only when chosen, so serving
with eager never imports onnxruntime or the Triton kernels.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch
from torch import nn

from service.backends.base import (
    BACKEND_CHOICES,
    BACKEND_KINDS,
    Backend,
    BackendUnavailableError,
    LaunchesBatches,
    default_device,
    resolve_backend_kind,
)

__all__ = [
    "BACKEND_CHOICES",
    "BACKEND_KINDS",
    "Backend",
    "BackendUnavailableError",
    "LaunchesBatches",
    "create_backend",
    "resolve_backend_kind",
]

logger = logging.getLogger(__name__)


def create_backend(
    kind: str,
    model: nn.Module,
    *,
    input_size: int,
    max_batch_size: int,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    allow_tf32: bool = False,
    input_mean: Sequence[float] | None = None,
    input_std: Sequence[float] | None = None,
) -> Backend:
    """Load `model` (from models.build, eval mode; the backend takes ownership) into backend `kind`, warmed up.

    Blocking (exports, compiles, captures CUDA graphs, runs warm-up batches): call it off the event loop.
    `device` defaults to CUDA when available. `dtype` is the compute dtype for eager and fused (float16 and bfloat16
    on a GPU); onnxruntime computes in float32 only. `allow_tf32` (float32, fused only): the fused convolutions may
    multiply on TF32 tensor cores; eager would have to switch TF32 on for the whole process (torch.backends flags),
    so it refuses. input_mean, input_std (per channel, 0..1 units, as models.fuse takes them): given, the backend also
    takes raw uint8 NHWC images and normalizes them on its device (base.Backend's two layouts); without them it takes
    normalized float32 NCHW only. Raises BackendUnavailableError when the backend cannot run here, ValueError for a
    dtype it lacks.
    """
    kind = resolve_backend_kind(kind)
    device = torch.device(device) if device is not None else default_device()
    if max_batch_size < 1 or input_size < 1:
        raise ValueError(f"need max_batch_size >= 1 and input_size >= 1, got {max_batch_size} and {input_size}")
    if allow_tf32 and (kind != "fused" or dtype != torch.float32):
        raise ValueError(f"tf32 is a float32 mode of the fused backend only, not of {kind} {dtype}")
    if (input_mean is None) != (input_std is None):
        raise ValueError("input_mean and input_std go together: give both or neither")
    started = time.perf_counter()
    if kind == "eager":
        from service.backends.eager import EagerBackend

        backend: Backend = EagerBackend(
            model, input_size=input_size, device=device, dtype=dtype, input_mean=input_mean, input_std=input_std
        )
    elif kind == "fused":
        from service.backends.fused import FusedBackend

        backend = FusedBackend(
            model,
            input_size=input_size,
            max_batch_size=max_batch_size,
            device=device,
            dtype=dtype,
            allow_tf32=allow_tf32,
            input_mean=input_mean,
            input_std=input_std,
        )
    else:
        if dtype != torch.float32:
            raise ValueError(f"the onnxruntime backend computes in float32 only, not {dtype}")
        from service.backends.onnx import OnnxRuntimeBackend

        backend = OnnxRuntimeBackend(
            model, input_size=input_size, device=device, input_mean=input_mean, input_std=input_std
        )
    logger.info("%s backend on %s ready in %.1f s", backend.name, backend.device, time.perf_counter() - started)
    return backend

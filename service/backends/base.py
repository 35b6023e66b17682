"""What every backend shares: the interface the batcher calls, kind names, and the error for an impossible backend."""

from __future__ import annotations

from typing import Protocol

import torch

BACKEND_KINDS = ("eager", "fused", "onnxruntime")


class BackendUnavailableError(RuntimeError):
    """This backend cannot run here (e.g. fused on a CPU without TRITON_INTERPRET=1); the message says why."""


class Backend(Protocol):
    """One loaded model ready to compute batches.

    ``run`` takes float32 [n, 3, H, W] on the CPU (1 <= n <= max_batch_size) and returns float32 logits
    [n, classes] on the CPU. It is called from one executor thread at a time (backends are not re-entrant) and
    enters torch.inference_mode() itself, since that mode is thread-local.
    """

    name: str  # "eager" | "fused" | "onnxruntime"
    device: torch.device
    dtype: torch.dtype  # compute dtype

    def run(self, batch: torch.Tensor) -> torch.Tensor: ...


def resolve_backend_kind(kind: str) -> str:
    """ "auto" -> "fused" on CUDA, else "onnxruntime"; any other kind is checked and returned as is."""
    if kind == "auto":
        return "fused" if torch.cuda.is_available() else "onnxruntime"
    if kind not in BACKEND_KINDS:
        raise ValueError(f"unknown backend {kind!r}; choose one of auto, {', '.join(BACKEND_KINDS)}")
    return kind


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def warm_up_batch(rows: int, input_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Random float32 [rows, 3, S, S]: the first run allocates, selects kernels and (on CUDA) initializes."""
    return torch.randn(rows, 3, input_size, input_size, device=device)

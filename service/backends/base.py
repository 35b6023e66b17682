"""What every backend shares: the interface the batcher calls, kind names, and the error for an impossible backend."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import torch

# The one list of backend kinds; "auto" (a flag's or a repository entry's value) resolves to one of them.
BACKEND_KINDS = ("eager", "fused", "onnxruntime")
AUTO_BACKEND = "auto"
BACKEND_CHOICES = (AUTO_BACKEND, *BACKEND_KINDS)


class BackendUnavailableError(RuntimeError):
    """This backend cannot run here (e.g. fused on a CPU without TRITON_INTERPRET=1); the message says why."""


class Backend(Protocol):
    """One loaded model ready to compute batches.

    ``run`` takes, on the CPU (1 <= n <= max_batch_size), either of the two batch layouts every backend accepts and
    returns float32 logits [n, classes] on the CPU:
    - raw images, uint8 NHWC [n, S, S, 3] (Classify's decoder and UINT8 ModelInfer), when the backend was given the
      model's mean/std: it normalizes them on its device (inside its graph, or the fused stem's prologue);
    - normalized float32 NCHW [n, 3, S, S] (FP32 ModelInfer; FP16 is widened to float32 at the edge).
    Why two and not one: float -> uint8 would round the client's values, and uint8 -> float32 on the CPU is the 4x
    bytes and the CPU pass the device-side normalization removes. The batcher never mixes them in one batch (it
    batches only requests of one item shape and dtype). ``run`` is called from one executor thread at a time
    (backends are not re-entrant) and enters torch.inference_mode() itself, since that mode is thread-local.

    ``preferred_batch_sizes``: ascending batch sizes this backend computes without waste, where some sizes cost the
    same as a larger one (the fused backend's CUDA graphs: a batch runs padded to the next captured size); empty when
    every size costs what its rows cost. The batcher is given them (service/batcher.py).
    """

    name: str  # one of BACKEND_KINDS
    device: torch.device
    dtype: torch.dtype  # compute dtype
    preferred_batch_sizes: tuple[int, ...]

    def run(self, batch: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class LaunchesBatches(Protocol):
    """A backend that keeps several batches in flight (the fused backend on a GPU: service/backends/inflight.py).

    ``launch`` takes the batch as its requests' parts (each what ``run`` takes, their rows together at most
    max_batch_size), so that it copies each straight into its staging memory with no concatenation first, and queues
    the batch, returning at once (blocking only while all its staging slots are in flight) with the function that
    waits for and returns the whole batch's logits, once. ``launch`` is called from one thread at a time; the
    functions it returns may be called from another.
    """

    def launch(self, parts: Sequence[torch.Tensor]) -> Callable[[], torch.Tensor]: ...


def resolve_backend_kind(kind: str) -> str:
    """ "auto" -> "fused" on CUDA, else "onnxruntime"; any other kind is checked and returned as is."""
    if kind == AUTO_BACKEND:
        return "fused" if torch.cuda.is_available() else "onnxruntime"
    if kind not in BACKEND_KINDS:
        raise ValueError(f"unknown backend {kind!r}; choose one of {', '.join(BACKEND_CHOICES)}")
    return kind


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def is_raw_images(batch: torch.Tensor) -> bool:
    """True for the uint8 NHWC layout, False for the float NCHW one (see Backend)."""
    return batch.dtype == torch.uint8


def refuse_raw_images(kind: str) -> ValueError:
    return ValueError(f"the {kind} backend was built without the model's mean/std, so it takes no uint8 images")


def warm_up_images(rows: int, input_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Random uint8 images [rows, S, S, 3]: the raw-image layout's warm-up."""
    return torch.randint(0, 256, (rows, input_size, input_size, 3), dtype=torch.uint8, device=device)


def warm_up_batch(rows: int, input_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Random float32 [rows, 3, S, S]: the first run allocates, selects kernels and (on CUDA) initializes."""
    return torch.randn(rows, 3, input_size, input_size, device=device)

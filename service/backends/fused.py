"""The fused Triton ResNet (models.fuse): CUDA graphs per batch-size bucket on a GPU, the interpreter on a CPU."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torch import nn

import models
from models.kernel_cache import autotune_outcomes, describe_autotune
from service.backends.base import (
    BackendUnavailableError,
    is_raw_images,
    refuse_raw_images,
    warm_up_batch,
    warm_up_images,
)

logger = logging.getLogger(__name__)


def batch_buckets(max_batch_size: int) -> list[int]:
    """Powers of two below max_batch_size, then max_batch_size itself: [1, 2, 4, ..., max_batch_size]."""
    buckets = [1 << i for i in range(max_batch_size.bit_length()) if 1 << i < max_batch_size]
    return [*buckets, max_batch_size]


class FusedBackend:
    """On CUDA every bucket's forward is captured once as a CUDA graph: a batch of n rows is copied into the
    smallest bucket >= n (rows past n keep stale, finite data: each row's logits depend on that row alone) and the
    graph is replayed, with no Python or launch overhead per kernel, and the buckets are its preferred batch sizes. On a
    CPU it needs TRITON_INTERPRET=1 (set before the kernels are imported) and runs un-graphed, slowly: a correctness
    path, not a serving one.
    With input_mean/input_std (models.fuse's) it also takes uint8 NHWC images, normalized in the stem kernel's
    prologue; on CUDA each layout then has its own graphs (twice the captures at load, one shared memory pool).
    """

    name = "fused"

    def __init__(
        self,
        model: nn.Module,
        *,
        input_size: int,
        max_batch_size: int,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        allow_tf32: bool = False,
        input_mean: Sequence[float] | None = None,
        input_std: Sequence[float] | None = None,
    ) -> None:
        self.device = device
        self.dtype = dtype
        self._takes_images = input_mean is not None
        try:
            self._module = models.fuse(
                model.eval().to(device), dtype, allow_tf32=allow_tf32, input_mean=input_mean, input_std=input_std
            )
        except models.FusedUnavailableError as error:
            raise BackendUnavailableError(
                f"the fused backend cannot run here: {error}. Use --backend onnxruntime or eager on this machine."
            ) from error
        self._graphs: dict[bool, _GraphedBuckets] = {}  # by is_raw_images
        self.preferred_batch_sizes: tuple[int, ...] = ()
        if device.type == "cuda":
            settled = autotune_outcomes()
            pool = torch.cuda.graph_pool_handle()
            layouts = {False: warm_up_batch, True: warm_up_images} if self._takes_images else {False: warm_up_batch}
            for raw, example in layouts.items():
                self._graphs[raw] = _GraphedBuckets(self._module, example, input_size, max_batch_size, device, pool)
            self.preferred_batch_sizes = tuple(batch_buckets(max_batch_size))
            logger.info("%s", describe_autotune(autotune_outcomes() - settled))
        # Under the interpreter there is nothing to compile or autotune, so no warm-up: it would only cost minutes.

    def run(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 [n, H, W, 3] or float32 [n, 3, H, W] (CPU) -> float32 logits [n, classes] (CPU)."""
        raw = is_raw_images(batch)
        if raw and not self._takes_images:
            raise refuse_raw_images(self.name)
        with torch.inference_mode():
            if self._graphs:
                return self._graphs[raw].run(batch)
            x = batch.to(self.device) if raw else batch.to(self.device, torch.float32)
            return self._module(x.contiguous()).float().cpu()


class _GraphedBuckets:
    """One CUDA graph per batch bucket for one input layout (`example(rows, size, device)` makes its warm-up batch),
    with static input and output buffers, all in the memory pool `pool` that the other layout's graphs share."""

    def __init__(
        self,
        module: nn.Module,
        example: Callable[[int, int, torch.device], torch.Tensor],
        input_size: int,
        max_batch_size: int,
        device: torch.device,
        pool: torch.cuda._POOL_HANDLE,  # torch.cuda.graph_pool_handle()
    ) -> None:
        self.buckets = batch_buckets(max_batch_size)
        with torch.inference_mode():
            self._inputs = {b: example(b, input_size, device) for b in self.buckets}
            # Warm-up outside capture, on a side stream as torch.cuda.graphs asks: autotuning, compilation, lazy init.
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for b in self.buckets:
                    module(self._inputs[b])
            torch.cuda.current_stream(device).wait_stream(side)
            # Largest first, so the smaller graphs reuse its pool. Replays are serialized on the one executor thread,
            # so sharing scratch memory between graphs is safe; each output is copied out before the next replay.
            self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
            self._outputs: dict[int, torch.Tensor] = {}
            for b in reversed(self.buckets):
                graph = torch.cuda.CUDAGraph()
                # thread_local: other threads (other models' executors) may use CUDA while this one captures.
                with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                    self._outputs[b] = module(self._inputs[b])
                self._graphs[b] = graph
        logger.info("captured CUDA graphs for batch buckets %s", self.buckets)

    def run(self, batch: torch.Tensor) -> torch.Tensor:
        n = batch.shape[0]
        bucket = next(b for b in self.buckets if b >= n)
        self._inputs[bucket][:n].copy_(batch, non_blocking=True)
        self._graphs[bucket].replay()
        return self._outputs[bucket][:n].float().cpu()  # synchronizes with the replay

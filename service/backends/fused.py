"""The fused Triton ResNet (models.fuse): CUDA graphs per batch-size bucket on a GPU, the interpreter on a CPU."""

from __future__ import annotations

import functools
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
from service.backends.inflight import CopyComputePipeline

logger = logging.getLogger(__name__)


# Batches in flight per model: one uploading while one computes. A third would only queue behind the compute stream
# and hold another max-batch of pinned memory.
STAGING_SLOTS = 2


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
    Up to STAGING_SLOTS batches are in flight (service/backends/inflight.py): one pipeline, so one copy stream and
    one compute stream, for both layouts, whose graphs share scratch memory and so must never replay at once.
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
        self._pipeline: CopyComputePipeline | None = None
        self.preferred_batch_sizes: tuple[int, ...] = ()
        if device.type == "cuda":
            settled = autotune_outcomes()
            pool = torch.cuda.graph_pool_handle()
            layouts = {False: warm_up_batch, True: warm_up_images} if self._takes_images else {False: warm_up_batch}
            for raw, example in layouts.items():
                self._graphs[raw] = _GraphedBuckets(self._module, example, input_size, max_batch_size, device, pool)
            self._pipeline = _new_pipeline(device)
            self.preferred_batch_sizes = tuple(batch_buckets(max_batch_size))
            logger.info("%s", describe_autotune(autotune_outcomes() - settled))
            logger.info(
                "captured CUDA graphs for batch buckets %s; %d batches in flight",
                self.preferred_batch_sizes,
                STAGING_SLOTS,
            )
        # Under the interpreter there is nothing to compile or autotune, so no warm-up: it would only cost minutes.

    def run(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 [n, H, W, 3] or float32 [n, 3, H, W] (CPU) -> float32 logits [n, classes] (CPU)."""
        return self.launch([batch])()

    def launch(self, parts: Sequence[torch.Tensor]) -> Callable[[], torch.Tensor]:
        """Queues the batch made of `parts` (each as `run` takes it, all of one layout: the batcher batches one item
        shape and dtype) and returns the function that waits for its logits (service/backends/base.py,
        LaunchesBatches). On CUDA up to STAGING_SLOTS batches are in flight; under the interpreter the batch is
        computed here, at once."""
        raw = is_raw_images(parts[0])
        if raw and not self._takes_images:
            raise refuse_raw_images(self.name)
        with torch.inference_mode():
            if self._pipeline is not None:
                return self._pipeline.launch(*self._graphs[raw].steps(parts))
            batch = parts[0] if len(parts) == 1 else torch.cat(list(parts))
            x = batch.to(self.device) if raw else batch.to(self.device, torch.float32)
            logits = self._module(x.contiguous()).float().cpu()
        return lambda: logits


def _new_pipeline(device: torch.device) -> CopyComputePipeline:
    compute_stream = torch.cuda.Stream(device)
    compute_stream.wait_stream(torch.cuda.current_stream(device))  # the capture and warm-up wrote the buffers
    return CopyComputePipeline(
        STAGING_SLOTS,
        copy_stream=torch.cuda.Stream(device),
        compute_stream=compute_stream,
        new_event=torch.cuda.Event,
        on_stream=torch.cuda.stream,
    )


class _GraphedBuckets:
    """One CUDA graph per batch bucket for one input layout (`example(rows, size, device)` makes its warm-up batch),
    with static input and output buffers, all in the memory pool `pool` that the other layout's graphs share, and
    the staging of STAGING_SLOTS batches in flight: per slot a pinned host input, a device input and a pinned host
    output. A batch is copied from the caller's memory into its slot's pinned input on the launching thread, then
    host-to-device into the slot's device input on the copy stream; on the compute stream it is copied into the
    bucket's static input (device to device, so the next batch's upload never waits for this replay to finish
    reading the static input), the graph replayed, and the logits copied into the pinned output. Staging takes the
    static input's dtype and shape, whatever the caller's batch tensor is.
    """

    def __init__(
        self,
        module: nn.Module,
        example: Callable[[int, int, torch.device], torch.Tensor],
        input_size: int,
        max_batch_size: int,
        device: torch.device,
        pool: torch.cuda._POOL_HANDLE,  # torch.cuda.graph_pool_handle()
        slots: int = STAGING_SLOTS,
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
            largest_input, largest_output = self._inputs[self.buckets[-1]], self._outputs[self.buckets[-1]]
            pinned = functools.partial(torch.empty, pin_memory=True)
            self._pinned_inputs = [pinned(largest_input.shape, dtype=largest_input.dtype) for _ in range(slots)]
            self._device_inputs = [torch.empty_like(largest_input) for _ in range(slots)]
            self._pinned_outputs = [pinned(largest_output.shape, dtype=torch.float32) for _ in range(slots)]

    def steps(
        self, parts: Sequence[torch.Tensor]
    ) -> tuple[Callable[[int], None], Callable[[int], None], Callable[[int], torch.Tensor]]:
        """The (upload, compute, read) of one batch for CopyComputePipeline.launch; called in inference mode, and
        read may be called from any thread."""
        n = sum(part.shape[0] for part in parts)
        bucket = next(b for b in self.buckets if b >= n)

        def upload(slot: int) -> None:
            # Pageable -> pinned on this thread, each request's rows straight into place (no concatenation first),
            # while the GPU computes the batch before; then one host-to-device copy on the copy stream.
            staged, row = self._pinned_inputs[slot], 0
            for part in parts:
                staged[row : row + part.shape[0]].copy_(part)
                row += part.shape[0]
            self._device_inputs[slot][:n].copy_(staged[:n], non_blocking=True)

        def compute(slot: int) -> None:
            self._inputs[bucket][:n].copy_(self._device_inputs[slot][:n])
            self._graphs[bucket].replay()
            self._pinned_outputs[slot][:n].copy_(self._outputs[bucket][:n], non_blocking=True)

        def read(slot: int) -> torch.Tensor:
            with torch.inference_mode():
                return self._pinned_outputs[slot][:n].clone()  # out of the slot, which the next batch reuses

        return upload, compute, read

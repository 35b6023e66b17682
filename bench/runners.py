"""How bench.model drives a loaded backend from each starting point of a batch ("input"):

- "device": the batch already on the device in the backend's own input dtype and layout; the call is its forward
  alone, logits left on the device. Device time only (no host copies).
- "pinned": the batch in pinned host memory (float32 NCHW, as the service receives it), copied in without blocking,
  logits copied back into pinned memory, then the stream synchronized: the path a server with pinned buffers runs.
- "pageable": the batch in ordinary host memory, logits returned with .cpu(): what the service's backends do today.

A `Runner` splits a backend into `stage` (batch -> the forward's input on the device) and `forward`, so that all three
run the same computation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from bench.common import Skipped

INPUTS = ("device", "pinned", "pageable")


@dataclass(frozen=True)
class Runner:
    """A loaded backend as the benchmark calls it."""

    device: torch.device
    stage: Callable[[torch.Tensor], torch.Tensor]  # float32 [N, 3, H, W], host or device -> the forward's input
    forward: Callable[[torch.Tensor], torch.Tensor]  # -> logits [N, classes], on the device
    host_only: bool = False  # takes and returns host tensors (onnxruntime): pageable rows only


def module_runner(
    module: nn.Module | Callable, device: torch.device, dtype: torch.dtype, memory_format: torch.memory_format
) -> Runner:
    """`module` called on the batch in `dtype` and `memory_format` on `device`."""

    def stage(batch: torch.Tensor) -> torch.Tensor:
        return batch.to(device, dtype, non_blocking=True).contiguous(memory_format=memory_format)

    return Runner(device, stage, module)


class GraphedModule:
    """`module` replayed from one CUDA graph per batch size, captured on first sight with static input and output
    buffers, as the service's fused backend does per batch bucket (service/backends/fused.py)."""

    def __init__(self, module: nn.Module, device: torch.device) -> None:
        self._module, self._device = module, device
        self._pool = torch.cuda.graph_pool_handle()
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}

    def stage(self, batch: torch.Tensor) -> torch.Tensor:
        """Copies `batch` (float32 NCHW) into the static input of its batch size's graph; returns that buffer."""
        if batch.shape[0] not in self._graphs:
            self._capture(batch)
        static_input = self._graphs[batch.shape[0]][1]
        static_input.copy_(batch, non_blocking=True)
        return static_input

    def forward(self, staged: torch.Tensor) -> torch.Tensor:
        """Replays the graph whose static input `staged` is; returns its static output."""
        graph, static_input, static_output = self._graphs[staged.shape[0]]
        if staged.data_ptr() != static_input.data_ptr():
            raise ValueError("forward takes the buffer that stage returned")
        graph.replay()
        return static_output

    def _capture(self, example: torch.Tensor) -> None:
        static_input = torch.empty(example.shape, dtype=torch.float32, device=self._device)
        static_input.copy_(example)
        # Warm-up outside capture, on a side stream as torch.cuda.graphs asks: autotuning, compilation, lazy init.
        side = torch.cuda.Stream(self._device)
        side.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(side):
            self._module(static_input)
        torch.cuda.current_stream(self._device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            static_output = self._module(static_input)
        self._graphs[example.shape[0]] = (graph, static_input, static_output)


def graphed_runner(module: nn.Module, device: torch.device) -> Runner:
    graphed = GraphedModule(module, device)
    return Runner(device, graphed.stage, graphed.forward)


def timed_call(runner: Runner, input_mode: str, batch: torch.Tensor) -> Callable[[], torch.Tensor]:
    """A call that runs `runner` on `batch` (float32 NCHW, pageable host memory) from `input_mode`; it returns the
    logits once they are computed (and, but for "device", copied back). Raises Skipped where the mode cannot run."""
    if input_mode == "pageable":
        return lambda: runner.forward(runner.stage(batch)).float().cpu()
    if runner.host_only:
        raise Skipped("takes and returns host arrays: pageable rows only")
    if input_mode == "device":
        staged = runner.stage(batch.to(runner.device))
        return lambda: runner.forward(staged)
    if input_mode != "pinned":
        raise ValueError(f"input must be one of {', '.join(INPUTS)}, got {input_mode!r}")
    if runner.device.type != "cuda":
        raise Skipped("pinned host memory needs CUDA")
    host_input = batch.pin_memory()
    host_output: list[torch.Tensor] = []  # allocated on the first (warm-up) call, when the logits' shape is known

    def pinned_call() -> torch.Tensor:
        logits = runner.forward(runner.stage(host_input)).float()
        if not host_output:
            host_output.append(torch.empty(logits.shape, dtype=torch.float32, pin_memory=True))
        host_output[0].copy_(logits, non_blocking=True)
        torch.cuda.current_stream(runner.device).synchronize()
        return host_output[0]

    return pinned_call

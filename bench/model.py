"""End to end, per backend: images/s and latency of a whole ResNet (random weights) at each batch size, from each
starting point of the batch.

Every row carries its "input" (bench/runners.py): "device" (the batch already on the device in the backend's own
dtype and layout, logits left there: device time only), "pinned" (pinned host memory in and out, as a server with
pinned buffers runs) or "pageable" (float32 NCHW in ordinary host memory in, float32 logits out with .cpu(): what the
service's backends do today). Backends:

- eager: the unfused model, NCHW; eager-channels-last: the same, channels_last (what the service's eager backend runs);
- onnxruntime: float32 only (the service's ONNX Runtime backend); it takes host arrays, so pageable rows only;
- compile: torch.compile (default mode, dynamic=False) of the channels_last eager model; compile-graphs: the same in
  mode="reduce-overhead" (its CUDA graphs, GPU only): the like-for-like rival of fused-graphs; compile-max-autotune:
  mode="max-autotune" (Inductor's template autotuning and its CUDA graphs). All within --compile-budget-s;
- fused: our Triton kernels (models.fuse), launched one by one; fused-graphs: the same replayed from one CUDA graph
  per batch size, as the service's fused backend does per batch bucket. On a CPU only under TRITON_INTERPRET=1.

Every row also gives its relative error against eager float32 NCHW on the same batch (TF32 off). `--dtype tf32`:
float32 tensors with TF32 products in every backend that has them (cuDNN, cuBLAS, our kernels). Median and p20/p80:
device rows by CUDA events on a GPU ("cuda-events": the GPU's time from the call's start to its end, launch gaps of
the un-graphed backends included), pinned and pageable rows by the host's clock around the synchronized call
("wall"). Writes bench/results/model_<device>_<dtype>_<versions>_<date>.{json,md,png}; --dry-run lists the rows.

    python -m bench.model [--device cuda] [--dtype bfloat16] [--arch resnet18 resnet50] [--batch 1 8 32 128 256]
        [--inputs device pinned pageable] [--backends fused-graphs compile-max-autotune ...]
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

import models
from bench.common import (
    WALL,
    Column,
    Skipped,
    bench_ms,
    compile_fresh,
    device_timing,
    dry_run,
    ieee_float32,
    kernels_run_on,
    parse_run_args,
    progress,
    pyplot,
    run_and_write,
)
from bench.runners import INPUTS, Runner, graphed_runner, module_runner, timed_call
from models.numerics import relative_error
from models.precision import Precision
from service.backends import create_backend
from service.backends.eager import EagerBackend

ARCHES = ("resnet18", "resnet50")
BACKENDS = (
    "eager",
    "eager-channels-last",
    "onnxruntime",
    "compile",
    "compile-graphs",
    "compile-max-autotune",
    "fused",
    "fused-graphs",
)
COMPILE_MODES = {"compile": "default", "compile-graphs": "reduce-overhead", "compile-max-autotune": "max-autotune"}
# Where CUDA graphs are the point of the backend: on a CPU these rows are skipped, not run without them.
GRAPH_BACKENDS = ("compile-graphs", "fused-graphs")

logger = logging.getLogger("bench.model")


def load(
    kind: str,
    arch: str,
    dtype: torch.dtype,
    device: torch.device,
    input_size: int,
    compile_left: float,
    allow_tf32: bool = False,
) -> Runner:
    """Backend `kind` for a fresh seeded `arch`; raises Skipped when it cannot run here. `allow_tf32` reaches our
    kernels here; eager and compile take TF32 from torch's flags, which parse_run_args sets."""
    model = models.build(arch, weights="random", seed=0)
    if kind in GRAPH_BACKENDS and device.type != "cuda":
        raise Skipped("CUDA graphs need a GPU")
    if kind in ("eager", "eager-channels-last"):
        memory_format = torch.channels_last if kind == "eager-channels-last" else torch.contiguous_format
        return module_runner(model.to(device, dtype, memory_format=memory_format), device, dtype, memory_format)
    if kind == "onnxruntime":
        if dtype != torch.float32:
            raise Skipped("onnxruntime backend computes in float32 only")
        backend = create_backend("onnxruntime", model, input_size=input_size, max_batch_size=1, device=device)
        return Runner(device, stage=lambda batch: batch, forward=backend.run, host_only=True)
    if kind in COMPILE_MODES:
        if compile_left <= 0:
            raise Skipped("compile time budget spent (--compile-budget-s)")
        module = model.to(device, dtype, memory_format=torch.channels_last)
        compiled = compile_fresh(module, mode=COMPILE_MODES[kind])
        return module_runner(compiled, device, dtype, torch.channels_last)
    if not kernels_run_on(device):
        raise Skipped("needs GPU")
    # forward: float32 NCHW on the device (contract 2)
    fused = models.fuse(model.to(device), dtype, allow_tf32=allow_tf32)
    if kind == "fused-graphs":
        return graphed_runner(fused, device)
    return module_runner(fused, device, torch.float32, torch.contiguous_format)


def reference_backend(arch: str, device: torch.device, input_size: int) -> EagerBackend:
    """Eager float32 NCHW: what every row's error is measured against."""
    model = models.build(arch, weights="random", seed=0)
    return EagerBackend(model, input_size=input_size, device=device, channels_last=False)


_UNMEASURED = dict.fromkeys(("rel_err", "median_ms", "p20_ms", "p80_ms", "reps", "timing", "images_per_s"))


def benchmark_rows(
    archs: list[str],
    batches: list[int],
    kinds: list[str],
    dtype: torch.dtype,
    device: torch.device,
    *,
    inputs: Sequence[str] = INPUTS,
    input_size: int = 224,
    compile_budget_s: float = 600.0,
    cpu_seconds: float = 5.0,
    allow_tf32: bool = False,
) -> Iterator[dict]:
    """Yields a row per arch × backend × batch × input as each is measured; one that cannot run here is a skipped row
    (with every measured key None) saying why."""
    compile_left = compile_budget_s
    for arch in archs:
        reference = reference_backend(arch, device, input_size)
        batches_in = {batch: torch.randn(batch, 3, input_size, input_size) for batch in batches}
        with torch.inference_mode(), ieee_float32():
            expected = {batch: reference.run(x) for batch, x in batches_in.items()}
        del reference
        for kind in progress(kinds, f"{arch} backends"):
            dtype_name = Precision(dtype, allow_tf32).name
            base = {"arch": arch, "backend": kind, "dtype": dtype_name, "input_size": input_size}
            started = time.perf_counter()
            try:
                runner = load(kind, arch, dtype, device, input_size, compile_left, allow_tf32)
            except Skipped as skipped:
                for batch in batches:
                    yield from (_skipped(base, batch, mode, str(skipped)) for mode in inputs)
                continue
            with torch.inference_mode():
                for batch in batches:
                    for mode in inputs:
                        yield _measure(base, runner, batch, mode, batches_in[batch], expected[batch], cpu_seconds)
            if kind in COMPILE_MODES:
                compile_left -= time.perf_counter() - started
            del runner


def _skipped(base: dict, batch: int, mode: str, reason: str) -> dict:
    return base | {"batch": batch, "input": mode, "status": "skipped", "reason": reason} | _UNMEASURED


def _measure(
    base: dict, runner: Runner, batch: int, mode: str, x: torch.Tensor, expected: torch.Tensor, budget_s: float
) -> dict:
    try:
        call = timed_call(runner, mode, x)
    except Skipped as skipped:
        return _skipped(base, batch, mode, str(skipped))
    row = base | {"batch": batch, "input": mode, "status": "ok", "reason": None}
    # Also compiles, captures and warms up.
    row["rel_err"] = relative_error(call().float().cpu(), expected, dtype=torch.float32)
    row |= bench_ms(call, device_timing(runner.device) if mode == "device" else WALL, budget_s=budget_s)
    row["images_per_s"] = batch / (row["median_ms"] / 1e3)
    return row


def plan(
    archs: list[str], batches: list[int], kinds: list[str], inputs: Sequence[str], device: torch.device
) -> list[str]:
    """One line per row `benchmark_rows` would yield (what --dry-run lists)."""
    lines = []
    for arch in archs:
        for kind in kinds:
            for batch in batches:
                for mode in inputs:
                    timing = device_timing(device) if mode == "device" else WALL
                    lines.append(f"{arch} {kind}, batch {batch}, input {mode}: timing {timing}")
    return lines


COLUMNS = (
    Column("model", "arch"),
    Column("backend", "backend"),
    Column("batch", "batch"),
    Column("input", "input"),
    Column("images/s", "images_per_s", "{:.1f}"),
    Column("median ms", "median_ms", "{:.2f}"),
    Column("p20 ms", "p20_ms", "{:.2f}"),
    Column("p80 ms", "p80_ms", "{:.2f}"),
    Column("rel. error", "rel_err", "{:.1e}"),
    Column("timing", "timing"),
    Column("note", "reason"),
)


_LINE_STYLES = {"device": "-", "pinned": "--", "pageable": ":"}


def plot(rows: list[dict], path: Path, title: str) -> None:
    """One panel per model: images/s against batch, one line per backend and input (log-log)."""
    plt = pyplot()
    rows = [row for row in rows if row["status"] == "ok"]
    if plt is None or not rows:
        return
    archs = list(dict.fromkeys(row["arch"] for row in rows))
    fig, axes = plt.subplots(1, len(archs), figsize=(7 * len(archs), 5), squeeze=False)
    for ax, arch in zip(axes[0], archs, strict=True):
        for index, kind in enumerate(BACKENDS):
            for mode in INPUTS:
                points = [
                    (r["batch"], r["images_per_s"])
                    for r in rows
                    if (r["arch"], r["backend"], r["input"]) == (arch, kind, mode)
                ]
                if points:
                    style = {"color": f"C{index}", "linestyle": _LINE_STYLES[mode], "marker": "o"}
                    ax.plot(*zip(*points, strict=True), **style, label=f"{kind}, {mode}")
        ax.set(xscale="log", yscale="log", xlabel="batch", ylabel="images/s", title=f"{arch}: {title}")
        batches = sorted({r["batch"] for r in rows})
        ax.set_xticks(batches, [str(b) for b in batches], minor=False)
        ax.minorticks_off()
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    logger.info("wrote %s", path)


def main() -> None:
    run = parse_run_args(
        __doc__,
        archs=ARCHES,
        batches=(1, 8, 32, 128, 256),
        choices_flag="--backends",
        choices=BACKENDS,
        inputs=INPUTS,
        compile_budget_s=600.0,
        cpu_seconds=5.0,
    )
    if run.dry_run:
        dry_run(run, plan(run.archs, run.batches, run.choices, run.inputs, run.device))
        return
    rows = benchmark_rows(
        run.archs, run.batches, run.choices, run.dtype, run.device, inputs=run.inputs,
        input_size=run.input_size, compile_budget_s=run.compile_budget_s, cpu_seconds=run.cpu_seconds,
        allow_tf32=run.allow_tf32,
    )  # fmt: skip
    run_and_write(
        rows,
        run,
        name="model",
        question="whole model, per backend: images/s and batch latency from a batch on the device, in pinned or in "
        "pageable host memory",
        columns=COLUMNS,
        title="ResNet end to end",
        plot=plot,
        plot_title="images/s",
    )


if __name__ == "__main__":
    main()

"""End to end, per backend: images/s and latency of a whole ResNet (random weights) at each batch size.

`backend.run(batch)` is timed as served: a float32 NCHW batch on the CPU in, float32 logits on the CPU out (so
host-device copies count). Backends:

- eager: the unfused model, NCHW; eager-channels-last: the same, channels_last (what the service's eager backend runs);
- onnxruntime: float32 only (the service's ONNX Runtime backend);
- compile: torch.compile (default mode, dynamic=False) of the channels_last eager model, within --compile-budget-s;
  compile-graphs: the same in mode="reduce-overhead" (CUDA graphs, GPU only): the like-for-like rival of fused-graphs;
- fused: our Triton kernels (models.fuse), launched one by one; fused-graphs: the service's fused backend, one CUDA
  graph per batch. GPU only: on a CPU those rows say "needs GPU".

Every row also gives its relative error against eager float32 NCHW on the same batch (TF32 off). `--dtype tf32`:
float32 tensors with TF32 products in every backend that has them (cuDNN, cuBLAS, our kernels). Median and p20/p80
(triton.testing.do_bench on a GPU, a perf_counter loop on a CPU). Writes
bench/results/model_<device>_<dtype>_<date>.{json,md,png}.

    python -m bench.model [--device cuda] [--dtype bfloat16] [--arch resnet18 resnet50] [--batch 1 8 32 128 256]
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

import models
from bench.common import (
    Column,
    Skipped,
    bench_ms,
    compile_fresh,
    ieee_float32,
    kernels_run_on,
    parse_run_args,
    progress,
    pyplot,
    run_and_write,
)
from models.numerics import relative_error
from models.precision import Precision
from service.backends import create_backend
from service.backends.base import Backend
from service.backends.eager import EagerBackend

ARCHES = ("resnet18", "resnet50")
BACKENDS = ("eager", "eager-channels-last", "onnxruntime", "compile", "compile-graphs", "fused", "fused-graphs")

logger = logging.getLogger("bench.model")


class ModuleBackend:
    """A module run the way the service's backends run: CPU float32 NCHW in, CPU float32 logits out."""

    def __init__(
        self, name: str, module: nn.Module, device: torch.device, dtype: torch.dtype, channels_last: bool
    ) -> None:
        self.name, self.device, self.dtype = name, device, dtype
        self._module = module
        self._memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def run(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            x = batch.to(self.device, self.dtype).contiguous(memory_format=self._memory_format)
            return self._module(x).float().cpu()


def load(
    kind: str,
    arch: str,
    dtype: torch.dtype,
    device: torch.device,
    input_size: int,
    max_batch: int,
    compile_left: float,
    allow_tf32: bool = False,
) -> Backend:
    """Backend `kind` for a fresh seeded `arch`; raises Skipped when it cannot run here. `allow_tf32` reaches our
    kernels here; eager and compile take TF32 from torch's flags, which parse_run_args sets."""
    model = models.build(arch, weights="random", seed=0)
    loading = {"input_size": input_size, "max_batch_size": max_batch, "device": device}
    if kind == "eager":
        return EagerBackend(model, input_size=input_size, device=device, dtype=dtype, channels_last=False)
    if kind == "eager-channels-last":
        return create_backend("eager", model, **loading, dtype=dtype)
    if kind == "onnxruntime":
        if dtype != torch.float32:
            raise Skipped("onnxruntime backend computes in float32 only")
        return create_backend("onnxruntime", model, **loading)
    if kind in ("compile", "compile-graphs"):
        graphs = kind == "compile-graphs"
        if graphs and device.type != "cuda":
            raise Skipped("CUDA graphs need a GPU")
        if compile_left <= 0:
            raise Skipped("compile time budget spent (--compile-budget-s)")
        module = model.to(device, dtype, memory_format=torch.channels_last)
        options = {"mode": "reduce-overhead"} if graphs else {}
        return ModuleBackend(kind, compile_fresh(module, **options), device, dtype, channels_last=True)
    if not kernels_run_on(device):
        raise Skipped("needs GPU")
    if kind == "fused":
        fused = models.fuse(model.to(device), dtype, allow_tf32=allow_tf32)
        return ModuleBackend(kind, fused, device, torch.float32, channels_last=False)
    if device.type != "cuda":
        raise Skipped("CUDA graphs need a GPU")
    return create_backend("fused", model, **loading, dtype=dtype, allow_tf32=allow_tf32)


def reference_backend(arch: str, device: torch.device, input_size: int) -> Backend:
    """Eager float32 NCHW: what every row's error is measured against."""
    model = models.build(arch, weights="random", seed=0)
    return EagerBackend(model, input_size=input_size, device=device, channels_last=False)


def benchmark_rows(
    archs: list[str],
    batches: list[int],
    kinds: list[str],
    dtype: torch.dtype,
    device: torch.device,
    *,
    input_size: int = 224,
    compile_budget_s: float = 600.0,
    cpu_seconds: float = 5.0,
    allow_tf32: bool = False,
) -> Iterator[dict]:
    """Yields a row per arch × backend × batch as each is measured; a backend that cannot run here gives a skipped
    row per batch."""
    compile_left = compile_budget_s
    for arch in archs:
        reference = reference_backend(arch, device, input_size)
        inputs = {batch: torch.randn(batch, 3, input_size, input_size) for batch in batches}
        with torch.inference_mode(), ieee_float32():
            expected = {batch: reference.run(x) for batch, x in inputs.items()}
        del reference
        for kind in progress(kinds, f"{arch} backends"):
            dtype_name = Precision(dtype, allow_tf32).name
            base = {"arch": arch, "backend": kind, "dtype": dtype_name, "input_size": input_size}
            started = time.perf_counter()
            try:
                backend = load(kind, arch, dtype, device, input_size, max(batches), compile_left, allow_tf32)
            except Skipped as skipped:
                yield from (base | {"batch": b, "status": "skipped", "reason": str(skipped)} for b in batches)
                continue
            for batch in batches:
                x = inputs[batch]
                row = base | {"batch": batch, "status": "ok", "reason": None}
                # also compiles / warms up
                row["rel_err"] = relative_error(backend.run(x), expected[batch], dtype=torch.float32)
                row |= bench_ms(lambda backend=backend, x=x: backend.run(x), backend.device, cpu_budget_s=cpu_seconds)
                row["images_per_s"] = batch / (row["median_ms"] / 1e3)
                yield row
            if kind.startswith("compile"):
                compile_left -= time.perf_counter() - started
            del backend


COLUMNS = (
    Column("model", "arch"),
    Column("backend", "backend"),
    Column("batch", "batch"),
    Column("images/s", "images_per_s", "{:.1f}"),
    Column("median ms", "median_ms", "{:.2f}"),
    Column("p20 ms", "p20_ms", "{:.2f}"),
    Column("p80 ms", "p80_ms", "{:.2f}"),
    Column("rel. error", "rel_err", "{:.1e}"),
    Column("note", "reason"),
)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """One panel per model: images/s against batch, one line per backend (log-log)."""
    plt = pyplot()
    rows = [row for row in rows if row["status"] == "ok"]
    if plt is None or not rows:
        return
    archs = list(dict.fromkeys(row["arch"] for row in rows))
    fig, axes = plt.subplots(1, len(archs), figsize=(6 * len(archs), 4), squeeze=False)
    for ax, arch in zip(axes[0], archs, strict=True):
        for kind in BACKENDS:
            points = [
                (r["batch"], r["images_per_s"])
                for r in rows
                if (r["arch"], r["backend"], r["status"]) == (arch, kind, "ok")
            ]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=kind)
        ax.set(xscale="log", yscale="log", xlabel="batch", ylabel="images/s", title=f"{arch}: {title}")
        batches = sorted({r["batch"] for r in rows})
        ax.set_xticks(batches, [str(b) for b in batches], minor=False)
        ax.minorticks_off()
        ax.legend(fontsize=7)
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
        compile_budget_s=600.0,
        cpu_seconds=5.0,
    )
    rows = benchmark_rows(
        run.archs, run.batches, run.choices, run.dtype, run.device,
        input_size=run.input_size, compile_budget_s=run.compile_budget_s, cpu_seconds=run.cpu_seconds,
        allow_tf32=run.allow_tf32,
    )  # fmt: skip
    run_and_write(
        rows,
        run,
        name="model",
        question="whole model, per backend: images/s and batch latency, CPU tensors in and out",
        columns=COLUMNS,
        title="ResNet end to end",
        plot=plot,
        plot_title="images/s",
    )


if __name__ == "__main__":
    main()

"""Per layer: the kernel time of every convolution of the fused ResNet, and the config its autotuner chose.

At each batch the fused model (models.fuse, random weights) runs once to tune and record, then --reps times under
torch.profiler. Each convolution runs inside a record_function range named after its torchvision module (conv1 for
the stem, layer1.0.conv2, layer2.0.downsample), so the profiler attributes to it the kernels it launched: on a GPU
their CUDA time as CUPTI measured it (timing "profiler-cuda": device only, launch gaps excluded), on a CPU, where the
kernels run in the Triton interpreter, the range's CPU time ("profiler-cpu"). Rows per convolution: median and
p20/p80 over the passes, its share of the forward's kernel time, TFLOP/s, and from kernels.autotune the autotuner,
the config and whether it was tuned in this process or read from --kernel-cache-dir; then per batch the sum of the
convolutions, the other kernels (input cast, max pool, head) and the whole forward. Writes
bench/results/layers_<device>_<dtype>_<versions>_<date>.{json,md}; --dry-run lists the rows.

    python -m bench.layers [--device cuda] [--dtype bfloat16] [--arch resnet50] [--batch 1 128] [--reps 10]
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

import models
from bench.common import (
    PROFILER_CPU,
    PROFILER_CUDA,
    Column,
    Skipped,
    dry_run,
    kernels_run_on,
    parse_run_args,
    run_and_write,
)
from kernels import Launch, autotuners, describe_config, recording_launches

ARCHES = ("resnet18", "resnet50", "preact_resnet18", "preact_resnet50")
FORWARD = "forward"

logger = logging.getLogger("bench.layers")


def named_convs(model: nn.Module, fused: nn.Module) -> list[tuple[str, nn.Module]]:
    """(torchvision module name, fused convolution) of every convolution of `fused` = models.fuse(`model`), in the
    order a block runs them (its shortcut, "downsample", first)."""
    convs = [("conv1", fused.stem)]
    layers = [model.layer1, model.layer2, model.layer3, model.layer4]  # fused.blocks is these, flattened
    names = [f"layer{i}.{j}" for i, layer in enumerate(layers, start=1) for j in range(len(layer))]
    for name, block in zip(names, fused.blocks, strict=True):
        if block.shortcut is not None:
            convs.append((f"{name}.downsample", block.shortcut))
        convs += [(f"{name}.conv{j}", conv) for j, conv in enumerate(block.convs, start=1)]
    return convs


@dataclass
class ConvRecord:
    """What one forward pass showed of a convolution: shapes, whether it added a residual, its autotuned launches."""

    in_shape: tuple[int, ...] = ()  # NHWC
    out_shape: tuple[int, ...] = ()
    residual: bool = False
    launches: list[Launch] = field(default_factory=list)


class ConvProbe:
    """Hooks on every convolution: a profiler range named after it around each call, and, during `record`, its shapes
    and the autotuned launches it made."""

    def __init__(self, convs: list[tuple[str, nn.Module]]) -> None:
        self.records = {name: ConvRecord() for name, _ in convs}
        self._launches: list[Launch] | None = None
        self._first_launch = 0
        self._range: record_function | None = None
        self._handles = []
        for name, conv in convs:
            self._handles.append(conv.register_forward_pre_hook(self._enter(name), with_kwargs=True))
            self._handles.append(conv.register_forward_hook(self._exit(name)))

    def _enter(self, name: str):
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            if self._launches is not None:
                record = self.records[name]
                record.in_shape, record.residual = tuple(args[0].shape), kwargs.get("residual") is not None
                self._first_launch = len(self._launches)
            self._range = record_function(name).__enter__()

        return hook

    def _exit(self, name: str):
        def hook(_module: nn.Module, _args: tuple, out: torch.Tensor) -> None:
            self._range.__exit__(None, None, None)
            if self._launches is not None:
                self.records[name].out_shape = tuple(out.shape)
                self.records[name].launches = self._launches[self._first_launch :]

        return hook

    def record(self, run_once: Callable[[], object]) -> None:
        """Runs `run_once()` with shapes and launches recorded."""
        with recording_launches() as launches:
            self._launches = launches
            try:
                run_once()
            finally:
                self._launches = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def conv_flops(conv: nn.Module, record: ConvRecord) -> int:
    """2 × multiply-adds: each output element sums R·S·C products."""
    (r, s), c = conv.kernel_size, conv.in_channels
    return 2 * int(np.prod(record.out_shape)) * r * s * c


def conv_kind(conv: nn.Module, record: ConvRecord) -> str:
    """What a fused convolution computes, e.g. "3x3/2 +relu" or "1x1/1 prologue +residual"."""
    (r, s), stride = conv.kernel_size, conv.stride[0]
    flags = {"prologue": conv.prologue_scale is not None, "+residual": record.residual, "+relu": conv.relu}
    return " ".join([f"{r}x{s}/{stride}", *(flag for flag, on in flags.items() if on)])


def profile_times(model: nn.Module, x: torch.Tensor, names: list[str], reps: int, cuda: bool) -> dict[str, list[float]]:
    """Milliseconds of each named range (and FORWARD) in each of `reps` profiled passes: the CUDA time of the kernels
    launched inside it on a GPU, its CPU time otherwise."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(reps):
            with record_function(FORWARD):
                model(x)
        if cuda:
            torch.cuda.synchronize()
    times: dict[str, list[float]] = {name: [] for name in [*names, FORWARD]}
    for event in prof.events():
        # Each range is also mirrored on the GPU's timeline (device_type CUDA); its CPU event holds the kernel times.
        if event.name in times and event.device_type == DeviceType.CPU:
            micros = event.device_time_total if cuda else event.cpu_time_total
            times[event.name].append(micros / 1e3)
    missing = [name for name, values in times.items() if len(values) != reps]
    if missing:
        raise RuntimeError(f"the profiler saw {reps} passes but not every range in each: {missing[:5]}")
    if cuda and sum(sum(times[name]) for name in names) == 0:
        raise RuntimeError("the profiler attributed no CUDA kernel to any convolution range")
    return times


def _quantiles(values: list[float]) -> dict:
    median, p20, p80 = (float(np.quantile(values, q)) for q in (0.5, 0.2, 0.8))
    return {"median_ms": median, "p20_ms": p20, "p80_ms": p80}


def _chosen(launches: list[Launch]) -> dict:
    """The autotuner, config and how it was chosen, of a convolution's launches (one, for today's kernels)."""
    if not launches:
        return {"autotuner": None, "config": None, "chosen": "interpreter: one fixed tile per launch"}
    tuners = autotuners()
    return {
        "autotuner": " + ".join(launch.autotuner for launch in launches),
        "config": " + ".join(describe_config(launch.config) for launch in launches),
        "chosen": " + ".join(tuners[launch.autotuner].outcomes.get(launch.key, "?") for launch in launches),
    }


def layer_rows(arch: str, batch: int, dtype: torch.dtype, device: torch.device, input_size: int, reps: int) -> list:
    """The rows of one arch at one batch: one per convolution, then the convolutions' sum, the rest, the forward."""
    if not kernels_run_on(device):
        raise Skipped("needs GPU (or TRITON_INTERPRET=1 on a CPU)")
    model = models.build(arch, weights="random", seed=0).to(device)
    fused = models.fuse(model, dtype)
    convs = named_convs(model, fused)
    probe = ConvProbe(convs)
    x = torch.randn(batch, 3, input_size, input_size, device=device)
    cuda = device.type == "cuda"
    try:
        with torch.inference_mode():
            probe.record(lambda: fused(x))  # tunes (or reads) every config, records which
            times = profile_times(fused, x, [name for name, _ in convs], reps, cuda)
    finally:
        probe.remove()
    forward_ms = _quantiles(times[FORWARD])["median_ms"]
    base = {"arch": arch, "batch": batch, "dtype": str(dtype).removeprefix("torch."), "input_size": input_size}
    base |= {"status": "ok", "reason": None, "timing": PROFILER_CUDA if cuda else PROFILER_CPU, "reps": reps}
    rows = []
    for name, conv in convs:
        record = probe.records[name]
        row = base | {"layer": name, "kind": conv_kind(conv, record)}
        row |= {"in_shape": record.in_shape, "out_shape": record.out_shape}
        row |= _quantiles(times[name]) | _chosen(record.launches)
        row["share"] = row["median_ms"] / forward_ms
        row["tflops"] = conv_flops(conv, record) / (row["median_ms"] / 1e3) / 1e12
        rows.append(row)
    convs_ms = [sum(times[name][rep] for name, _ in convs) for rep in range(reps)]
    others_ms = [forward - conv for forward, conv in zip(times[FORWARD], convs_ms, strict=True)]
    for layer, values in (("all convolutions", convs_ms), ("other kernels", others_ms), (FORWARD, times[FORWARD])):
        row = base | {"layer": layer} | _quantiles(values)
        rows.append(row | {"share": row["median_ms"] / forward_ms})
    return rows


def benchmark_rows(
    archs: list[str], batches: list[int], dtype: torch.dtype, device: torch.device, *, input_size: int, reps: int
) -> Iterator[dict]:
    for arch in archs:
        for batch in batches:
            try:
                yield from layer_rows(arch, batch, dtype, device, input_size, reps)
            except Skipped as skipped:
                yield {"arch": arch, "batch": batch, "layer": None, "status": "skipped", "reason": str(skipped)}


def plan(archs: list[str], batches: list[int], device: torch.device) -> list[str]:
    """One line per row `benchmark_rows` would yield (what --dry-run lists)."""
    timing = PROFILER_CUDA if device.type == "cuda" else PROFILER_CPU
    lines = []
    for arch in archs:
        convs = [name for name, m in models.build(arch).named_modules() if isinstance(m, nn.Conv2d)]
        layers = [name.removesuffix(".0") for name in convs] + ["all convolutions", "other kernels", FORWARD]
        lines += [f"{arch}, batch {batch}: {layer}, timing {timing}" for batch in batches for layer in layers]
    return lines


COLUMNS = (
    Column("model", "arch"),
    Column("batch", "batch"),
    Column("layer", "layer"),
    Column("conv", "kind"),
    Column("in NHWC", "in_shape"),
    Column("out NHWC", "out_shape"),
    Column("median ms", "median_ms", "{:.4f}"),
    Column("p20 ms", "p20_ms", "{:.4f}"),
    Column("p80 ms", "p80_ms", "{:.4f}"),
    Column("share", "share", "{:.1%}"),
    Column("TFLOP/s", "tflops", "{:.2f}"),
    Column("autotuner", "autotuner"),
    Column("config", "config"),
    Column("chosen", "chosen"),
    Column("timing", "timing"),
    Column("note", "reason"),
)


def main() -> None:
    run = parse_run_args(__doc__, archs=ARCHES, default_archs=["resnet50"], batches=(1, 128), reps=10)
    if run.dry_run:
        dry_run(run, plan(run.archs, run.batches, run.device))
        return
    rows = benchmark_rows(run.archs, run.batches, run.dtype, run.device, input_size=run.input_size, reps=run.reps)
    run_and_write(
        rows,
        run,
        name="layers",
        question="per convolution of the fused ResNet: kernel time (torch.profiler) and the config autotuning chose",
        columns=COLUMNS,
        title="Fused ResNet, per layer",
    )


if __name__ == "__main__":
    main()

"""Fused against unfused, one residual block at a time: every distinct stem/block shape of the chosen ResNets.

The shapes come from walking the built models at --input-size (not from a hand-written list); a block that repeats
with the same kind, input shape and stride is timed once. Each block runs as:

- unfused: the eager block (conv → BN → ReLU → add; cuDNN on a GPU, oneDNN on a CPU), channels_last;
- folded: the same with every foldable BN folded into its conv (a pre-activation block keeps its input BN);
- compile, compile-max-autotune: torch.compile of the unfused block (dynamic=False), within --compile-budget-s;
- fused: our Triton kernels (models.fuse), NHWC. On a CPU only under TRITON_INTERPRET=1, else the row says "needs GPU".

On a GPU every variant is timed inside a CUDA graph (timing "cuda-graph": triton.testing.do_bench_cudagraph), so no
row counts launch cost, which a whole model run in a CUDA graph does not pay either: a block's 3-4 launches cost
more than its kernels at small batch. On a CPU, the clock around each call ("wall"). Median and p20/p80 ms, TFLOP/s
(convolution FLOPs), GB/s (the block's compulsory traffic: input, output and weights once each, whatever the variant
reads in fact), speed-up against unfused, and the relative error against the unfused block in IEEE float32.
`--dtype tf32`: float32 tensors with TF32 products for every variant (cuDNN's and ours). Writes
bench/results/blocks_<device>_<dtype>_<versions>_<date>.{json,md,png}; --dry-run lists the rows instead.

    python -m bench.blocks [--device cuda] [--dtype bfloat16] [--arch resnet50 ...] [--batch 1 8 32 128]
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

import models
from bench.common import (
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
from models.folding import bn_scale_shift, fold_conv_bn
from models.numerics import relative_error
from models.preact_resnet import PreActBasicBlock, PreActBottleneck
from models.precision import Precision
from models.resnet import Bottleneck

ARCHES = ("resnet18", "resnet50", "preact_resnet18", "preact_resnet50")
VARIANTS = ("unfused", "folded", "compile", "compile-max-autotune", "fused")
# max-autotune without its own CUDA graphs: every variant is timed inside our graph capture, and one captured inside
# another's does not work. Inductor's template autotuning (what max-autotune adds) is kept.
COMPILE_MODES = {"compile": "default", "compile-max-autotune": "max-autotune-no-cudagraphs"}

logger = logging.getLogger("bench.blocks")


@dataclass(frozen=True)
class BlockShape:
    """Where a block sits and what it computes, per image: in (C, H, W) -> out (K, P, Q)."""

    arch: str
    name: str  # "stem" or "layer2.0"
    kind: str  # the eager module's class name
    index: int  # position in models.fuse(...).blocks; -1 for the stem
    in_shape: tuple[int, int, int]
    out_shape: tuple[int, int, int]
    flops: int  # convolution multiply-adds × 2, per image
    weight_elements: int

    @property
    def label(self) -> str:
        (c, h, w), (k, p, q) = self.in_shape, self.out_shape
        return f"{self.arch} {self.name} {self.kind} {c}x{h}x{w}->{k}x{p}x{q}"


class FoldedBlock(nn.Module):
    """An eager block with BN folded into conv biases: x -> [relu(x*scale + shift)] -> convs -> (+ shortcut) -> ReLU?

    `convs` run in order with a ReLU after each but the last; the last adds the shortcut (when `residual`) and is
    followed by a ReLU when `relu_last`. The prologue (pre-activation blocks) also feeds a projection shortcut; an
    identity shortcut carries the block's input as it came.
    """

    def __init__(
        self,
        convs: list[nn.Conv2d],
        shortcut: nn.Conv2d | None,
        *,
        residual: bool,
        relu_last: bool,
        prologue: nn.BatchNorm2d | None = None,
    ) -> None:
        super().__init__()
        self.convs = nn.ModuleList(convs)
        self.shortcut = shortcut
        self.residual = residual
        self.relu_last = relu_last
        if prologue is not None:
            scale, shift = bn_scale_shift(prologue)
            self.register_buffer("scale", scale.float()[None, :, None, None])
            self.register_buffer("shift", shift.float()[None, :, None, None])
        else:
            self.scale = self.shift = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, C, H, W] -> [N, K, P, Q]
        pre = x if self.scale is None else torch.relu(x * self.scale + self.shift)
        # v2: an identity shortcut carries x itself, a projection reads the pre-activated input
        identity = x if self.shortcut is None else self.shortcut(pre)
        x = pre
        for conv in self.convs[:-1]:
            x = torch.relu(conv(x))
        x = self.convs[-1](x)
        if self.residual:
            x = x + identity
        return torch.relu(x) if self.relu_last else x


def folded_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> nn.Conv2d:
    """A float32 conv with bias computing bn(conv(x)) (conv(x) when bn is None)."""
    weight, bias = fold_conv_bn(conv, bn)
    folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=True)
    folded.weight.data, folded.bias.data = weight.float(), bias.float()
    return folded.eval()


def fold_block(block: nn.Module) -> FoldedBlock:
    """FoldedBlock for a stem (Sequential conv, BN, ReLU), a v1 block or a pre-activation (v2) block."""
    if isinstance(block, nn.Sequential):
        conv, bn, _ = block
        return FoldedBlock([folded_conv(conv, bn)], None, residual=False, relu_last=True)
    if isinstance(block, PreActBasicBlock | PreActBottleneck):
        # relu(bn1(x)) feeds the first conv and the projection, so it stays a prologue; every later BN follows a conv.
        if isinstance(block, PreActBottleneck):
            pairs = [(block.conv1, block.bn2), (block.conv2, block.bn3), (block.conv3, None)]
        else:
            pairs = [(block.conv1, block.bn2), (block.conv2, None)]
        shortcut = None if block.downsample is None else folded_conv(block.downsample, None)
        convs = [folded_conv(conv, bn) for conv, bn in pairs]
        return FoldedBlock(convs, shortcut, residual=True, relu_last=False, prologue=block.bn1)
    pairs = [(block.conv1, block.bn1), (block.conv2, block.bn2)]
    if isinstance(block, Bottleneck):
        pairs.append((block.conv3, block.bn3))
    shortcut = None if block.downsample is None else folded_conv(*block.downsample)
    return FoldedBlock([folded_conv(c, b) for c, b in pairs], shortcut, residual=True, relu_last=True)


def _measure(module: nn.Module, in_shape: tuple[int, int, int]) -> tuple[tuple[int, int, int], int, int]:
    """(output shape, conv FLOPs, conv weight elements) of `module` on one random image."""
    flops = 0

    def count(conv: nn.Module, _: tuple, out: torch.Tensor) -> None:
        nonlocal flops
        flops += 2 * out.numel() * conv.weight[0].numel()  # each output element: C/groups × R × S multiply-adds

    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    hooks = [conv.register_forward_hook(count) for conv in convs]
    with torch.inference_mode():
        out = module(torch.randn(1, *in_shape))
    for hook in hooks:
        hook.remove()
    return tuple(out.shape[1:]), flops, sum(conv.weight.numel() for conv in convs)


def distinct_blocks(model: nn.Module, arch: str, input_size: int) -> list[tuple[BlockShape, nn.Module]]:
    """The stem and every residual block of `model` (from models.build) whose (kind, input, output) is new."""
    stem = nn.Sequential(model.conv1, model.bn1, nn.ReLU()).eval()
    candidates: list[tuple[str, int, nn.Module]] = [("stem", -1, stem)]
    layers = [model.layer1, model.layer2, model.layer3, model.layer4]
    flat = [(f"layer{i + 1}.{j}", block) for i, layer in enumerate(layers) for j, block in enumerate(layer)]
    candidates += [(name, index, block) for index, (name, block) in enumerate(flat)]

    # Each block's input shape is whatever reaches it in a forward pass of the whole model.
    in_shapes: dict[nn.Module, tuple[int, int, int]] = {stem: (3, input_size, input_size)}

    def record(block: nn.Module, args: tuple) -> None:
        in_shapes.setdefault(block, tuple(args[0].shape[1:]))

    hooks = [block.register_forward_pre_hook(record) for _, index, block in candidates if index >= 0]
    with torch.inference_mode():
        model(torch.randn(1, 3, input_size, input_size))
    for hook in hooks:
        hook.remove()

    seen, shapes = set(), []
    for name, index, block in candidates:
        out_shape, flops, weights = _measure(block, in_shapes[block])
        key = ("ConvBNReLU" if index < 0 else type(block).__name__, in_shapes[block], out_shape)
        if key not in seen:
            seen.add(key)
            shape = BlockShape(arch, name, key[0], index, in_shapes[block], out_shape, flops, weights)
            shapes.append((shape, block))
    return shapes


class CompileBudget:
    """Seconds left for torch.compile's first calls (its compilation), shared by every compile row of a run."""

    def __init__(self, seconds: float) -> None:
        self.left = seconds

    def compile(self, module: nn.Module, mode: str, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """torch.compile(module) called once on x; raises Skipped when the budget is spent or compilation fails."""
        if self.left <= 0:
            raise Skipped("compile time budget spent (--compile-budget-s)")
        started = time.perf_counter()
        try:
            compiled = compile_fresh(module, mode=mode)
            compiled(x)
        except Exception as error:  # any backend failure (no compiler, unsupported op) makes the row skipped
            raise Skipped(f"torch.compile failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}") from None
        finally:
            self.left -= time.perf_counter() - started
        return compiled


def prepare(
    variant: str,
    shape: BlockShape,
    block: nn.Module,
    fused: nn.Module | None,
    x: torch.Tensor,
    budget: CompileBudget,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The callable that runs `block` as `variant` on x ([N, C, H, W], channels_last), returning [N, K, P, Q]."""
    to_device = {"device": x.device, "dtype": x.dtype, "memory_format": torch.channels_last}
    if variant == "unfused":
        return copy.deepcopy(block).to(**to_device)
    if variant == "folded":
        return fold_block(block).to(**to_device)
    if variant in COMPILE_MODES:
        return budget.compile(copy.deepcopy(block).to(**to_device), COMPILE_MODES[variant], x)
    if fused is None:
        raise Skipped("needs GPU")
    fused_block = fused.stem if shape.index < 0 else fused.blocks[shape.index]
    # A channels_last NCHW tensor permuted to NHWC is contiguous: no copy on the way in or out.
    return lambda nchw: fused_block(nchw.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def bench_shape(
    shape: BlockShape,
    block: nn.Module,
    fused: nn.Module | None,
    batch: int,
    variants: list[str],
    dtype: torch.dtype,
    device: torch.device,
    budget: CompileBudget,
    cpu_seconds: float,
    allow_tf32: bool = False,
) -> list[dict]:
    """One row per variant: timing, throughput, speed-up against unfused and error against float32 unfused."""
    x32 = torch.randn(batch, *shape.in_shape, device=device).contiguous(memory_format=torch.channels_last)
    with ieee_float32():
        reference = copy.deepcopy(block).to(device, memory_format=torch.channels_last)(x32).float()
    x = x32.to(dtype)
    elements = sum(map(_numel, (shape.in_shape, shape.out_shape))) * batch + shape.weight_elements
    rows, unfused_ms = [], None
    for variant in variants:
        row = {**asdict(shape), "label": shape.label, "batch": batch, "dtype": Precision(dtype, allow_tf32).name}
        row |= {"variant": variant, "status": "ok", "reason": None}
        try:
            fn = prepare(variant, shape, block, fused, x, budget)
        except Skipped as skipped:
            rows.append(row | {"status": "skipped", "reason": str(skipped)})
            continue
        # Also the warm-up: autotuning happens outside the graph.
        row["rel_err"] = relative_error(fn(x), reference, dtype=torch.float32)
        row |= bench_ms(lambda fn=fn: fn(x), device_timing(device, graph=True), budget_s=cpu_seconds)
        seconds = row["median_ms"] / 1e3
        row["tflops"] = shape.flops * batch / seconds / 1e12
        row["gbps"] = elements * x.element_size() / seconds / 1e9
        unfused_ms = row["median_ms"] if variant == "unfused" else unfused_ms
        row["speedup"] = None if unfused_ms is None else unfused_ms / row["median_ms"]
        rows.append(row)
    return rows


def _numel(shape: tuple[int, ...]) -> int:
    return int(torch.Size(shape).numel())


def fused_model(
    model: nn.Module, dtype: torch.dtype, device: torch.device, allow_tf32: bool = False
) -> nn.Module | None:
    """models.fuse of a copy of `model` on `device`; None where the kernels cannot run (a CPU, not interpreting)."""
    if not kernels_run_on(device):
        return None
    return models.fuse(copy.deepcopy(model).to(device), dtype, allow_tf32=allow_tf32)


def arch_blocks(
    archs: list[str], input_size: int, select: Callable[[BlockShape], bool] = lambda shape: True
) -> list[tuple[nn.Module, list[tuple[BlockShape, nn.Module]]]]:
    """Per arch: the seeded model, and its distinct blocks that `select` keeps."""
    work = []
    for arch in archs:
        model = models.build(arch, weights="random", seed=0)
        shapes = [(shape, block) for shape, block in distinct_blocks(model, arch, input_size) if select(shape)]
        work.append((model, shapes))
    return work


def benchmark_rows(
    archs: list[str],
    batches: list[int],
    variants: list[str],
    dtype: torch.dtype,
    device: torch.device,
    *,
    input_size: int = 224,
    compile_budget_s: float = 300.0,
    cpu_seconds: float = 2.0,
    select: Callable[[BlockShape], bool] = lambda shape: True,
    allow_tf32: bool = False,
) -> Iterator[dict]:
    """Yields a row for every distinct block of `archs` (those `select` keeps) × batch × variant, as each is measured
    ("unfused" always runs first: the speed-ups are against it)."""
    variants = ["unfused", *(v for v in variants if v != "unfused")]
    budget = CompileBudget(compile_budget_s)
    work = []
    for model, shapes in arch_blocks(archs, input_size, select):
        fused = fused_model(model, dtype, device, allow_tf32) if "fused" in variants else None
        work += [(shape, block, fused, batch) for shape, block in shapes for batch in batches]
    with torch.inference_mode():
        for shape, block, fused, batch in progress(
            work, "blocks", label=lambda item: f"{item[0].label}, batch {item[3]}"
        ):
            yield from bench_shape(shape, block, fused, batch, variants, dtype, device, budget, cpu_seconds, allow_tf32)


def plan(archs: list[str], batches: list[int], variants: list[str], device: torch.device, input_size: int) -> list[str]:
    """One line per row `benchmark_rows` would yield (what --dry-run lists)."""
    timing = device_timing(device, graph=True)
    variants = ["unfused", *(v for v in variants if v != "unfused")]
    shapes = [shape for _, arch_shapes in arch_blocks(archs, input_size) for shape, _ in arch_shapes]
    return [f"{s.label}, batch {b}: {v}, timing {timing}" for s in shapes for b in batches for v in variants]


COLUMNS = (
    Column("block", "label"),
    Column("batch", "batch"),
    Column("variant", "variant"),
    Column("median ms", "median_ms", "{:.3f}"),
    Column("p20 ms", "p20_ms", "{:.3f}"),
    Column("p80 ms", "p80_ms", "{:.3f}"),
    Column("TFLOP/s", "tflops", "{:.3f}"),
    Column("GB/s", "gbps", "{:.1f}"),
    Column("speed-up", "speedup", "{:.2f}x"),
    Column("rel. error", "rel_err", "{:.1e}"),
    Column("timing", "timing"),
    Column("note", "reason"),
)


def summarize(rows: list[dict]) -> list[dict]:
    """Per arch, batch and variant: the geometric mean, min and max of the blocks' speed-ups against unfused."""
    speedups: dict[tuple[str, int, str], list[float]] = {}
    for row in rows:
        if row["status"] == "ok" and row["variant"] != "unfused" and row.get("speedup"):
            speedups.setdefault((row["arch"], row["batch"], row["variant"]), []).append(row["speedup"])
    return [
        {
            "arch": arch,
            "batch": batch,
            "variant": variant,
            "blocks": len(values),
            "geomean_speedup": float(np.exp(np.mean(np.log(values)))),
            "min_speedup": min(values),
            "max_speedup": max(values),
        }
        for (arch, batch, variant), values in speedups.items()
    ]


SUMMARY_COLUMNS = (
    Column("model", "arch"),
    Column("batch", "batch"),
    Column("variant", "variant"),
    Column("blocks", "blocks"),
    Column("speed-up, geometric mean", "geomean_speedup", "{:.2f}x"),
    Column("min", "min_speedup", "{:.2f}x"),
    Column("max", "max_speedup", "{:.2f}x"),
)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """One panel per batch: speed-up against unfused of every timed variant, a group of bars per block."""
    plt = pyplot()
    rows = [row for row in rows if row["status"] == "ok"]
    if plt is None or not rows:
        return
    batches = sorted({row["batch"] for row in rows})
    labels = list(dict.fromkeys(f"{row['arch']} {row['name']}" for row in rows))
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
    fig, axes = plt.subplots(len(batches), 1, figsize=(max(8, 0.6 * len(labels)), 3.2 * len(batches)), squeeze=False)
    width = 0.8 / len(variants)
    for ax, batch in zip(axes[:, 0], batches, strict=True):
        for i, variant in enumerate(variants):
            speedups = {
                f"{r['arch']} {r['name']}": r["speedup"]
                for r in rows
                if r["batch"] == batch and r["variant"] == variant
            }
            xs = [j + i * width for j, label in enumerate(labels) if label in speedups]
            ax.bar(xs, [speedups[label] for label in labels if label in speedups], width, label=variant)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_ylabel(f"speed-up, batch {batch}")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], labels, rotation=60, ha="right", fontsize=7)
    axes[0, 0].set_title(title)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    logger.info("wrote %s", path)


def main() -> None:
    run = parse_run_args(
        __doc__,
        archs=ARCHES,
        batches=(1, 8, 32, 128),
        choices_flag="--variants",
        choices=VARIANTS,
        compile_budget_s=300.0,
        cpu_seconds=2.0,
    )
    if run.dry_run:
        dry_run(run, plan(run.archs, run.batches, run.choices, run.device, run.input_size))
        return
    rows = benchmark_rows(
        run.archs, run.batches, run.choices, run.dtype, run.device,
        input_size=run.input_size, compile_budget_s=run.compile_budget_s, cpu_seconds=run.cpu_seconds,
        allow_tf32=run.allow_tf32,
    )  # fmt: skip
    run_and_write(
        rows,
        run,
        name="blocks",
        question="one residual block at a time: fused Triton kernels against unfused eager, folded eager and "
        "torch.compile",
        columns=COLUMNS,
        title="ResNet blocks",
        plot=plot,
        plot_title="speed-up against unfused eager",
        summarize=summarize,
        summary_columns=SUMMARY_COLUMNS,
    )


if __name__ == "__main__":
    main()

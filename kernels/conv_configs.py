"""Tile configurations of the convolution kernels: the pointer kernel (`kernels/conv_bn_act.py`), the persistent
1x1 TMA GEMM (`kernels/conv1x1_tma.py`) and the TMA tap kernel (`kernels/conv_tma.py`).

GEMM view of a ResNet convolution: M = N·P·Q output pixels, N = K output channels, reduction R·S·C. Early layers
have a large M and a small K (layer1 at batch 32: M = 100 352, K = 64); late layers at batch 1 a tiny M and a large
K and reduction (layer4: M = 49, K = 512, R·S·C = 4 608), where small tiles are the only way to launch more than a
handful of programs (and split-K, `kernels._grid`, the way to fill the card). Every config below compiles for sm_90
without register spills and within its shared memory, to HGMMA (wgmma) for the tensor-core dtypes, and the TMA forms
to TMA loads and stores (checked with `python -m kernels.report`). None has been timed on a GPU yet: the lists are
chosen from that compile report, and which config wins where is for autotuning on the card to find.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import triton

from kernels._common import CompileCase

# Autotuning re-runs for every new value of these launcher arguments: the batch bucket (M_LOG2 buckets N·P·Q by
# powers of two, so that every batch size does not trigger its own tuning run), channels, kernel, stride and padding
# (stride 2 spreads a tile's input pixels twice as far apart), the fused epilogue and prologue (registers: the
# residual and prologue variants take up to twice those of the plain one) and the split.
AUTOTUNE_KEY = [
    *("M_LOG2", "C", "K", "R", "S"),
    *("stride_h", "stride_w", "pad_h", "pad_w"),
    *("HAS_RESIDUAL", "APPLY_RELU", "HAS_PROLOGUE", "PROLOGUE_RELU", "SPLIT_K"),
]

GROUP_SIZE_M = 8

# (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps) for 16-bit operands on the tensor cores, per form of the pointer
# kernel. 1x1 convolutions: 128-row tiles take 8 warps (128x256 spills with a residual).
_TENSOR_CORE_TILES = {
    "pointwise": (
        (128, 128, 64, 3, 8),  # large M, K >= 128: the bulk of ResNet-50's FLOPs
        (128, 64, 64, 4, 8),  # large M, K = 64
        (64, 128, 64, 4, 4),  # medium M (layer3/4 at moderate batch)
        (64, 64, 64, 4, 4),  # small M
        (64, 32, 64, 4, 4),  # tiny M (layer4 at batch 1): twice the programs of BLOCK_N = 64
    ),
    # Every other convolution stays at <= 4 warps: Inductor's conv template miscompiled non-1x1 convolutions at
    # >= 8 warps (pytorch#173068), and no GPU test of ours has run 8 yet. At 4 warps 128x128x64 spills with a
    # residual (40 bytes) and the 3x3 prologue variant needs 234 registers at 128x64.
    "taps": (
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (64, 32, 64, 4, 4),
    ),
    # The flat reduction (C < 16: the stem) holds a [BLOCK_M, BLOCK_K] tile of per-element tap indices, and with raw
    # uint8 images and the normalizing prologue a second one: BLOCK_K = 64 spills there (255 registers, 106-275
    # LDL/STL on sm_80), as do 128x64x32 (sm_90) and 64x128x32 (sm_80); these take at most 254 without a spill.
    "flat": (
        (128, 32, 32, 3, 4),
        (64, 64, 32, 4, 4),
        (64, 32, 32, 4, 4),
    ),
}

# float32 with the IEEE dot runs on the FMA units. Triton's FMA dot holds a [BLOCK_M, BLOCK_K] and a
# [BLOCK_K, BLOCK_N] slice in registers, so BLOCK_K stays small (64 spilled thousands of instructions).
_FMA_POINTWISE_TILES = (
    (128, 128, 16, 3, 8),
    (128, 64, 16, 3, 8),
    (64, 64, 16, 3, 4),  # 64x64x32 spilled on sm_80 with the prologue
    (64, 32, 32, 3, 4),
)
_FMA_TAP_TILES = (  # <= 4 warps, as above; 128x64x16 takes 255 registers (no spill) with a residual
    (128, 64, 16, 3, 4),
    (64, 64, 16, 3, 4),
    (64, 32, 32, 3, 4),
)


def pointer_form(pointwise: bool, flat_reduction: bool) -> str:
    """Which candidate list a pointer-kernel launch takes: "pointwise" (1x1), "flat" (C < 16) or "taps"."""
    return "pointwise" if pointwise else "flat" if flat_reduction else "taps"


def interpreter_meta(m: int, k: int, reduction_step: int) -> dict[str, int]:
    """The one tile used under TRITON_INTERPRET=1, sized to the launch.

    There every program is a numpy loop whose cost is mostly per operation, not per element, so few large programs
    are fastest (ResNet-18's convolutions at 40x48, batch 2: 3.5 s at 128x256x128, 24 s at 64x64x32), as long as
    the tile is not mostly padding: BLOCK_N and BLOCK_K follow K and the reduction step (C per tap, or R*S*C for
    the flat reduction), and BLOCK_M grows to keep about 64K elements per tile. The 360 held-out digits at 32x32
    (M = 368 640, K = C = 16) took 650 s with a fixed 128x256x128 tile.
    """
    block_n = min(256, max(16, triton.next_power_of_2(k)))
    block_k = min(128, max(16, triton.next_power_of_2(reduction_step)))
    block_m = min(2048, max(128, triton.next_power_of_2(m)), max(128, 65536 // block_n))
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_SIZE_M": GROUP_SIZE_M}


def autotune_configs(
    dtype: torch.dtype = torch.float16, allow_tf32: bool = False, form: str = "pointwise"
) -> list[triton.Config]:
    """The pointer kernel's GPU autotuning candidates for one operand dtype (and, for float32, the dot precision) and
    one form (`pointer_form`)."""
    tiles: tuple[tuple[int, int, int, int, int], ...]  # (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps)
    if dtype == torch.float32 and not allow_tf32:
        tiles = _FMA_POINTWISE_TILES if form == "pointwise" else _FMA_TAP_TILES
    else:
        # TF32 operands are twice as wide: half the BLOCK_K keeps the bytes per pipeline stage.
        shrink = 2 if dtype == torch.float32 else 1
        tiles = tuple((bm, bn, bk // shrink, st, w) for bm, bn, bk, st, w in _TENSOR_CORE_TILES[form])
    return [
        triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_SIZE_M": GROUP_SIZE_M},
            num_stages=stages,
            num_warps=warps,
        )
        for bm, bn, bk, stages, warps in tiles
    ]


# --- The TMA forms (kernels/conv1x1_tma.py, kernels/conv_tma.py) ---------------------------------------------------


def tma_block_k(c: int, dtype: torch.dtype) -> int:
    """BLOCK_K of the TMA forms, not tuned: the widest step (64 channels, 32 for float32's 4-byte TF32 operands) that
    divides C, so that no box straddles two taps or two pixels of a strided view and split-K can divide the steps."""
    widest = 32 if dtype == torch.float32 else 64
    return next(bk for bk in (widest, widest // 2, 16) if c % bk == 0)


# Autotuning of the persistent 1x1 GEMM re-runs for each of these: the batch bucket and channels, the fused epilogue
# and prologue (the residual and prologue variants need up to 254 registers at 128x128: a different best tile),
# and the split.
GEMM_TMA_KEY = ["M_LOG2", "C", "K", "HAS_RESIDUAL", "APPLY_RELU", "HAS_PROLOGUE", "SPLIT_K"]

# Split-K partial products are stored per split in rows padded to this, a multiple of every BLOCK_M (see
# kernels/conv1x1_tma.py).
PARTIAL_ROW_ALIGN = 128

# (BLOCK_M, BLOCK_N, num_stages, num_warps, warp-specialized) for 16-bit operands. Warp specialization compiles to a
# producer warp plus consumer warp groups (setmaxnreg) at num_warps = 4 (12 warps in all); at 8 it silently does
# nothing, so the 8-warp tile is listed without it. Which of the twins wins is for the GPU to measure.
_GEMM_TMA_TILES = (
    (128, 128, 4, 4, True),  # the bulk of ResNet-50's 1x1 FLOPs (layer1-3 at batch >= 8)
    (128, 128, 4, 4, False),
    (128, 256, 3, 8, False),  # wide K (1024, 2048) at large M; 213 KB of shared memory, no room for split-K
    (128, 64, 4, 4, True),  # K = 64 (layer1's reductions)
    (64, 128, 4, 4, True),  # small M (layer4, small batches): twice the tiles of BLOCK_M = 128
    (64, 64, 4, 4, False),  # tiny M
)
# TF32: warp specialization aborts Triton 3.6's compiler (NVGPUWarpSpecialization) on float32 operands, and
# 128x256 needs 272 KB of shared memory at 3 stages (sm_90 has 227 KB).
_GEMM_TMA_TF32_TILES = tuple(
    (bm, bn, stages, warps, False) for bm, bn, stages, warps, _ in _GEMM_TMA_TILES[1:2] + _GEMM_TMA_TILES[3:]
)


def gemm_tma_configs(dtype: torch.dtype, split: bool = False) -> list[triton.Config]:
    """The persistent 1x1 TMA GEMM's autotuning candidates for 16-bit operands or float32 as TF32.

    With `split` (split-K, chosen only for grids below one wave, so small M) the 64-row tiles only.
    """
    tiles = _GEMM_TMA_TF32_TILES if dtype == torch.float32 else _GEMM_TMA_TILES
    return [
        triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_SIZE_M": GROUP_SIZE_M, "WARP_SPECIALIZE": ws},
            num_stages=stages,
            num_warps=warps,
        )
        for bm, bn, stages, warps, ws in tiles
        if bm == 64 or not split
    ]


def gemm_tma_interpreter_config(m: int, k: int) -> triton.Config:
    """The 1x1 TMA GEMM's one tile under TRITON_INTERPRET=1: as large as the launch, as `interpreter_meta` argues."""
    block_n = min(256, max(16, triton.next_power_of_2(k)))
    block_m = min(1024, max(64, triton.next_power_of_2(m)), max(64, 65536 // block_n))
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_N": block_n, "GROUP_SIZE_M": GROUP_SIZE_M, "WARP_SPECIALIZE": False}
    )


# Autotuning of the tap kernel re-runs for each of these: the batch bucket, the exact output map (how well a box
# shape divides it), channels, kernel, stride, fusions, space-to-depth cell and split.
TAPS_TMA_KEY = ["M_LOG2", "P", "Q", "C", "K", "R", "S", "STRIDE"]
TAPS_TMA_KEY += ["HAS_RESIDUAL", "APPLY_RELU", "HAS_PROLOGUE", "PROLOGUE_RELU", "CELL", "SPLIT_K"]

# (BLOCK_N output channels, BLOCK_H x BLOCK_W output pixels, num_stages), all at 4 warps: non-1x1 convolutions stay
# at <= 4 warps (Inductor's conv template miscompiled them at >= 8, pytorch#173068) until a GPU test of 8 passes.
# In swap-AB form BLOCK_N is the wgmma's M (a multiple of 64), the pixels its N.
_TAPS_TMA_TILES = (
    (128, 8, 8, 4),  # 56x56 and 112x112 maps: 8x8 boxes divide them exactly
    (128, 8, 16, 3),  # twice the pixels per weight tile where the map allows (112x112, large batches)
    (128, 16, 4, 4),  # 28x28 maps: 4 divides 28 (waste 12.5% in H only, against 23% for 8x8)
    (64, 8, 8, 4),  # K = 64 (layer1, the stem) and small grids
    (64, 8, 16, 4),
)


def taps_tma_configs() -> list[triton.Config]:
    """The TMA tap kernel's autotuning candidates, the same for every operand dtype (BLOCK_K is set per layer)."""
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_H": bh, "BLOCK_W": bw}, num_stages=stages, num_warps=4)
        for bn, bh, bw, stages in _TAPS_TMA_TILES
    ]


def taps_tma_interpreter_config(p: int, q: int, k: int) -> triton.Config:
    """The tap kernel's one tile under TRITON_INTERPRET=1: the whole map (up to 1024 pixels) and up to 256 channels."""
    block_w = min(32, max(4, triton.next_power_of_2(q)))
    block_h = min(max(4, triton.next_power_of_2(p)), 1024 // block_w)
    block_n = min(256, max(16, triton.next_power_of_2(k)))
    return triton.Config({"BLOCK_N": block_n, "BLOCK_H": block_h, "BLOCK_W": block_w})


def describe(config: triton.Config) -> str:
    """Short name of a config for reports: ``128x64x64 w8 s4`` (M x N x K), ``128x128 w4 s4 ws`` (the 1x1 TMA GEMM,
    warp-specialized) or ``8x16px x128 w4 s3`` (the tap kernel: a pixel box x output channels)."""
    meta = config.kwargs
    if "BLOCK_H" in meta:
        tile = f"{meta['BLOCK_H']}x{meta['BLOCK_W']}px x{meta['BLOCK_N']}"
    else:
        tile = "x".join(str(meta[b]) for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if b in meta)
    return f"{tile} w{config.num_warps} s{config.num_stages}{' ws' if meta.get('WARP_SPECIALIZE') else ''}"


# --- Compile cases (kernels/report.py) shared by the three convolution kernels -------------------------------------


def conv_signature(
    arg_names: Sequence[str], operand_type: str, int_args: Sequence[str], *, uint8_input: bool = False
) -> dict[str, str]:
    """A convolution kernel's signature for the compile report: input, weight, residual and output pointers in the
    operand type ("fp16"; the input "u8" for raw images), bias, prologue and split-K partials float32, `int_args`
    32-bit integers, the rest constexpr."""
    types = dict.fromkeys(("x_ptr", "w_ptr", "res_ptr", "out_ptr"), f"*{operand_type}")
    types |= {"x_ptr": "*u8"} if uint8_input else {}
    types |= dict.fromkeys(("bias_ptr", "scale_ptr", "shift_ptr", "part_ptr"), "*fp32")
    types |= dict.fromkeys(int_args, "i32")
    return {arg: types.get(arg, "constexpr") for arg in arg_names}


def config_case(
    kernel: str,
    fn: Callable[..., Any],
    variant: str,
    signature: dict[str, str],
    constexprs: dict[str, Any],
    config: triton.Config,
    dtype: torch.dtype,
    *,
    block_m: int,
    min_arch: int = 80,
) -> CompileCase:
    """The compile case of one autotune config of a variant (the config's name appended to `variant`)."""
    return CompileCase(
        kernel=kernel,
        variant=f"{variant} {describe(config)}",
        fn=fn,
        signature=signature,
        constexprs=constexprs | config.kwargs,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        dtype=dtype,
        block_m=block_m,
        min_arch=min_arch,
    )

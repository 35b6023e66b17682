"""Tile configurations for the implicit-GEMM convolution (`kernels/conv_bn_act.py`).

GEMM view of a ResNet convolution: M = N·P·Q output pixels, N = K output channels, reduction R·S·C. Early layers
have a large M and a small K (layer1 at batch 32: M = 100 352, K = 64); late layers at batch 1 a tiny M and a large
K and reduction (layer4: M = 49, K = 512, R·S·C = 4 608), where small tiles are the only way to launch more than a
handful of programs. Every config below compiles for sm_90 without register spills, and to HGMMA (wgmma) for the
tensor-core dtypes (checked with `python -m kernels.report`).
"""

from __future__ import annotations

import torch
import triton

# Autotuning re-runs for every new value of these launcher arguments. M_LOG2 buckets N·P·Q by powers of two so
# that every batch size does not trigger its own tuning run. Stride and padding change the input's access pattern
# (stride 2 spreads a tile's input pixels twice as far apart), the fusion flags the epilogue's and prologue's
# traffic and registers: a layer must not reuse the tuning of one that differs in any of them.
AUTOTUNE_KEY = [
    *("M_LOG2", "C", "K", "R", "S"),
    *("stride_h", "stride_w", "pad_h", "pad_w"),
    *("HAS_RESIDUAL", "APPLY_RELU", "HAS_PROLOGUE"),
]

GROUP_SIZE_M = 8

# (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps) for 16-bit operands on the tensor cores. 128-row tiles take
# 8 warps: with 4, the 3x3 prologue variant needs 234 registers and the stem spills; 128x256 spills with a residual.
_TENSOR_CORE_TILES = (
    (128, 128, 64, 3, 8),  # large M, K >= 128: the bulk of ResNet-50's FLOPs
    (128, 64, 64, 4, 8),  # large M, K = 64 (stem, layer1 of ResNet-18)
    (64, 128, 64, 4, 4),  # medium M (layer3/4 at moderate batch)
    (64, 64, 64, 4, 4),  # small M
    (64, 32, 64, 4, 4),  # tiny M (layer4 at batch 1): twice the programs of BLOCK_N = 64
)

# float32 with the IEEE dot runs on the FMA units. Triton's FMA dot holds a [BLOCK_M, BLOCK_K] and a
# [BLOCK_K, BLOCK_N] slice in registers, so BLOCK_K stays small (64 spilled thousands of instructions).
_FMA_TILES = (
    (128, 128, 16, 3, 8),
    (128, 64, 16, 3, 8),
    (64, 64, 16, 3, 4),  # 64x64x32 spilled on sm_80 with the prologue
    (64, 32, 32, 3, 4),
)


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


def autotune_configs(dtype: torch.dtype = torch.float16, allow_tf32: bool = False) -> list[triton.Config]:
    """The GPU autotuning candidates for one operand dtype (and, for float32, the dot precision)."""
    if dtype == torch.float32 and not allow_tf32:
        tiles = _FMA_TILES
    else:
        # TF32 operands are twice as wide: half the BLOCK_K keeps the bytes per pipeline stage.
        shrink = 2 if dtype == torch.float32 else 1
        tiles = tuple((bm, bn, bk // shrink, stages, warps) for bm, bn, bk, stages, warps in _TENSOR_CORE_TILES)
    return [
        triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_SIZE_M": GROUP_SIZE_M},
            num_stages=stages,
            num_warps=warps,
        )
        for bm, bn, bk, stages, warps in tiles
    ]


def describe(config: triton.Config) -> str:
    """Short name of a config for reports, e.g. ``128x64x64 w8 s4``."""
    meta = config.kwargs
    return f"{meta['BLOCK_M']}x{meta['BLOCK_N']}x{meta['BLOCK_K']} w{config.num_warps} s{config.num_stages}"

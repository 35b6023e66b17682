"""Which kernel form runs each convolution of a fused ResNet: a small table in the code, and the launch.

Three forms compute the same function (kernels/): the pointer kernel `conv_bn_act` (implicit GEMM through pointer
loads: any shape and dtype, the tested fallback and reference), the persistent TMA GEMM `conv1x1_tma` (1x1 stride 1)
and the TMA tap kernel `conv_tma` (any kernel at stride 1 or 2; the stem over space-to-depth cells). The TMA forms
need sm_90 (or the interpreter), tensor-core operands (float16/bfloat16, float32 only as TF32), channels in whole
16-channel steps and 16-byte rows, and an even map at stride 2; a layer that misses any of these runs the pointer
kernel whatever the table says.

NOT MEASURED YET. Every row below was chosen from the sm_90 compile report (`python -m kernels.report`: registers,
spills, TMA and HGMMA counts, shared memory) and from how well power-of-two boxes divide each map, without a GPU.
bench/gpu_check.sh's per-layer breakdown is to time each form on each ResNet-50 layer; the rows are to follow that
measurement, and each row's `basis` to name its file.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypedDict

import torch
from torch import nn

from kernels import conv1x1_tma, conv1x1_tma_supports, conv_bn_act, conv_tma, conv_tma_supports

if TYPE_CHECKING:
    from models.fused import FusedConv


class Form(enum.StrEnum):
    POINTER = "conv_bn_act"
    GEMM_TMA = "conv1x1_tma"
    TAPS_TMA = "conv_tma"


@dataclass(frozen=True)
class Choice:
    """One row: layers of this kind whose output map's shorter side is at least `min_side` run `form`."""

    layers: str  # "stem", "1x1" (stride 1), "1x1/2" (strided 1x1: downsample shortcuts), "3x3" (every other conv)
    min_side: int
    form: Form
    basis: str


UNMEASURED = "chosen from the compile report, to be measured by bench/gpu_check.sh"

# First matching row wins.
FORM_TABLE: tuple[Choice, ...] = (
    Choice(
        "stem",
        0,
        Form.TAPS_TMA,
        f"{UNMEASURED}: cells of 2x2 pixels x 4 channels are 16-byte TMA rows, 4x4 taps of one 16-value step each; "
        "the pointer stem computes tap indices per element (1,095 instructions per step, issue-bound)",
    ),
    Choice(
        "1x1",
        0,
        Form.GEMM_TMA,
        f"{UNMEASURED}: TMA loads and stores, wgmma from shared memory, persistent; warp-specialized configs compile "
        "to setmaxnreg (the autotuner picks between them and the unspecialized twins)",
    ),
    Choice("1x1/2", 0, Form.TAPS_TMA, f"{UNMEASURED}: the 5-D view reads every other pixel as TMA boxes"),
    Choice(
        "3x3",
        28,
        Form.TAPS_TMA,
        f"{UNMEASURED}: 8x8 boxes divide 56x56 maps exactly, 16x4 boxes cover 28x28 at 87.5%",
    ),
    Choice(
        "3x3",
        0,
        Form.POINTER,
        f"{UNMEASURED}: power-of-two boxes cover 14x14 and 7x7 maps at 77% (23% of the MMA work wasted); the "
        "pointer kernel's flat M = N*P*Q wastes only its last tile, and splits K below one wave like the TMA forms",
    ),
)


Pair = tuple[int, int]


class Fusions(TypedDict):
    """The fusion keywords every kernel form takes alike."""

    residual: torch.Tensor | None
    relu: bool
    prologue_scale: torch.Tensor | None
    prologue_shift: torch.Tensor | None
    allow_tf32: bool


def conv_geometry(conv: nn.Conv2d) -> tuple[Pair, Pair, Pair]:
    """(kernel_size, stride, padding) of a 2-D convolution as int pairs (nn.Conv2d types them as tuple[int, ...])."""
    if isinstance(conv.padding, str) or conv.dilation != (1, 1) or conv.groups != 1:
        raise ValueError(f"the fused kernels take numeric padding, no dilation and one group; got {conv}")
    (r, s), (stride_h, stride_w), (pad_h, pad_w) = conv.kernel_size, conv.stride, conv.padding
    return (r, s), (stride_h, stride_w), (pad_h, pad_w)


def layer_kind(kernel_size: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int]) -> str:
    """The table's name for a (non-stem) convolution's kind."""
    if kernel_size == (1, 1) and padding == (0, 0):
        return "1x1" if stride == (1, 1) else "1x1/2" if stride == (2, 2) else "3x3"
    return "3x3"


def choose_form(layers: str, output_side: int) -> Form:
    """The table's form for a layer of kind `layers` whose output map's shorter side is `output_side`."""
    return next(row.form for row in FORM_TABLE if row.layers == layers and output_side >= row.min_side)


def launch(conv: FusedConv, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """Run `conv` on x [N, H, W, C] (its compute dtype) in the form the table picks for this map; [N, P, Q, K]."""
    _, h, w, c = x.shape
    (r, s), (stride_h, stride_w), (pad_h, pad_w) = conv.kernel_size, conv.stride, conv.padding
    p, q = (h + 2 * pad_h - r) // stride_h + 1, (w + 2 * pad_w - s) // stride_w + 1
    kind = layer_kind(conv.kernel_size, conv.stride, conv.padding)
    form = choose_form(kind, min(p, q)) if conv.tma_device else Form.POINTER
    k = conv.bias.shape[0]
    fusions = Fusions(
        residual=residual,
        relu=conv.relu,
        prologue_scale=conv.prologue_scale,
        prologue_shift=conv.prologue_shift,
        allow_tf32=conv.allow_tf32,
    )
    if form is Form.GEMM_TMA and conv1x1_tma_supports(c, k, x.dtype, conv.allow_tf32):
        return conv1x1_tma(x, conv.weight, conv.bias, **fusions)
    square_stride = stride_h if stride_h == stride_w else 0
    taps_ok = conv_tma_supports(c, k, x.dtype, stride=square_stride, height=h, width=w, allow_tf32=conv.allow_tf32)
    if form is Form.TAPS_TMA and taps_ok:
        return conv_tma(
            x, conv.weight, conv.bias, kernel_size=conv.kernel_size, stride=conv.stride, padding=conv.padding, **fusions
        )
    return conv_bn_act(
        x, conv.weight, conv.bias, kernel_size=conv.kernel_size, stride=conv.stride, padding=conv.padding, **fusions
    )

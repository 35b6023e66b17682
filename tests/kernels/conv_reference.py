"""The reference every convolution kernel is checked against: an unfused conv2d -> batch_norm -> + residual -> ReLU
chain in float64 with random BatchNorm statistics, and the same layer folded and packed as the kernels take it.

Shared by the tests of every kernel form (tests/kernels/test_conv_*.py), so that each is held to one definition.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from kernels import pack_conv_weight
from tests.support.numerics import TF32_TOLERANCE, TOLERANCES, assert_relative_close

BN_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class Conv:
    """One convolution layer and the fusions around it; NHWC input [n, h, w, c], output channels k."""

    n: int
    h: int
    w: int
    c: int
    k: int
    kernel: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    residual: bool = False
    relu: bool = False
    prologue: bool = False

    def __str__(self) -> str:
        fused = "".join(f"+{f}" for f in ("residual", "relu", "prologue") if getattr(self, f))
        r, s = self.kernel
        return f"{self.n}x{self.h}x{self.w}x{self.c}->{self.k} {r}x{s}/s{self.stride}/p{self.padding}{fused}"


def random_case(conv: Conv, dtype: torch.dtype) -> tuple[dict, torch.Tensor, float]:
    """Kernel arguments (folded, packed, NHWC, in `dtype`), the float64 NCHW reference output, a floor for its norm."""
    r, s = conv.kernel
    x = torch.randn(conv.n, conv.c, conv.h, conv.w).to(dtype).double()  # the values the kernel sees
    weight = torch.randn(conv.k, conv.c, r, s, dtype=torch.float64) / (conv.c * r * s) ** 0.5
    mean, var = torch.randn(conv.k, dtype=torch.float64), torch.rand(conv.k, dtype=torch.float64) + 0.5
    gamma, beta = torch.rand(conv.k, dtype=torch.float64) + 0.5, torch.randn(conv.k, dtype=torch.float64)
    # Positive shift: relu(0 * scale + shift) > 0, so a padding tap that skipped the mask would show.
    pro_scale, pro_shift = torch.randn(conv.c), torch.rand(conv.c) + 0.1

    reference_in = x
    if conv.prologue:
        reference_in = torch.relu(x * pro_scale.double()[:, None, None] + pro_shift.double()[:, None, None])
    ref = F.conv2d(reference_in, weight, stride=conv.stride, padding=conv.padding)
    ref = F.batch_norm(ref, mean, var, gamma, beta, training=False, eps=BN_EPS)
    residual = torch.randn(ref.shape).to(dtype)
    if conv.residual:
        ref = ref + residual.double()
    # ReLU can zero a tiny output entirely: the error is then taken relative to the pre-activation's scale.
    norm_floor = 1e-3 * ref.norm().item()
    if conv.relu:
        ref = torch.relu(ref)

    bn_scale = gamma / torch.sqrt(var + BN_EPS)
    kwargs = {
        "x": x.to(dtype).permute(0, 2, 3, 1).contiguous(),
        "weight": pack_conv_weight(weight * bn_scale[:, None, None, None], dtype),
        "bias": (beta - mean * bn_scale).float(),
        "kernel_size": conv.kernel,
        "stride": conv.stride,
        "padding": conv.padding,
        "residual": residual.permute(0, 2, 3, 1).contiguous() if conv.residual else None,
        "relu": conv.relu,
        "prologue_scale": pro_scale if conv.prologue else None,
        "prologue_shift": pro_shift if conv.prologue else None,
    }
    return kwargs, ref, norm_floor


def assert_parity(out: torch.Tensor, ref: torch.Tensor, norm_floor: float, tolerance: float, what: str) -> None:
    """out: a kernel's NHWC [N, P, Q, K]; ref: random_case's NCHW float64 reference. Fails naming the worst element."""
    assert out.shape == (ref.shape[0], ref.shape[2], ref.shape[3], ref.shape[1]), f"{what}: shape {tuple(out.shape)}"
    # NCHW like the reference: the worst element is reported as (n, k, p, q).
    assert_relative_close(out.permute(0, 3, 1, 2), ref, tolerance, what=what, floor=norm_floor)


# The TMA forms' operand kinds, (dtype, allow_tf32, largest allowed relative error) kept together: float32 only as
# TF32, held to TF32's bound (the interpreter multiplies in IEEE float32, a GPU in TF32).
TMA_KINDS = [
    pytest.param(torch.float16, False, TOLERANCES[torch.float16], id="fp16"),
    pytest.param(torch.bfloat16, False, TOLERANCES[torch.bfloat16], id="bf16"),
    pytest.param(torch.float32, True, TF32_TOLERANCE, id="tf32"),
]


def config_id(config: object) -> str:
    """Test ids for autotune configs, e.g. "8x8px_x128_w4_s4"."""
    from kernels.conv_configs import describe

    return describe(config).replace(" ", "_")

"""Helpers shared by the launchers: interpreter detection and argument validation."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Triton's name for each supported dtype, as written in a kernel signature ("*fp16" is a pointer to it).
TRITON_TYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def interpreting() -> bool:
    """True when Triton runs kernels with numpy on the CPU (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_tensor(
    name: str,
    t: object,
    *,
    ndim: int | None = None,
    dtypes: tuple[torch.dtype, ...] | None = None,
    device: torch.device | None = None,
    shape: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """Validate one launcher argument; raise ValueError naming it on any mismatch."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name} must have dtype in ({allowed}), got {str(t.dtype).removeprefix('torch.')}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (NHWC tensors: call .contiguous() after permuting)")
    if not interpreting() and t.device.type != "cuda":
        raise ValueError(f"{name} is on {t.device}: Triton kernels need a CUDA tensor, or TRITON_INTERPRET=1 on a CPU")
    return t


def int_pair(name: str, value: int | tuple[int, int], minimum: int) -> tuple[int, int]:
    """A kernel size, stride or padding as (height, width); ValueError naming it unless both are ints >= minimum."""
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v >= minimum for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints >= {minimum}, got {value!r}")
    return pair


def check_prologue(scale: torch.Tensor | None, shift: torch.Tensor | None, channels: int, device: torch.device) -> bool:
    """Validate a convolution's input prologue (per-channel float32 scale and shift, both or neither); True if given."""
    if (scale is None) != (shift is None):
        missing = "prologue_scale" if scale is None else "prologue_shift"
        raise ValueError(f"{missing} is missing: the prologue needs both prologue_scale and prologue_shift")
    if scale is None:
        return False
    check_tensor("prologue_scale", scale, dtypes=(torch.float32,), device=device, shape=(channels,))
    check_tensor("prologue_shift", shift, dtypes=(torch.float32,), device=device, shape=(channels,))
    return True


@dataclass(frozen=True)
class CompileCase:
    """One kernel specialization exactly as a launcher can launch it, for the sm_90/sm_80 compile report.

    ``fn`` is the plain Python function behind the ``@triton.jit`` kernel (``kernel.fn``), so the report can
    compile it even in a process where the interpreter is on.
    """

    kernel: str  # e.g. "conv_bn_act"
    variant: str  # human-readable: dtype, tile shape, fused flags
    fn: Callable[..., Any]
    signature: dict[str, str]  # argument name -> Triton type ("*fp16", "i32", "fp32", "constexpr")
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    dtype: torch.dtype
    block_m: int | None = None  # rows of the tensor-core tile, where the kernel has one (HGMMA needs >= 64)
    # The oldest compute capability the launcher runs it on: the TMA kernels are sm_90 only (on sm_80 Triton lowers
    # their descriptors to plain loads, which spill, and their launchers fall back to the pointer kernel there).
    min_arch: int = 80

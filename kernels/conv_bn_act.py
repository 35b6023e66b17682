"""Convolution + folded BatchNorm (+ residual) (+ ReLU) as one implicit-GEMM Triton kernel on NHWC tensors.

GEMM view: M = N·P·Q output pixels, N = K output channels, reduction over (r, s, c). The weight is prepacked
once at model load to [R·S·C, K], so each reduction step reads a plain [BLOCK_K, BLOCK_N] tile of it.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels import conv_configs
from kernels._common import (
    SUPPORTED_DTYPES,
    TRITON_TYPE_NAMES,
    CompileCase,
    check_prologue,
    check_tensor,
    int_pair,
    interpreting,
)
from kernels._grid import sm_count, split_k_factor
from kernels._interpreter import round_to_bfloat16
from kernels.autotune import autotune
from kernels.split_k_epilogue import split_k_epilogue

# Input channel counts below this take the flattened reduction (the C = 3 stem): one BLOCK_K step per tap
# would leave most of the tensor-core tile padding.
_FLAT_REDUCTION_MAX_C = 16


# Sizes that change with the batch or the layer's resolution are not specialized on (Triton would compile a variant
# for each value that is 1 or divisible by 16): the contiguous dimension is the constexpr C or K, so those hints buy
# no vectorization, and without them one binary per layer shape serves every batch size and every autotune bucket.
@triton.jit(do_not_specialize=["M", "H", "W", "P", "Q", "M_LOG2"])
def _conv_bn_act_kernel(
    x_ptr,  # input, NHWC (N, H, W, C); w_ptr's dtype, or uint8 with a prologue (the stem's raw images)
    w_ptr,  # packed weight (R*S*C, K), row (r*S + s)*C + c
    bias_ptr,  # folded BatchNorm shift, (K,) float32
    res_ptr,  # residual, NHWC (N, P, Q, K); read only if HAS_RESIDUAL
    scale_ptr,  # prologue scale, (C,) float32; read only if HAS_PROLOGUE
    shift_ptr,  # prologue shift, (C,) float32; read only if HAS_PROLOGUE
    out_ptr,  # output, NHWC (N, P, Q, K), w_ptr's dtype; written only if SPLIT_K == 1
    part_ptr,  # float32 partial products (SPLIT_K, M, K); written only if SPLIT_K > 1
    M,  # N*P*Q
    H,
    W,
    P,
    Q,
    stride_h,
    stride_w,
    pad_h,
    pad_w,
    M_LOG2,  # autotune key only (bit length of M)
    # Channel counts are compile-time: C bounds the reduction loop (the interpreter needs that), and a known K
    # lets the weight, residual and output accesses vectorize. A ResNet has a handful of (C, K) pairs.
    C: tl.constexpr,
    K: tl.constexpr,
    R: tl.constexpr,
    S: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    APPLY_RELU: tl.constexpr,
    HAS_PROLOGUE: tl.constexpr,
    PROLOGUE_RELU: tl.constexpr,  # relu(x*scale + shift) (pre-activation), or only x*scale + shift (normalization)
    SPLIT_K: tl.constexpr,  # reduction split this many ways (sub-wave grids), each split ceil(steps / SPLIT_K) long
    FLAT_REDUCTION: tl.constexpr,  # steps over (r*S + s)*C + c instead of taps × channel chunks (small C)
    POINTWISE: tl.constexpr,  # R == S == 1 and no padding: every tap is inside the image
    UPCAST_DOT: tl.constexpr,  # float32 operands for tl.dot (the interpreter's bfloat16 dot is wrong)
    ROUND_BF16_RTNE: tl.constexpr,  # round to nearest even before bfloat16 casts (the interpreter truncates)
    DOT_PRECISION: tl.constexpr,  # "ieee" or "tf32", float32 operands only
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_SIZE_M: tl.constexpr,
):
    # GROUP_SIZE_M row-blocks share each weight column-block while it is in L2; the splits of a tile are neighbours.
    split = tl.program_id(0) % SPLIT_K
    pid = tl.program_id(0) // SPLIT_K
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(K, BLOCK_N)
    group_id = pid // (GROUP_SIZE_M * num_pid_n)
    first_pid_m = group_id * GROUP_SIZE_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_SIZE_M)
    pid_m = first_pid_m + (pid % (GROUP_SIZE_M * num_pid_n)) % group_size_m
    pid_n = (pid % (GROUP_SIZE_M * num_pid_n)) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < K

    # Output pixel -> input coordinates of its (r, s) = (0, 0) tap, which may lie in the padding.
    q = offs_m % Q
    p = (offs_m // Q) % P
    img = offs_m // (P * Q)
    ih0 = p * stride_h - pad_h
    iw0 = q * stride_w - pad_w
    # N*H*W*C can pass 2**31 at large batch × resolution: the per-row base is int64, computed once per program;
    # the per-step offset (r*W + s)*C + c stays int32 (the launcher checks that it fits).
    x_rows = x_ptr + ((img.to(tl.int64) * H + ih0) * W + iw0) * C

    # Taps × channel chunks run as one flat loop, so that the pipeliner overlaps loads across taps too. Within a
    # step the tap is a scalar: its bounds test is one [BLOCK_M] vector and the load mask a row × column product,
    # so runs of NHWC channels stay contiguous and the loads vectorize. Decomposing (r*S + s)*C + c per element
    # instead costs a div/mod and four compares per element and defeats vectorization, but the C = 3 stem would
    # waste 13/16 of every tile the other way, so small C takes that path. The step counts are annotated constexpr
    # because the interpreter turns every plainly assigned value into a tensor, which range() rejects.
    TAP_STEPS: tl.constexpr = (R * S * C + BLOCK_K - 1) // BLOCK_K if FLAT_REDUCTION else (C + BLOCK_K - 1) // BLOCK_K
    NUM_STEPS: tl.constexpr = TAP_STEPS if FLAT_REDUCTION else R * S * TAP_STEPS
    SPLIT_STEPS: tl.constexpr = (NUM_STEPS + SPLIT_K - 1) // SPLIT_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for split_step in range(SPLIT_STEPS):
        step = split * SPLIT_STEPS + split_step
        if FLAT_REDUCTION:
            w_rows = step * BLOCK_K + offs_k
            k_ok = w_rows < R * S * C  # also past the last split's end
            c = w_rows % C
            r = w_rows // C // S
            s = (w_rows // C) % S
            ih = ih0[:, None] + r[None, :]
            iw = iw0[:, None] + s[None, :]
            inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            x_mask = inside & m_ok[:, None] & k_ok[None, :]
        else:
            tap = step // TAP_STEPS
            c = (step % TAP_STEPS) * BLOCK_K + offs_k
            k_ok = c < C
            if SPLIT_K > 1:
                k_ok &= step < NUM_STEPS  # the last split may run past the reduction
            w_rows = tap * C + c
            r = tap // S
            s = tap % S
            if POINTWISE:
                row_ok = m_ok
            else:
                ih = ih0 + r
                iw = iw0 + s
                row_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            x_mask = row_ok[:, None] & k_ok[None, :]
        x_tile = tl.load(x_rows[:, None] + ((r * W + s) * C + c)[None, :], mask=x_mask, other=0.0)
        if HAS_PROLOGUE:
            scale = tl.load(scale_ptr + c, mask=k_ok, other=0.0)
            shift = tl.load(shift_ptr + c, mask=k_ok, other=0.0)
            act = x_tile.to(tl.float32) * scale[None, :] + shift[None, :]
            if PROLOGUE_RELU:
                act = tl.maximum(act, 0.0)
            # Padding is zero *after* the prologue (relu(0*scale + shift) is not 0): re-apply the mask.
            act = tl.where(x_mask, act, 0.0)
            if ROUND_BF16_RTNE:
                act = round_to_bfloat16(act)
            x_tile = act.to(w_ptr.dtype.element_ty)
        w_tile = tl.load(w_ptr + w_rows[:, None] * K + offs_n[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST_DOT:
            acc = tl.dot(x_tile.to(tl.float32), w_tile.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x_tile, w_tile, acc, input_precision=DOT_PRECISION)

    out_offsets = offs_m.to(tl.int64)[:, None] * K + offs_n[None, :]
    out_mask = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K > 1:  # kernels/split_k_epilogue.py adds the splits and applies the epilogue
        tl.store(part_ptr + split * M.to(tl.int64) * K + out_offsets, acc, mask=out_mask)
    else:
        # Epilogue on the float32 accumulator: bias, residual, ReLU, one store.
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
        if HAS_RESIDUAL:
            acc += tl.load(res_ptr + out_offsets, mask=out_mask, other=0.0).to(tl.float32)
        if APPLY_RELU:
            acc = tl.maximum(acc, 0.0)
        if ROUND_BF16_RTNE:
            acc = round_to_bfloat16(acc)
        tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@functools.cache
def _autotuned_kernel(dtype: torch.dtype, allow_tf32: bool, form: str) -> triton.runtime.Autotuner:
    """One autotuner per operand kind and kernel form: each has its own candidate list."""
    configs = conv_configs.autotune_configs(dtype, allow_tf32, form)
    name = f"conv_bn_act {TRITON_TYPE_NAMES[dtype]}{' tf32' if allow_tf32 else ''} {form}"
    return autotune(name, configs, conv_configs.AUTOTUNE_KEY)(_conv_bn_act_kernel)


def pack_conv_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """weight [K, C, R, S] (PyTorch conv layout) -> [R*S*C, K] contiguous in `dtype`, row (r*S + s)*C + c.

    Called once at model load, never per request.
    """
    if not isinstance(weight, torch.Tensor) or weight.ndim != 4 or not weight.is_floating_point():
        raise ValueError("weight must be a floating-point tensor [K, C, R, S]")
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype must be one of {SUPPORTED_DTYPES}, got {dtype}")
    k, c, r, s = weight.shape
    return weight.permute(2, 3, 1, 0).reshape(r * s * c, k).to(dtype).contiguous()


def _specialization(
    c: int,
    k: int,
    kernel: tuple[int, int],
    padding: tuple[int, int],
    residual: bool,
    relu: bool,
    prologue: bool,
    tf32: bool,
) -> dict:
    """The kernel's shape and fusion constexprs, shared by the launcher and `compile_cases`."""
    return {
        "C": c,
        "K": k,
        "R": kernel[0],
        "S": kernel[1],
        "HAS_RESIDUAL": residual,
        "APPLY_RELU": relu,
        "HAS_PROLOGUE": prologue,
        "FLAT_REDUCTION": c < _FLAT_REDUCTION_MAX_C,
        "POINTWISE": kernel == (1, 1) and padding == (0, 0),
        "DOT_PRECISION": "tf32" if tf32 else "ieee",
    }


def conv_bn_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    kernel_size: tuple[int, int],
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    residual: torch.Tensor | None = None,
    relu: bool = False,
    prologue_scale: torch.Tensor | None = None,
    prologue_shift: torch.Tensor | None = None,
    prologue_relu: bool = True,
    allow_tf32: bool = False,
    split_k: int | None = None,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """relu?(conv(prologue?(x), weight) + bias (+ residual)), all NHWC; returns [N, P, Q, K] in weight's dtype.

    x: [N, H, W, C] float32/float16/bfloat16 in weight's dtype, or uint8 with a prologue (raw images).
    weight: [R*S*C, K] from `pack_conv_weight`. bias: [K] float32. residual: [N, P, Q, K], weight's dtype.
    prologue_scale/shift: [C] float32, both or neither; the input becomes relu(x*scale + shift) as loaded
    (pre-activation ResNet), or x*scale + shift without prologue_relu (input normalization); padding stays zero.
    allow_tf32: float32 only, TF32 tensor cores on a GPU instead of the IEEE float32 dot.
    split_k: reduction splits; None splits only grids below one wave of the card's SMs (see `kernels._grid`).
    config: one of `conv_configs.autotune_configs` for this form instead of autotuning (tests, benchmarks).
    """
    has_prologue = prologue_scale is not None or prologue_shift is not None
    x = check_tensor("x", x, ndim=4, dtypes=(*SUPPORTED_DTYPES, torch.uint8) if has_prologue else SUPPORTED_DTYPES)
    n, h, w, c = x.shape
    if c == 0:
        raise ValueError("x has no channels (C = 0)")
    r, s = int_pair("kernel_size", kernel_size, 1)
    stride_h, stride_w = int_pair("stride", stride, 1)
    pad_h, pad_w = int_pair("padding", padding, 0)
    p = (h + 2 * pad_h - r) // stride_h + 1
    q = (w + 2 * pad_w - s) // stride_w + 1
    if p <= 0 or q <= 0:
        raise ValueError(f"output size {p}x{q} <= 0: input {h}x{w} is too small for kernel_size/padding")
    weight_dtypes = SUPPORTED_DTYPES if x.dtype == torch.uint8 else (x.dtype,)
    weight = check_tensor("weight", weight, ndim=2, dtypes=weight_dtypes, device=x.device)
    dtype = weight.dtype
    if weight.shape[0] != r * s * c:
        raise ValueError(f"weight has {weight.shape[0]} rows, expected R*S*C = {r}*{s}*{c} = {r * s * c}")
    k = weight.shape[1]
    bias = check_tensor("bias", bias, dtypes=(torch.float32,), device=x.device, shape=(k,))
    if residual is not None:
        check_tensor("residual", residual, dtypes=(dtype,), device=x.device, shape=(n, p, q, k))
    check_prologue(prologue_scale, prologue_shift, c, x.device)

    m = n * p * q
    # The kernel keeps output rows and per-tap input offsets in int32 (only the per-row bases are int64).
    if m >= 2**31 or (r * w + s) * c >= 2**31:
        raise ValueError(f"x of shape {tuple(x.shape)} is too large: its row and tap offsets must fit in int32")

    out = torch.empty((n, p, q, k), dtype=dtype, device=x.device)
    if m == 0 or k == 0:
        return out
    tf32 = allow_tf32 and dtype == torch.float32
    specialization = _specialization(c, k, (r, s), (pad_h, pad_w), residual is not None, relu, has_prologue, tf32)
    form = conv_configs.pointer_form(specialization["POINTWISE"], specialization["FLAT_REDUCTION"])
    configs = conv_configs.autotune_configs(dtype, tf32, form)
    sms = sm_count(x.device)
    if split_k is None:
        # Sized for the form's smallest tile (the most programs) and widest BLOCK_K (the fewest steps).
        smallest = min(cfg.kwargs["BLOCK_M"] * cfg.kwargs["BLOCK_N"] for cfg in configs)
        widest_k = max(cfg.kwargs["BLOCK_K"] for cfg in configs)
        step = r * s * c if specialization["FLAT_REDUCTION"] else c
        steps = triton.cdiv(step, widest_k) * (1 if specialization["FLAT_REDUCTION"] else r * s)
        split_k = split_k_factor(triton.cdiv(m * k, smallest), steps, sms)
    if not isinstance(split_k, int) or split_k < 1:
        raise ValueError(f"split_k must be a positive int, got {split_k!r}")
    partials = torch.empty((split_k, m, k), dtype=torch.float32, device=x.device) if split_k > 1 else bias
    # Unused pointer slots get any tensor of the right dtype, so that every launch has one signature.
    args: tuple[object, ...] = (x, weight, bias, residual if residual is not None else out)
    args += (prologue_scale, prologue_shift) if has_prologue else (bias, bias)
    args += (out, partials, m, h, w, p, q, stride_h, stride_w, pad_h, pad_w)
    # The interpreter's bfloat16 dot is wrong and its float32 -> bfloat16 cast truncates: both are patched in-kernel.
    interpreted = interpreting()
    specialization |= {
        "M_LOG2": m.bit_length(),
        "PROLOGUE_RELU": has_prologue and prologue_relu,
        "SPLIT_K": split_k,
        "UPCAST_DOT": interpreted,
        "ROUND_BF16_RTNE": interpreted and dtype == torch.bfloat16,
    }

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_N"]) * split_k,)

    if config is not None:
        _conv_bn_act_kernel[grid](
            *args, **specialization, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages
        )
    elif interpreted:
        reduction_step = r * s * c if specialization["FLAT_REDUCTION"] else c
        _conv_bn_act_kernel[grid](*args, **specialization, **conv_configs.interpreter_meta(m, k, reduction_step))
    else:
        _autotuned_kernel(dtype, tf32, form)[grid](*args, **specialization)
    if split_k > 1:
        split_k_epilogue(partials, bias, out, residual=residual, relu=relu)
    return out


class _Variant(NamedTuple):
    """A fused variant the ResNets launch. C is representative (it is compile-time, with K = 2*C or 64): C = 3 takes
    the flat reduction, 1x1 convolutions the pointwise path."""

    name: str
    r: int
    c: int
    residual: bool = False
    relu: bool = False
    prologue: bool = False
    prologue_relu: bool = True
    split_k: int = 1
    uint8_input: bool = False


_RESNET_VARIANTS = (
    _Variant("stem 7x7 C=3 +relu", 7, 3, relu=True),
    # The stem on raw uint8 images, normalized by its prologue, where the TMA stem does not apply.
    _Variant(
        "stem 7x7 C=3 uint8 normalize +relu", 7, 3, relu=True, prologue=True, prologue_relu=False, uint8_input=True
    ),
    _Variant("3x3 +relu", 3, 128, relu=True),
    _Variant("3x3 +residual +relu", 3, 128, residual=True, relu=True),
    _Variant("3x3 +residual", 3, 128, residual=True),
    _Variant("3x3 prologue +relu", 3, 128, relu=True, prologue=True),
    # layer4's 3x3 at batch 1: 72 steps of 64 channels, split 12 ways on 132 SMs.
    _Variant("3x3 +relu split-k 12", 3, 512, relu=True, split_k=12),
    _Variant("1x1", 1, 256),
    _Variant("1x1 +relu", 1, 256, relu=True),
    _Variant("1x1 +residual +relu", 1, 256, residual=True, relu=True),
    _Variant("1x1 +residual", 1, 256, residual=True),
    _Variant("1x1 prologue", 1, 256, prologue=True),
    _Variant("1x1 prologue +relu", 1, 256, relu=True, prologue=True),
)
# (operand dtype, TF32 dot): float32 has two kernels, IEEE on the FMA units and TF32 on the tensor cores.
_DOT_KINDS = ((torch.float16, False), (torch.bfloat16, False), (torch.float32, False), (torch.float32, True))
_INT_ARGS = ("M", "H", "W", "P", "Q", "stride_h", "stride_w", "pad_h", "pad_w", "M_LOG2")


def compile_cases() -> list[CompileCase]:
    """Every GPU specialization the ResNets launch: dtype (and dot precision) × fused variant × its form's configs."""
    cases = []
    for dtype, allow_tf32 in _DOT_KINDS:
        ty = TRITON_TYPE_NAMES[dtype]
        for v in _RESNET_VARIANTS:
            signature = conv_configs.conv_signature(
                _conv_bn_act_kernel.arg_names, ty, _INT_ARGS, uint8_input=v.uint8_input
            )
            pad = (v.r // 2, v.r // 2)
            constexprs = _specialization(
                v.c, max(64, 2 * v.c), (v.r, v.r), pad, v.residual, v.relu, v.prologue, allow_tf32
            )
            form = conv_configs.pointer_form(constexprs["POINTWISE"], constexprs["FLAT_REDUCTION"])
            constexprs |= {"PROLOGUE_RELU": v.prologue and v.prologue_relu, "SPLIT_K": v.split_k}
            constexprs |= {"UPCAST_DOT": False, "ROUND_BF16_RTNE": False}
            variant = f"{ty}{' tf32' if allow_tf32 else ''} {v.name}"
            cases += [
                conv_configs.config_case(
                    "conv_bn_act",
                    _conv_bn_act_kernel.fn,
                    variant,
                    signature,
                    constexprs,
                    config,
                    dtype,
                    block_m=config.kwargs["BLOCK_M"],
                )
                for config in conv_configs.autotune_configs(dtype, allow_tf32, form)
            ]
    return cases

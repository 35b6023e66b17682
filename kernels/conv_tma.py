"""Convolution + folded BatchNorm (+ residual) (+ ReLU) whose taps are TMA boxes of the NHWC input.

For tap (r, s) and a BLOCK_H x BLOCK_W tile of output pixels, the input pixels a tap needs form one box of a tensor
descriptor over the input (`tl.make_tensor_descriptor`): 4-D [N, H, W, C] at stride 1, and at stride 2 a 5-D view
[N, H/2, 2, W/2, 2C] whose unit steps are every other row and pixel. Boxes that hang over the border come back
zero-filled, which is exactly the convolution's zero padding, so the main loop has no masks and no address math.
The product is computed transposed (swap-AB: out^T = W^T x^T, the input tile as the dot's second operand), the form
in which Triton 3.6 compiles the 4-D and 5-D boxes cleanly to TMA + wgmma. Warp specialization of this loop aborts
the compiler, so the kernel is not persistent: one program per output tile (times the split-K factor).

Power-of-two boxes do not divide every map: 8x8 boxes cover 56x56 exactly but 7x7 at 77%, so `models` picks this
form or the pointer kernel (`kernels/conv_bn_act.py`) per layer. The stem runs here too, over a space-to-depth image
(`kernels/space_to_depth.py`): CELL = 2 makes the prologue's padding test per original pixel.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels import conv_configs
from kernels._common import TRITON_TYPE_NAMES, CompileCase, check_prologue, check_tensor, int_pair, interpreting
from kernels._grid import sm_count, split_k_factor
from kernels._interpreter import round_to_bfloat16
from kernels._tma import TMA_DTYPES, set_descriptor_allocator, tma_channels_ok, tma_compatible, tma_operands
from kernels.autotune import autotune
from kernels.split_k_epilogue import split_k_epilogue


@triton.jit(do_not_specialize=["N", "H", "W", "P", "Q", "H_IMAGE", "W_IMAGE", "M_LOG2"])
def _conv_tma_kernel(
    x_ptr,  # input, NHWC (N, H, W, C): activations, or the stem's space-to-depth image (uint8 with a prologue)
    w_ptr,  # packed weight (R*S*C, K), row (r*S + s)*C + c
    bias_ptr,  # folded BatchNorm shift, (K,) float32
    res_ptr,  # residual, NHWC (N, P, Q, K); read only if HAS_RESIDUAL
    scale_ptr,  # prologue scale, (C,) float32; read only if HAS_PROLOGUE
    shift_ptr,  # prologue shift, (C,) float32; read only if HAS_PROLOGUE
    out_ptr,  # output, NHWC (N, P, Q, K), w_ptr's dtype; written only if SPLIT_K == 1
    part_ptr,  # float32 partial products (SPLIT_K, N, P, Q, K); written only if SPLIT_K > 1
    N,
    H,
    W,
    P,
    Q,
    H_IMAGE,  # the prologue's padding bounds, in pixels of the image before space-to-depth (H, W when CELL = 1)
    W_IMAGE,
    M_LOG2,  # autotune key only (bit length of N*P*Q)
    C: tl.constexpr,
    K: tl.constexpr,
    R: tl.constexpr,
    S: tl.constexpr,
    STRIDE: tl.constexpr,  # 1 or 2 (2 needs even H and W)
    PAD_H: tl.constexpr,
    PAD_W: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    APPLY_RELU: tl.constexpr,
    HAS_PROLOGUE: tl.constexpr,
    PROLOGUE_RELU: tl.constexpr,  # relu(x*scale + shift) (pre-activation), or only x*scale + shift (normalization)
    CELL: tl.constexpr,  # space-to-depth cell side: channel (dy*CELL + dx)*C/CELL^2 + c is pixel (CELL*h+dy, CELL*w+dx)
    SPLIT_K: tl.constexpr,  # reduction split this many ways (sub-wave grids); divides R*S*C // BLOCK_K
    UPCAST_DOT: tl.constexpr,  # float32 operands for tl.dot (the interpreter's bfloat16 dot is wrong)
    ROUND_BF16_RTNE: tl.constexpr,  # round to nearest even before bfloat16 casts (the interpreter truncates)
    DOT_PRECISION: tl.constexpr,  # "ieee" (16-bit operands) or "tf32"
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    BLOCK_PIX: tl.constexpr = BLOCK_H * BLOCK_W
    if STRIDE == 1:
        x_desc = tl.make_tensor_descriptor(
            x_ptr, shape=[N, H, W, C], strides=[H * W * C, W * C, C, 1], block_shape=[1, BLOCK_H, BLOCK_W, BLOCK_K]
        )
    else:
        # Input row 2h + dh is row h of the view's dimension 1 at index dh of dimension 2; a pixel pair (2w, 2w + 1)
        # is one row of the innermost dimension, 2C channels long.
        x_desc = tl.make_tensor_descriptor(
            x_ptr,
            shape=[N, H // 2, 2, W // 2, 2 * C],
            strides=[H * W * C, 2 * W * C, W * C, 2 * C, 1],
            block_shape=[1, BLOCK_H, 1, BLOCK_W, BLOCK_K],
        )
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[R * S * C, K], strides=[K, 1], block_shape=[BLOCK_K, BLOCK_N])
    if SPLIT_K > 1:
        part_desc = tl.make_tensor_descriptor(
            part_ptr,
            shape=[SPLIT_K * N, P, Q, K],
            strides=[P * Q * K, Q * K, K, 1],
            block_shape=[1, BLOCK_H, BLOCK_W, BLOCK_N],
        )
    else:
        out_desc = tl.make_tensor_descriptor(
            out_ptr, shape=[N, P, Q, K], strides=[P * Q * K, Q * K, K, 1], block_shape=[1, BLOCK_H, BLOCK_W, BLOCK_N]
        )
        if HAS_RESIDUAL:
            res_desc = tl.make_tensor_descriptor(
                res_ptr,
                shape=[N, P, Q, K],
                strides=[P * Q * K, Q * K, K, 1],
                block_shape=[1, BLOCK_H, BLOCK_W, BLOCK_N],
            )

    # Consecutive programs share one pixel tile (its input boxes stay in L2) across the output-channel blocks.
    NUM_PID_N: tl.constexpr = (K + BLOCK_N - 1) // BLOCK_N
    pid = tl.program_id(0)
    split = pid % SPLIT_K
    pid_n = (pid // SPLIT_K) % NUM_PID_N
    pixel_tile = pid // (SPLIT_K * NUM_PID_N)
    tiles_q = tl.cdiv(Q, BLOCK_W)
    tiles_p = tl.cdiv(P, BLOCK_H)
    q0 = (pixel_tile % tiles_q) * BLOCK_W
    p0 = (pixel_tile // tiles_q) % tiles_p * BLOCK_H
    n = pixel_tile // (tiles_q * tiles_p)
    off_n = pid_n * BLOCK_N

    C_STEPS: tl.constexpr = C // BLOCK_K
    STEPS: tl.constexpr = R * S * C_STEPS // SPLIT_K
    acc = tl.zeros((BLOCK_N, BLOCK_PIX), dtype=tl.float32)
    for i in range(STEPS):
        step = split * STEPS + i
        tap = step // C_STEPS
        c0 = (step % C_STEPS) * BLOCK_K
        r = tap // S
        s = tap % S
        if STRIDE == 1:
            x_tile = x_desc.load([n, p0 + r - PAD_H, q0 + s - PAD_W, c0])
        else:
            # Input row 2p + r - PAD_H: row p + floor((r - PAD_H) / 2) of parity (r - PAD_H) mod 2, written with
            # non-negative operands only; likewise for columns, the parity picking half of the 2C-channel row.
            x_tile = x_desc.load(
                [
                    n,
                    p0 + (r + PAD_H) // 2 - PAD_H,
                    (r + PAD_H) % 2,
                    q0 + (s + PAD_W) // 2 - PAD_W,
                    (s + PAD_W) % 2 * C + c0,
                ]
            )
        x_tile = x_tile.reshape(BLOCK_PIX, BLOCK_K)
        if HAS_PROLOGUE:
            pix = tl.arange(0, BLOCK_PIX)
            c = c0 + tl.arange(0, BLOCK_K)
            # The image pixel each element holds; the padding is zero *after* the prologue, so it is masked here.
            C_CELL: tl.constexpr = C // (CELL * CELL)
            row = ((p0 + pix // BLOCK_W) * STRIDE + r - PAD_H)[:, None] * CELL + (c // (CELL * C_CELL))[None, :]
            col = ((q0 + pix % BLOCK_W) * STRIDE + s - PAD_W)[:, None] * CELL + ((c // C_CELL) % CELL)[None, :]
            inside = (row >= 0) & (row < H_IMAGE) & (col >= 0) & (col < W_IMAGE)
            act = x_tile.to(tl.float32) * tl.load(scale_ptr + c)[None, :] + tl.load(shift_ptr + c)[None, :]
            if PROLOGUE_RELU:
                act = tl.maximum(act, 0.0)
            act = tl.where(inside, act, 0.0)
            if ROUND_BF16_RTNE:
                act = round_to_bfloat16(act)
            x_tile = act.to(w_ptr.dtype.element_ty)
        w_tile = w_desc.load([tap * C + c0, off_n])
        if UPCAST_DOT:
            acc = tl.dot(w_tile.to(tl.float32).T, x_tile.to(tl.float32).T, acc, input_precision="ieee")
        else:
            acc = tl.dot(w_tile.T, x_tile.T, acc, input_precision=DOT_PRECISION)

    if SPLIT_K > 1:
        part_desc.store([split * N + n, p0, q0, off_n], acc.T.reshape(1, BLOCK_H, BLOCK_W, BLOCK_N))
    else:
        # Epilogue on the float32 accumulator: bias, residual, ReLU, one store (rows past P, Q are clipped).
        offs_n = off_n + tl.arange(0, BLOCK_N)
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < K, other=0.0)[:, None]
        out = acc.T
        if HAS_RESIDUAL:
            out += res_desc.load([n, p0, q0, off_n]).reshape(BLOCK_PIX, BLOCK_N).to(tl.float32)
        if APPLY_RELU:
            out = tl.maximum(out, 0.0)
        if ROUND_BF16_RTNE:
            out = round_to_bfloat16(out)
        out_desc.store([n, p0, q0, off_n], out.to(out_ptr.dtype.element_ty).reshape(1, BLOCK_H, BLOCK_W, BLOCK_N))


@functools.cache
def _autotuned_kernel(dtype: torch.dtype) -> triton.runtime.Autotuner:
    name = f"conv_tma {TRITON_TYPE_NAMES[dtype]}"
    return autotune(name, conv_configs.taps_tma_configs(), conv_configs.TAPS_TMA_KEY)(_conv_tma_kernel)


def supports(
    c: int, k: int, dtype: torch.dtype, *, stride: int, height: int, width: int, allow_tf32: bool = False
) -> bool:
    """Whether `conv_tma` takes this layer: tensor-core operands, 16-byte rows, stride 1, or 2 on an even map."""
    strided_ok = stride == 1 or (stride == 2 and height % 2 == 0 and width % 2 == 0)
    return tma_operands(dtype, allow_tf32) and tma_channels_ok(c, k, dtype) and strided_ok


def _specialization(
    c: int,
    k: int,
    kernel: tuple[int, int],
    stride: int,
    padding: tuple[int, int],
    dtype: torch.dtype,
    fusions: dict[str, bool],
    cell: int,
    split_k: int,
) -> dict:
    """The kernel's shape and fusion constexprs, shared by the launcher and `compile_cases`."""
    return {
        "C": c,
        "K": k,
        "R": kernel[0],
        "S": kernel[1],
        "STRIDE": stride,
        "PAD_H": padding[0],
        "PAD_W": padding[1],
        **fusions,
        "CELL": cell,
        "SPLIT_K": split_k,
        "DOT_PRECISION": "tf32" if dtype == torch.float32 else "ieee",
        "BLOCK_K": conv_configs.tma_block_k(c, dtype),
    }


def conv_tma(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    residual: torch.Tensor | None = None,
    relu: bool = False,
    prologue_scale: torch.Tensor | None = None,
    prologue_shift: torch.Tensor | None = None,
    prologue_relu: bool = True,
    cell: int = 1,
    image_size: tuple[int, int] | None = None,
    output_size: tuple[int, int] | None = None,
    allow_tf32: bool = False,
    split_k: int | None = None,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """relu?(conv(prologue?(x), weight) + bias (+ residual)), all NHWC; returns [N, P, Q, K] in weight's dtype.

    x: [N, H, W, C] in weight's dtype (float16/bfloat16, float32 with allow_tf32: TF32 tensor cores), or uint8 with
    a prologue; C a multiple of 16. weight: [R*S*C, K] from `pack_conv_weight`, K * itemsize a multiple of 16 bytes.
    stride: 1, or 2 with H and W even (the same along both). bias: [K] float32. residual: [N, P, Q, K], weight's dtype.
    prologue_scale/shift: [C] float32, both or neither: the input becomes relu(x*scale + shift) (prologue_relu) or
    x*scale + shift as loaded, and the padding stays exactly zero after it.
    A space-to-depth input (the stem, `kernels.space_to_depth`): cell = 2, image_size = the (H, W) before it, which
    bound the prologue's padding per original pixel, and output_size = the original convolution's (P, Q).
    split_k: reduction splits (a divisor of R*S*C / BLOCK_K); None splits only grids below one wave of the SMs.
    config: one of `conv_configs.taps_tma_configs()` instead of autotuning (tests, benchmarks).
    """
    weight = check_tensor("weight", weight, ndim=2, dtypes=TMA_DTYPES)
    dtype = weight.dtype
    has_prologue = prologue_scale is not None or prologue_shift is not None
    x = check_tensor("x", x, ndim=4, dtypes=(dtype, torch.uint8) if has_prologue else (dtype,), device=weight.device)
    n, h, w, c = x.shape
    r, s = int_pair("kernel_size", kernel_size, 1)
    stride_h, stride_w = int_pair("stride", stride, 1)
    stride = stride_h if stride_h == stride_w else 0  # `supports` refuses unequal strides
    pad_h, pad_w = int_pair("padding", padding, 0)
    if output_size is None:
        output_size = ((h + 2 * pad_h - r) // stride_h + 1, (w + 2 * pad_w - s) // stride_w + 1)
    p, q = int_pair("output_size", output_size, 1)
    k = weight.shape[1]
    if weight.shape[0] != r * s * c:
        raise ValueError(f"weight has {weight.shape[0]} rows, expected R*S*C = {r}*{s}*{c} = {r * s * c}")
    if not supports(c, k, dtype, stride=stride, height=h, width=w, allow_tf32=allow_tf32):
        raise ValueError(
            f"x: conv_tma takes float16/bfloat16 (float32 with allow_tf32) with C % 16 == 0, 16-byte output rows "
            f"and stride 1 or 2 (even H, W), got {str(dtype).removeprefix('torch.')} C={c} K={k} stride={stride} "
            f"{h}x{w} allow_tf32={allow_tf32}"
        )
    if cell not in (1, 2) or c % (cell * cell):
        raise ValueError(f"cell must be 1 or 2 and divide C into cell*cell pixels, got cell={cell} with C={c}")
    image_h, image_w = image_size if image_size is not None else (h * cell, w * cell)
    bias = check_tensor("bias", bias, dtypes=(torch.float32,), device=x.device, shape=(k,))
    if residual is not None:
        check_tensor("residual", residual, dtypes=(dtype,), device=x.device, shape=(n, p, q, k))
    check_prologue(prologue_scale, prologue_shift, c, x.device)
    if n * h * w * c >= 2**31 or n * p * q * k >= 2**31:
        raise ValueError(f"x of shape {tuple(x.shape)} is too large: its element offsets must fit in int32")
    out = torch.empty((n, p, q, k), dtype=dtype, device=x.device)
    if n == 0:
        return out
    for name, t in (("x", x), ("weight", weight), ("residual", residual)):
        if t is not None and not tma_compatible(t):
            raise ValueError(f"{name} is not 16-byte aligned: TMA needs an aligned base address")

    fusions = {
        "HAS_RESIDUAL": residual is not None,
        "APPLY_RELU": relu,
        "HAS_PROLOGUE": has_prologue,
        "PROLOGUE_RELU": has_prologue and prologue_relu,
    }
    meta = _specialization(c, k, (r, s), stride, (pad_h, pad_w), dtype, fusions, cell, 1)
    steps = r * s * c // meta["BLOCK_K"]
    sms = sm_count(x.device)
    configs = conv_configs.taps_tma_configs()
    if split_k is None:
        tiles = max(_pixel_tiles(n, p, q, cfg) * triton.cdiv(k, cfg.kwargs["BLOCK_N"]) for cfg in configs)
        split_k = split_k_factor(tiles, steps, sms)
    if split_k < 1 or steps % split_k:
        raise ValueError(
            f"split_k must divide the {steps} reduction steps of {meta['BLOCK_K']} channels, got {split_k}"
        )
    partials = torch.empty((split_k, n, p, q, k), dtype=torch.float32, device=x.device) if split_k > 1 else bias
    interpreted = interpreting()
    meta |= {
        "SPLIT_K": split_k,
        "UPCAST_DOT": interpreted,
        "ROUND_BF16_RTNE": interpreted and dtype == torch.bfloat16,
    }
    # Unused pointer slots get any tensor of the right dtype, so that every launch has one signature.
    args: tuple[object, ...] = (x, weight, bias, residual if residual is not None else out)
    args += (prologue_scale, prologue_shift) if has_prologue else (bias, bias)
    args += (out, partials, n, h, w, p, q, image_h, image_w, (n * p * q).bit_length())

    def grid(launch: dict) -> tuple[int]:
        return (_pixel_tiles(n, p, q, launch) * triton.cdiv(k, launch["BLOCK_N"]) * split_k,)

    set_descriptor_allocator()
    if config is None and not interpreted:
        _autotuned_kernel(dtype)[grid](*args, **meta)
    else:
        config = config or conv_configs.taps_tma_interpreter_config(p, q, k)
        launch = meta | config.kwargs
        _conv_tma_kernel[grid](*args, **launch, num_warps=config.num_warps, num_stages=config.num_stages)
    if split_k > 1:
        split_k_epilogue(partials.view(split_k, n * p * q, k), bias, out, residual=residual, relu=relu)
    return out


def _pixel_tiles(n: int, p: int, q: int, meta: dict | triton.Config) -> int:
    meta = meta.kwargs if isinstance(meta, triton.Config) else meta
    return n * triton.cdiv(p, meta["BLOCK_H"]) * triton.cdiv(q, meta["BLOCK_W"])


class _Variant(NamedTuple):
    """A fused variant the ResNets launch through this kernel; C and K are representative (both compile-time)."""

    name: str
    r: int
    c: int
    k: int = 128
    stride: int = 1
    residual: bool = False
    relu: bool = False
    prologue: bool = False
    prologue_relu: bool = True
    cell: int = 1
    split_k: int = 1
    uint8_input: bool = False


_RESNET_VARIANTS = (
    _Variant("3x3 +relu", 3, 128, relu=True),
    _Variant("3x3 +residual +relu", 3, 128, residual=True, relu=True),
    _Variant("3x3 +residual", 3, 128, residual=True),
    _Variant("3x3 prologue +relu", 3, 128, relu=True, prologue=True),
    _Variant("3x3/2 +relu", 3, 128, stride=2, relu=True),
    _Variant("3x3/2 prologue +relu", 3, 128, stride=2, relu=True, prologue=True),
    _Variant("1x1/2", 1, 256, k=512, stride=2),  # downsample shortcuts
    _Variant("1x1/2 prologue", 1, 256, k=512, stride=2, prologue=True),
    # The stem over 2x2 cells of 4 channels: raw uint8 images normalized by the prologue, or float images.
    _Variant(
        "stem cells uint8 normalize +relu",
        4,
        16,
        k=64,
        relu=True,
        prologue=True,
        prologue_relu=False,
        cell=2,
        uint8_input=True,
    ),
    _Variant("stem cells +relu", 4, 16, k=64, relu=True, cell=2),
    # layer4's 3x3 at batch 1: 72 steps of 64 channels, split 12 ways on 132 SMs.
    _Variant("3x3 +relu split-k 12", 3, 512, k=512, relu=True, split_k=12),
)
_INT_ARGS = ("N", "H", "W", "P", "Q", "H_IMAGE", "W_IMAGE", "M_LOG2")


def compile_cases() -> list[CompileCase]:
    """Every GPU specialization (sm_90): operand dtype x autotune config x fused variant."""
    cases = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        ty = TRITON_TYPE_NAMES[dtype]
        kind = f"{ty}{' tf32' if dtype == torch.float32 else ''}"
        for v in _RESNET_VARIANTS:
            signature = conv_configs.conv_signature(
                _conv_tma_kernel.arg_names, ty, _INT_ARGS, uint8_input=v.uint8_input
            )
            fusions = {
                "HAS_RESIDUAL": v.residual,
                "APPLY_RELU": v.relu,
                "HAS_PROLOGUE": v.prologue,
                "PROLOGUE_RELU": v.prologue and v.prologue_relu,
            }
            pad = (2, 2) if v.cell == 2 else (v.r // 2, v.r // 2)
            constexprs = _specialization(v.c, v.k, (v.r, v.r), v.stride, pad, dtype, fusions, v.cell, v.split_k)
            constexprs |= {"UPCAST_DOT": False, "ROUND_BF16_RTNE": False}
            # swap-AB: the output channels (BLOCK_N) are the wgmma's rows
            cases += [
                conv_configs.config_case(
                    "conv_tma",
                    _conv_tma_kernel.fn,
                    f"{kind} {v.name}",
                    signature,
                    constexprs,
                    config,
                    dtype,
                    block_m=config.kwargs["BLOCK_N"],
                    min_arch=90,
                )
                for config in conv_configs.taps_tma_configs()
            ]
    return cases

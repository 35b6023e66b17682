"""1x1 stride-1 convolution + folded BatchNorm (+ residual) (+ ReLU) as a persistent TMA GEMM on NHWC tensors.

GEMM view: (M = N·H·W pixels, C) @ (C, K). Both operands and the output move through tensor descriptors
(`tl.make_tensor_descriptor`: TMA on sm_90, wgmma reading both operands from shared memory), so the main loop issues
no address arithmetic. A fixed grid of at most one program per SM walks the output tiles (persistent), which on
sm_90 lets the compiler warp-specialize the loop (a producer warp issuing TMA loads, consumer warp groups the
wgmma, with `setmaxnreg` moving registers to the consumers) where the config asks for it. 36 of ResNet-50's 53
convolutions are 1x1; the strided ones (downsample shortcuts) go through `kernels.conv_tma`, whose 5-D view reads
every other pixel.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels import conv_configs
from kernels._common import TRITON_TYPE_NAMES, CompileCase, check_prologue, check_tensor, interpreting
from kernels._grid import sm_count, split_k_factor
from kernels._interpreter import round_to_bfloat16
from kernels._tma import TMA_DTYPES, set_descriptor_allocator, tma_channels_ok, tma_compatible, tma_operands
from kernels.autotune import autotune
from kernels.split_k_epilogue import split_k_epilogue


@triton.jit
def _tile_coordinates(tile, num_pid_m, NUM_PID_N: tl.constexpr, GROUP_SIZE_M: tl.constexpr):
    # GROUP_SIZE_M row-blocks share each weight column-block while it is in L2.
    group_id = tile // (GROUP_SIZE_M * NUM_PID_N)
    first_pid_m = group_id * GROUP_SIZE_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_SIZE_M)
    pid_m = first_pid_m + (tile % (GROUP_SIZE_M * NUM_PID_N)) % group_size_m
    pid_n = (tile % (GROUP_SIZE_M * NUM_PID_N)) // group_size_m
    return pid_m, pid_n


@triton.jit(do_not_specialize=["M", "M_PART", "M_LOG2"])
def _conv1x1_tma_kernel(
    x_ptr,  # input, NHWC (N, H, W, C), read as (M, C)
    w_ptr,  # packed weight (C, K)
    bias_ptr,  # folded BatchNorm shift, (K,) float32
    res_ptr,  # residual (M, K); read only if HAS_RESIDUAL
    scale_ptr,  # prologue scale, (C,) float32; read only if HAS_PROLOGUE
    shift_ptr,  # prologue shift, (C,) float32; read only if HAS_PROLOGUE
    out_ptr,  # output (M, K); written only if SPLIT_K == 1
    part_ptr,  # float32 partial products (SPLIT_K, M_PART, K); written only if SPLIT_K > 1
    M,  # N*H*W
    M_PART,  # rows per split in part_ptr: M rounded up to a multiple of every BLOCK_M
    M_LOG2,  # autotune key only (bit length of M)
    C: tl.constexpr,
    K: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    APPLY_RELU: tl.constexpr,
    HAS_PROLOGUE: tl.constexpr,
    SPLIT_K: tl.constexpr,  # reduction split this many ways (sub-wave grids); divides C // BLOCK_K
    UPCAST_DOT: tl.constexpr,  # float32 operands for tl.dot (the interpreter's bfloat16 dot is wrong)
    ROUND_BF16_RTNE: tl.constexpr,  # round to nearest even before bfloat16 casts (the interpreter truncates)
    DOT_PRECISION: tl.constexpr,  # "ieee" (16-bit operands) or "tf32"
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_SIZE_M: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
):
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, C], strides=[C, 1], block_shape=[BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[C, K], strides=[K, 1], block_shape=[BLOCK_K, BLOCK_N])
    if SPLIT_K > 1:
        # Each split's rows are padded to M_PART, so that no tile's rows past M land in the next split. (A 3-D
        # descriptor [SPLIT_K, M, K] would clip them instead, but its reshaped store aborts warp specialization.)
        part_desc = tl.make_tensor_descriptor(
            part_ptr, shape=[SPLIT_K * M_PART, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_N]
        )
    else:
        out_desc = tl.make_tensor_descriptor(out_ptr, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_N])
        if HAS_RESIDUAL:
            res_desc = tl.make_tensor_descriptor(res_ptr, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_N])

    num_pid_m = tl.cdiv(M, BLOCK_M)
    NUM_PID_N: tl.constexpr = (K + BLOCK_N - 1) // BLOCK_N
    STEPS: tl.constexpr = C // BLOCK_K // SPLIT_K
    num_work = num_pid_m * NUM_PID_N * SPLIT_K
    # Not flattened: flatten=True together with warp_specialize silently drops the specialization (DESIGN.md).
    for work in tl.range(tl.program_id(0), num_work, tl.num_programs(0), warp_specialize=WARP_SPECIALIZE):
        split = work % SPLIT_K
        pid_m, pid_n = _tile_coordinates(work // SPLIT_K, num_pid_m, NUM_PID_N, GROUP_SIZE_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for step in range(STEPS):
            c0 = (split * STEPS + step) * BLOCK_K
            # Rows past M come back as zeros (the descriptor's bounds); their outputs are clipped at the store.
            x_tile = x_desc.load([off_m, c0])
            if HAS_PROLOGUE:
                c = c0 + tl.arange(0, BLOCK_K)
                scale = tl.load(scale_ptr + c)
                shift = tl.load(shift_ptr + c)
                act = tl.maximum(x_tile.to(tl.float32) * scale[None, :] + shift[None, :], 0.0)
                if ROUND_BF16_RTNE:
                    act = round_to_bfloat16(act)
                x_tile = act.to(x_ptr.dtype.element_ty)
            w_tile = w_desc.load([c0, off_n])
            if UPCAST_DOT:
                acc = tl.dot(x_tile.to(tl.float32), w_tile.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(x_tile, w_tile, acc, input_precision=DOT_PRECISION)

        if SPLIT_K > 1:
            part_desc.store([split * M_PART + off_m, off_n], acc)
        else:
            # Epilogue on the float32 accumulator: bias, residual, ReLU, one store.
            offs_n = off_n + tl.arange(0, BLOCK_N)
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < K, other=0.0)[None, :]
            if HAS_RESIDUAL:
                acc += res_desc.load([off_m, off_n]).to(tl.float32)
            if APPLY_RELU:
                acc = tl.maximum(acc, 0.0)
            if ROUND_BF16_RTNE:
                acc = round_to_bfloat16(acc)
            out_desc.store([off_m, off_n], acc.to(out_ptr.dtype.element_ty))


@functools.cache
def _autotuned_kernel(dtype: torch.dtype, split: bool) -> triton.runtime.Autotuner:
    name = f"conv1x1_tma {TRITON_TYPE_NAMES[dtype]}{' split-k' if split else ''}"
    return autotune(name, conv_configs.gemm_tma_configs(dtype, split), conv_configs.GEMM_TMA_KEY)(_conv1x1_tma_kernel)


def supports(c: int, k: int, dtype: torch.dtype, allow_tf32: bool = False) -> bool:
    """Whether `conv1x1_tma` takes C -> K channels in `dtype`: tensor-core operands, 16-byte-aligned rows."""
    return tma_operands(dtype, allow_tf32) and tma_channels_ok(c, k, dtype)


def _specialization(c: int, k: int, dtype: torch.dtype, residual: bool, relu: bool, prologue: bool, split_k: int):
    """The kernel's shape and fusion constexprs, shared by the launcher and `compile_cases`."""
    return {
        "C": c,
        "K": k,
        "HAS_RESIDUAL": residual,
        "APPLY_RELU": relu,
        "HAS_PROLOGUE": prologue,
        "SPLIT_K": split_k,
        "DOT_PRECISION": "tf32" if dtype == torch.float32 else "ieee",
        "BLOCK_K": conv_configs.tma_block_k(c, dtype),
    }


def conv1x1_tma(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    residual: torch.Tensor | None = None,
    relu: bool = False,
    prologue_scale: torch.Tensor | None = None,
    prologue_shift: torch.Tensor | None = None,
    allow_tf32: bool = False,
    split_k: int | None = None,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """relu?(prologue?(x) @ weight + bias (+ residual)) over the pixels of an NHWC tensor; returns [N, H, W, K].

    x: [N, H, W, C] float16/bfloat16, or float32 with allow_tf32 (TF32 tensor cores); C a multiple of 16.
    weight: [C, K] (`pack_conv_weight` of a 1x1 kernel), x's dtype, K * itemsize a multiple of 16 bytes.
    bias: [K] float32. residual: [N, H, W, K], x's dtype. prologue_scale/shift: [C] float32, both or neither: the
    input becomes relu(x*scale + shift) as loaded (pre-activation ResNet).
    split_k: reduction splits (a divisor of C / BLOCK_K); None splits only grids below one wave of the card's SMs.
    config: one of `conv_configs.gemm_tma_configs(dtype, split_k > 1)` instead of autotuning (tests, benchmarks).
    """
    x = check_tensor("x", x, ndim=4, dtypes=TMA_DTYPES)
    n, h, w, c = x.shape
    weight = check_tensor("weight", weight, ndim=2, dtypes=(x.dtype,), device=x.device)
    if weight.shape[0] != c:
        raise ValueError(f"weight has {weight.shape[0]} rows, expected C = {c}")
    k = weight.shape[1]
    if not supports(c, k, x.dtype, allow_tf32):
        raise ValueError(
            f"x: conv1x1_tma takes float16/bfloat16 (float32 with allow_tf32) with C % 16 == 0 and 16-byte "
            f"output rows, got {str(x.dtype).removeprefix('torch.')} C={c} K={k} allow_tf32={allow_tf32}"
        )
    bias = check_tensor("bias", bias, dtypes=(torch.float32,), device=x.device, shape=(k,))
    if residual is not None:
        check_tensor("residual", residual, dtypes=(x.dtype,), device=x.device, shape=(n, h, w, k))
    has_prologue = check_prologue(prologue_scale, prologue_shift, c, x.device)
    m = n * h * w
    if m >= 2**31 - conv_configs.PARTIAL_ROW_ALIGN:
        raise ValueError(f"x of shape {tuple(x.shape)} is too large: its pixel count must fit in int32")
    out = torch.empty((n, h, w, k), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    for name, t in (("x", x), ("weight", weight), ("residual", residual)):
        if t is not None and not tma_compatible(t):
            raise ValueError(f"{name} is not 16-byte aligned: TMA needs an aligned base address")

    meta = _specialization(c, k, x.dtype, residual is not None, relu, has_prologue, 1)
    steps = c // meta["BLOCK_K"]
    sms = sm_count(x.device)
    if split_k is None:
        smallest = min(cfg.kwargs["BLOCK_M"] * cfg.kwargs["BLOCK_N"] for cfg in conv_configs.gemm_tma_configs(x.dtype))
        split_k = split_k_factor(triton.cdiv(m * k, smallest), steps, sms)
    if split_k < 1 or steps % split_k:
        raise ValueError(
            f"split_k must divide the {steps} reduction steps of {meta['BLOCK_K']} channels, got {split_k}"
        )
    m_part = triton.cdiv(m, conv_configs.PARTIAL_ROW_ALIGN) * conv_configs.PARTIAL_ROW_ALIGN
    partials = torch.empty((split_k, m_part, k), dtype=torch.float32, device=x.device) if split_k > 1 else bias
    interpreted = interpreting()
    meta |= {
        "SPLIT_K": split_k,
        "UPCAST_DOT": interpreted,
        "ROUND_BF16_RTNE": interpreted and x.dtype == torch.bfloat16,
    }
    # Unused pointer slots get any tensor of the right dtype, so that every launch has one signature.
    args: tuple[object, ...] = (x, weight, bias, residual if residual is not None else out)
    args += (prologue_scale, prologue_shift) if has_prologue else (bias, bias)
    args += (out, partials, m, m_part, m.bit_length())

    def grid(launch: dict) -> tuple[int]:
        tiles = triton.cdiv(m, launch["BLOCK_M"]) * triton.cdiv(k, launch["BLOCK_N"]) * split_k
        return (min(tiles, sms),)  # persistent: at most one program per SM, each walking its share of the tiles

    set_descriptor_allocator()
    if config is None and not interpreted:
        _autotuned_kernel(x.dtype, split_k > 1)[grid](*args, **meta)
    else:
        config = config or conv_configs.gemm_tma_interpreter_config(m, k)
        launch = meta | config.kwargs
        _conv1x1_tma_kernel[grid](*args, **launch, num_warps=config.num_warps, num_stages=config.num_stages)
    if split_k > 1:
        split_k_epilogue(partials, bias, out, residual=residual, relu=relu)
    return out


# (name, residual, relu, prologue): the 1x1 convolutions the ResNets launch (v1 bottlenecks and downsample shortcuts,
# the v2 ones with the pre-activation prologue).
_RESNET_VARIANTS = (
    ("1x1", False, False, False),
    ("1x1 +relu", False, True, False),
    ("1x1 +residual +relu", True, True, False),
    ("1x1 +residual", True, False, False),
    ("1x1 prologue", False, False, True),
    ("1x1 prologue +relu", False, True, True),
)
_INT_ARGS = ("M", "M_PART", "M_LOG2")


def compile_cases() -> list[CompileCase]:
    """Every GPU specialization: operand dtype x autotune config x fused variant, and the split-K configs."""
    cases = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        ty = TRITON_TYPE_NAMES[dtype]
        signature = conv_configs.conv_signature(_conv1x1_tma_kernel.arg_names, ty, _INT_ARGS)
        kind = f"{ty}{' tf32' if dtype == torch.float32 else ''}"
        # C = 256 -> K = 512 (layer2's expansion, representative: C and K are compile-time); split-K at layer4's
        # reduction width (C = 2048 in 32 steps of 64, split 4).
        plain = [(name, 256, res, relu, pro, 1) for name, res, relu, pro in _RESNET_VARIANTS]
        for split, variants in ((False, plain), (True, [("1x1 +relu split-k 4", 2048, False, True, False, 4)])):
            for config in conv_configs.gemm_tma_configs(dtype, split):
                for name, c, residual, relu, prologue, split_k in variants:
                    constexprs = _specialization(c, 512, dtype, residual, relu, prologue, split_k)
                    constexprs |= {"UPCAST_DOT": False, "ROUND_BF16_RTNE": False}
                    cases.append(
                        conv_configs.config_case(
                            "conv1x1_tma",
                            _conv1x1_tma_kernel.fn,
                            f"{kind} {name}",
                            signature,
                            constexprs,
                            config,
                            dtype,
                            block_m=config.kwargs["BLOCK_M"],
                            min_arch=90,
                        )
                    )
    return cases

"""Max pooling over NHWC activations (the ResNet stem's 3×3/2 pool) with PyTorch's max_pool2d semantics."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import SUPPORTED_DTYPES, TRITON_TYPE_NAMES, CompileCase, check_tensor

# ResNet's only max pool sees the stem's 64 channels: one channel tile, loaded as 128 contiguous bytes per row.
# 16 rows keep 8 values a thread: with 32 rows ptxas hoists all nine taps' loads and spills whenever C is not a
# multiple of 16 (no vector loads then); measured with `python -m kernels.report`.
BLOCK_M = 16
BLOCK_C = 64
NUM_WARPS = 4
NUM_STAGES = 1  # no loop to pipeline: the window is unrolled


@triton.jit
def _max_pool2d_nhwc_kernel(
    x_ptr,  # input, NHWC (N, H, W, C)
    y_ptr,  # output, NHWC (N, P, Q, C)
    H,
    W,
    C,
    P,
    Q,
    M,  # N * P * Q output positions
    KERNEL_SIZE: tl.constexpr,
    STRIDE: tl.constexpr,
    PADDING: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_m = offs_m < M
    mask_c = offs_c < C
    q = offs_m % Q
    p = (offs_m // Q) % P
    n = (offs_m // (P * Q)).to(tl.int64)  # int64: N*H*W*C may pass 2**31 for big batches
    h0 = p * STRIDE - PADDING
    w0 = q * STRIDE - PADDING

    # Padding is -inf: the window's max comes from the taps inside the image only.
    acc = tl.full((BLOCK_M, BLOCK_C), float("-inf"), tl.float32)
    for r in tl.static_range(KERNEL_SIZE):
        for s in tl.static_range(KERNEL_SIZE):
            h = h0 + r
            w = w0 + s
            inside = mask_m & (h >= 0) & (h < H) & (w >= 0) & (w < W)
            row = ((n * H + h) * W + w) * C
            tap = tl.load(
                x_ptr + row[:, None] + offs_c[None, :], mask=inside[:, None] & mask_c[None, :], other=float("-inf")
            )
            # PropagateNan.ALL: a NaN in the window gives NaN, as torch's max_pool2d does.
            acc = tl.maximum(acc, tap.to(tl.float32), propagate_nan=tl.PropagateNan.ALL)

    y_offs = offs_m.to(tl.int64)[:, None] * C + offs_c[None, :]
    tl.store(y_ptr + y_offs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_c[None, :])


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def max_pool2d_nhwc(x: torch.Tensor, kernel_size: int = 3, stride: int = 2, padding: int = 1) -> torch.Tensor:
    """Max pool ``x`` [N, H, W, C] (contiguous NHWC) into [N, P, Q, C] of the same dtype.

    Same result as ``F.max_pool2d`` on the NCHW view (square window, ``ceil_mode=False``, dilation 1):
    ``P = (H + 2*padding - kernel_size) // stride + 1``, likewise Q, padded taps never win.
    """
    check_tensor("x", x, ndim=4, dtypes=SUPPORTED_DTYPES)
    _check_positive_int("kernel_size", kernel_size)
    _check_positive_int("stride", stride)
    if isinstance(padding, bool) or not isinstance(padding, int) or not 0 <= padding <= kernel_size // 2:
        raise ValueError(f"padding must be an int in [0, kernel_size // 2 = {kernel_size // 2}], got {padding!r}")
    n, h, w, c = x.shape
    p = (h + 2 * padding - kernel_size) // stride + 1
    q = (w + 2 * padding - kernel_size) // stride + 1
    if p < 1 or q < 1:
        raise ValueError(f"x of spatial size {h}×{w} is smaller than the {kernel_size}×{kernel_size} window")

    y = torch.empty((n, p, q, c), dtype=x.dtype, device=x.device)
    m = n * p * q
    if y.numel() == 0:
        return y
    grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(c, BLOCK_C))
    _max_pool2d_nhwc_kernel[grid](
        x, y, h, w, c, p, q, m, kernel_size, stride, padding, BLOCK_M, BLOCK_C,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )  # fmt: skip
    return y


def compile_cases() -> list[CompileCase]:
    """The GPU specializations ResNet launches: one per dtype, the 3×3/2 pad-1 window, the fixed tile."""
    cases = []
    for dtype in SUPPORTED_DTYPES:
        t = TRITON_TYPE_NAMES[dtype]
        cases.append(
            CompileCase(
                kernel="max_pool2d_nhwc",
                variant=f"{t} k3s2p1",
                fn=_max_pool2d_nhwc_kernel.fn,
                signature={
                    "x_ptr": f"*{t}",
                    "y_ptr": f"*{t}",
                    **dict.fromkeys(("H", "W", "C", "P", "Q", "M"), "i32"),
                    **dict.fromkeys(("KERNEL_SIZE", "STRIDE", "PADDING", "BLOCK_M", "BLOCK_C"), "constexpr"),
                },
                constexprs={"KERNEL_SIZE": 3, "STRIDE": 2, "PADDING": 1, "BLOCK_M": BLOCK_M, "BLOCK_C": BLOCK_C},
                num_warps=NUM_WARPS,
                num_stages=NUM_STAGES,
                dtype=dtype,
            )
        )
    return cases

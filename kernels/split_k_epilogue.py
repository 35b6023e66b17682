"""The second half of a split-K convolution: sum the float32 partial products in a fixed order, then the epilogue.

A convolution whose output tiles do not fill one wave of the card's SMs splits its reduction SPLIT_K ways (see
`kernels._grid.split_k_factor`); each split writes its float32 partial tile to a workspace [SPLIT_K, M, K] (rows
padded per split), and this kernel adds them split 0 first, then applies bias, residual and ReLU like the fused
epilogue. No atomics: the order of the additions never depends on which program finished first, so two runs give
bit-identical output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import SUPPORTED_DTYPES, TRITON_TYPE_NAMES, CompileCase, check_tensor, interpreting
from kernels._interpreter import round_to_bfloat16

BLOCK_M = 32
BLOCK_N = 128  # along the output channels, contiguous in memory: 512-byte float32 rows
NUM_WARPS = 4
NUM_STAGES = 1  # the loop over splits is short and its loads independent


@triton.jit(do_not_specialize=["M", "M_PART"])
def _split_k_epilogue_kernel(
    part_ptr,  # partial products, float32 (SPLIT_K, M_PART, K); rows from M on are padding
    bias_ptr,  # (K,) float32
    res_ptr,  # residual (M, K); read only if HAS_RESIDUAL
    out_ptr,  # output (M, K)
    M,
    M_PART,
    K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    APPLY_RELU: tl.constexpr,
    ROUND_BF16_RTNE: tl.constexpr,  # round to nearest even before the bfloat16 store (the interpreter truncates)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < K
    mask = (offs_m < M)[:, None] & n_ok[None, :]
    offsets = offs_m.to(tl.int64)[:, None] * K + offs_n[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for split in range(SPLIT_K):
        acc += tl.load(part_ptr + split * M_PART.to(tl.int64) * K + offsets, mask=mask, other=0.0)
    acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    if HAS_RESIDUAL:
        acc += tl.load(res_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if APPLY_RELU:
        acc = tl.maximum(acc, 0.0)
    if ROUND_BF16_RTNE:
        acc = round_to_bfloat16(acc)
    tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)


def split_k_epilogue(
    partials: torch.Tensor,
    bias: torch.Tensor,
    out: torch.Tensor,
    *,
    residual: torch.Tensor | None = None,
    relu: bool = False,
) -> torch.Tensor:
    """out[m, k] = relu?(partials[0, m, k] + partials[1, m, k] + ... + bias[k] (+ residual[m, k])); returns out.

    partials: [SPLIT_K, M_PART, K] float32, M_PART >= M rows per split (rows from M on are ignored).
    bias: [K] float32. out and residual: NHWC [N, P, Q, K] (any contiguous shape with K last: M = out.numel() / K),
    residual in out's dtype.
    """
    partials = check_tensor("partials", partials, ndim=3, dtypes=(torch.float32,))
    split_k, m_part, k = partials.shape
    out = check_tensor("out", out, dtypes=SUPPORTED_DTYPES, device=partials.device)
    m = out.numel() // max(k, 1)
    if out.shape[-1] != k or m > m_part:
        raise ValueError(f"out must have K = {k} last and at most {m_part} rows, got shape {tuple(out.shape)}")
    bias = check_tensor("bias", bias, dtypes=(torch.float32,), device=partials.device, shape=(k,))
    if residual is not None:
        check_tensor("residual", residual, dtypes=(out.dtype,), device=partials.device, shape=tuple(out.shape))
    if m == 0 or k == 0:
        return out
    grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(k, BLOCK_N))
    _split_k_epilogue_kernel[grid](
        partials,
        bias,
        residual if residual is not None else out,
        out,
        m,
        m_part,
        K=k,
        SPLIT_K=split_k,
        HAS_RESIDUAL=residual is not None,
        APPLY_RELU=relu,
        ROUND_BF16_RTNE=interpreting() and out.dtype == torch.bfloat16,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        num_warps=NUM_WARPS,
        num_stages=NUM_STAGES,
    )
    return out


def compile_cases() -> list[CompileCase]:
    """Every output dtype x fused variant, at ResNet-50's layer4 width (K = 512) and the largest split (16)."""
    cases = []
    for dtype in SUPPORTED_DTYPES:
        ty = TRITON_TYPE_NAMES[dtype]
        types = {"part_ptr": "*fp32", "bias_ptr": "*fp32", "res_ptr": f"*{ty}", "out_ptr": f"*{ty}"}
        types |= {"M": "i32", "M_PART": "i32"}
        signature = {arg: types.get(arg, "constexpr") for arg in _split_k_epilogue_kernel.arg_names}
        for residual, relu in ((False, True), (True, True), (True, False)):
            constexprs = {
                "K": 512,
                "SPLIT_K": 16,
                "HAS_RESIDUAL": residual,
                "APPLY_RELU": relu,
                "ROUND_BF16_RTNE": False,
                "BLOCK_M": BLOCK_M,
                "BLOCK_N": BLOCK_N,
            }
            fused = f"{'+residual ' if residual else ''}{'+relu' if relu else ''}".strip()
            cases.append(
                CompileCase(
                    kernel="split_k_epilogue",
                    variant=f"{ty} {fused}",
                    fn=_split_k_epilogue_kernel.fn,
                    signature=signature,
                    constexprs=constexprs,
                    num_warps=NUM_WARPS,
                    num_stages=NUM_STAGES,
                    dtype=dtype,
                )
            )
    return cases

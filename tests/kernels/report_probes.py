"""Kernels whose SASS is known in kind, for the compile report's own test (tests/kernels/test_report.py): a plain
pointer copy (no TMA, no warp specialization), and a GEMM whose operands come through tensor descriptors (TMA), once
with and once without a warp-specialized K loop. Not part of the product: nothing in kernels/ launches them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import CompileCase


@triton.jit
def _pointer_copy(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(y_ptr + offsets, tl.load(x_ptr + offsets, mask=mask), mask=mask)


@triton.jit
def _descriptor_gemm(a_ptr, b_ptr, c_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                     WARP_SPECIALIZE: tl.constexpr):  # fmt: skip
    # a: (M, K), b: (K, N), c: (M, N), all row-major float16
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[K, 1], block_shape=[BM, BK])
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[K, N], strides=[N, 1], block_shape=[BK, BN])
    c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[N, 1], block_shape=[BM, BN])
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in tl.range(0, tl.cdiv(K, BK), warp_specialize=WARP_SPECIALIZE):
        acc = tl.dot(a_desc.load([pid_m * BM, k * BK]), b_desc.load([k * BK, pid_n * BN]), acc)
    c_desc.store([pid_m * BM, pid_n * BN], acc.to(tl.float16))


def compile_cases() -> list[CompileCase]:
    """The three probes as the compile report takes them, by variant: "pointer", "tma", "tma warp-specialized"."""
    copy_signature = {"x_ptr": "*fp16", "y_ptr": "*fp16", "n": "i32", "BLOCK": "constexpr"}
    gemm_signature = dict.fromkeys(("a_ptr", "b_ptr", "c_ptr"), "*fp16") | dict.fromkeys(("M", "N", "K"), "i32")
    gemm_signature |= dict.fromkeys(("BM", "BN", "BK", "WARP_SPECIALIZE"), "constexpr")
    common = {"num_warps": 4, "num_stages": 3, "dtype": torch.float16, "block_m": 128}
    gemm = {"BM": 128, "BN": 128, "BK": 64}
    return [
        CompileCase("probe", "pointer", _pointer_copy.fn, copy_signature, {"BLOCK": 1024}, **common),
        CompileCase("probe", "tma", _descriptor_gemm.fn, gemm_signature, gemm | {"WARP_SPECIALIZE": False}, **common),
        CompileCase(
            "probe",
            "tma warp-specialized",
            _descriptor_gemm.fn,
            gemm_signature,
            gemm | {"WARP_SPECIALIZE": True},
            **common,
        ),
    ]

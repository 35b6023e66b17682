"""The classifier head in one kernel: (optional BN+ReLU prologue) → global average pool → linear layer.

The reduction is done with float32 ``tl.sum`` rather than ``tl.dot``: a program computes one image's logits for a
tile of classes, a GEMV whose M (the batch, often 1) is far below a tensor-core tile. Each weight serves ~2 flops
per image, so the op is bound by memory (the weights, re-read from L2 for every image: 4 MB for ResNet-50 in
float16), not by math units. Float32 sums also meet the float32 contract (1e-5) without TF32, and sidestep the
interpreter's broken bfloat16 ``tl.dot``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import SUPPORTED_DTYPES, TRITON_TYPE_NAMES, CompileCase, check_tensor

BLOCK_HW = 8  # 49 = 7×7 positions in 7 steps
BLOCK_C = 128
BLOCK_K = 64  # 1000 classes in 16 programs per image: some parallelism even at batch 1
NUM_WARPS = 4
NUM_STAGES = 1  # Triton pipelines only `for` loops; the loops here are `while` (see the kernel)


@triton.jit
def _avgpool_linear_kernel(
    x_ptr,  # features, NHWC (N, H, W, C), read as (N, HW, C)
    w_ptr,  # packed weight (C, K)
    b_ptr,  # bias (K,), float32
    scale_ptr,  # prologue scale (C,), float32; not read without HAS_PROLOGUE
    shift_ptr,  # prologue shift (C,), float32; not read without HAS_PROLOGUE
    y_ptr,  # logits (N, K), float32
    HW,
    C,
    K,
    HAS_PROLOGUE: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    x_img = x_ptr + n * HW * C

    # `while`, not `for ... in range(C)`: the interpreter cannot take a runtime scalar as a range bound (with numpy
    # 2.4 it is a 1-element array that int() refuses), and making C or HW constexpr would compile one kernel per shape.
    logits = tl.zeros((BLOCK_K,), tl.float32)
    c0 = 0
    while c0 < C:
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        if HAS_PROLOGUE:
            scale = tl.load(scale_ptr + offs_c, mask=mask_c, other=0.0)
            shift = tl.load(shift_ptr + offs_c, mask=mask_c, other=0.0)
        # Accumulate whole tiles and reduce once after the loop: one cross-thread reduction per channel tile.
        sums = tl.zeros((BLOCK_HW, BLOCK_C), tl.float32)
        hw0 = 0
        while hw0 < HW:
            offs_hw = hw0 + tl.arange(0, BLOCK_HW)
            mask = (offs_hw < HW)[:, None] & mask_c[None, :]
            v = tl.load(x_img + offs_hw[:, None] * C + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
            if HAS_PROLOGUE:
                # Masked lanes would turn into relu(shift) > 0: zero them again so they don't join the mean.
                v = tl.where(mask, tl.maximum(v * scale[None, :] + shift[None, :], 0.0), 0.0)
            sums += v
            hw0 += BLOCK_HW
        mean = tl.sum(sums, axis=0) / HW
        w = tl.load(w_ptr + offs_c[:, None] * K + offs_k[None, :], mask=mask_c[:, None] & mask_k[None, :], other=0.0)
        logits += tl.sum(mean[:, None] * w.to(tl.float32), axis=0)
        c0 += BLOCK_C

    logits += tl.load(b_ptr + offs_k, mask=mask_k)
    tl.store(y_ptr + n * K + offs_k, logits, mask=mask_k)


def pack_linear_weight(fc_weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Pack ``nn.Linear.weight`` [classes, C] once at load into the head's layout: contiguous [C, classes] in ``dtype``.

    Works on any device (packing happens before the model moves to the GPU).
    """
    if not isinstance(fc_weight, torch.Tensor) or fc_weight.ndim != 2 or not fc_weight.is_floating_point():
        got = tuple(fc_weight.shape) if isinstance(fc_weight, torch.Tensor) else type(fc_weight).__name__
        raise ValueError(f"fc_weight must be a floating-point [classes, C] tensor, got {got}")
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype must be one of {SUPPORTED_DTYPES}, got {dtype}")
    return fc_weight.detach().t().to(dtype).contiguous()


def avgpool_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    prologue_scale: torch.Tensor | None = None,
    prologue_shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """Float32 logits [N, classes] = mean over H, W of ``x`` [N, H, W, C], then @ ``weight`` [C, classes] + ``bias``.

    ``weight`` comes from :func:`pack_linear_weight` in ``x``'s dtype; ``bias`` [classes] is float32. With
    ``prologue_scale`` and ``prologue_shift`` (both [C] float32, or both None) every feature becomes
    ``relu(x * scale + shift)`` before the mean: ResNet v2's final BatchNorm + ReLU. Accumulates in float32.
    """
    check_tensor("x", x, ndim=4, dtypes=SUPPORTED_DTYPES)
    n, h, w, c = x.shape
    check_tensor("weight", weight, ndim=2, dtypes=(x.dtype,), device=x.device)
    if weight.shape[0] != c:
        raise ValueError(f"weight must be [C={c}, classes] (see pack_linear_weight), got {tuple(weight.shape)}")
    classes = weight.shape[1]
    check_tensor("bias", bias, shape=(classes,), dtypes=(torch.float32,), device=x.device)
    if (prologue_scale is None) != (prologue_shift is None):
        missing = "prologue_shift" if prologue_shift is None else "prologue_scale"
        raise ValueError(f"{missing} must be given together with the other prologue tensor")
    has_prologue = prologue_scale is not None
    if has_prologue:
        check_tensor("prologue_scale", prologue_scale, shape=(c,), dtypes=(torch.float32,), device=x.device)
        check_tensor("prologue_shift", prologue_shift, shape=(c,), dtypes=(torch.float32,), device=x.device)
    if h * w == 0 or c == 0:
        raise ValueError(f"x must have at least one position and one channel, got shape {tuple(x.shape)}")

    y = torch.empty((n, classes), dtype=torch.float32, device=x.device)
    if y.numel() == 0:
        return y
    # Without a prologue the bias stands in for the two pointers the kernel never reads.
    scale = prologue_scale if has_prologue else bias
    shift = prologue_shift if has_prologue else bias
    grid = (n, triton.cdiv(classes, BLOCK_K))
    _avgpool_linear_kernel[grid](
        x, weight, bias, scale, shift, y, h * w, c, classes, has_prologue, BLOCK_HW, BLOCK_C, BLOCK_K,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )  # fmt: skip
    return y


def compile_cases() -> list[CompileCase]:
    """Every GPU specialization of the launcher: dtype × with/without prologue, one tile."""
    cases = []
    for dtype in SUPPORTED_DTYPES:
        t = TRITON_TYPE_NAMES[dtype]
        for has_prologue in (False, True):
            cases.append(
                CompileCase(
                    kernel="avgpool_linear",
                    variant=f"{t}{' bn_relu' if has_prologue else ''}",
                    fn=_avgpool_linear_kernel.fn,
                    signature={
                        "x_ptr": f"*{t}",
                        "w_ptr": f"*{t}",
                        **dict.fromkeys(("b_ptr", "scale_ptr", "shift_ptr", "y_ptr"), "*fp32"),
                        **dict.fromkeys(("HW", "C", "K"), "i32"),
                        **dict.fromkeys(("HAS_PROLOGUE", "BLOCK_HW", "BLOCK_C", "BLOCK_K"), "constexpr"),
                    },
                    constexprs={
                        "HAS_PROLOGUE": has_prologue,
                        "BLOCK_HW": BLOCK_HW,
                        "BLOCK_C": BLOCK_C,
                        "BLOCK_K": BLOCK_K,
                    },
                    num_warps=NUM_WARPS,
                    num_stages=NUM_STAGES,
                    dtype=dtype,
                )
            )
    return cases

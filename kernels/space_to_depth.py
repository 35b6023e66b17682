"""The stem's input, packed once per batch: images -> 2x2 space-to-depth cells of 16 values (channels padded to 4).

The ResNet stem (7x7, stride 2, C = 3) cannot read its input through TMA as is: a pixel of 3 channels is 3 or 6
bytes, and TMA needs 16-byte rows. Packed into cells of 2x2 pixels x 4 channels (the 4th always zero), a cell is 16
values (16 bytes as uint8, 32 as bfloat16) and the stride-2 7x7 convolution becomes a stride-1 4x4 one over the
cells (`space_to_depth_geometry`, `pack_space_to_depth_weight`), which `kernels.conv_tma` runs as TMA boxes. Raw
uint8 images stay uint8 here (16 bytes a cell: the fewest bytes the stem can read), and the stem's prologue
normalizes them; float images (NCHW model input, or NHWC) are cast to the compute dtype in the same pass. Pixels past
an odd H or W are written as 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import SUPPORTED_DTYPES, TRITON_TYPE_NAMES, CompileCase, check_tensor, interpreting
from kernels._interpreter import round_to_bfloat16

CELL = 2  # pixels per cell side
CELL_CHANNELS = 4  # channels per pixel in a cell: RGB and a zero
CELL_VALUES = CELL * CELL * CELL_CHANNELS
BLOCK_CELLS = 64
NUM_WARPS = 4
NUM_STAGES = 1  # no loop


@triton.jit(do_not_specialize=["H", "W", "HS", "WS", "stride_n", "stride_c", "stride_h", "stride_w", "CELLS"])
def _space_to_depth_kernel(
    x_ptr,  # images, (N, C, H, W) or (N, H, W, C): addressed through the four strides
    out_ptr,  # cells, (N, HS, WS, CELL_VALUES), value (dy*2 + dx)*CELL_CHANNELS + c is pixel (2h + dy, 2w + dx)
    H,
    W,
    HS,  # ceil(H / 2)
    WS,
    stride_n,
    stride_c,
    stride_h,
    stride_w,
    CELLS,  # N*HS*WS
    C: tl.constexpr,
    CELL_CHANNELS: tl.constexpr,
    ROUND_BF16_RTNE: tl.constexpr,  # round to nearest even before a bfloat16 cast (the interpreter truncates)
    BLOCK_CELLS: tl.constexpr,
):
    CELL_VALUES: tl.constexpr = 4 * CELL_CHANNELS
    cells = tl.program_id(0) * BLOCK_CELLS + tl.arange(0, BLOCK_CELLS)
    j = tl.arange(0, CELL_VALUES)
    ws = cells % WS
    hs = (cells // WS) % HS
    n = cells // (WS * HS)
    c = j % CELL_CHANNELS
    h = 2 * hs[:, None] + (j // (2 * CELL_CHANNELS))[None, :]
    w = 2 * ws[:, None] + ((j // CELL_CHANNELS) % 2)[None, :]
    in_range = (cells < CELLS)[:, None]
    mask = in_range & (c < C)[None, :] & (h < H) & (w < W)
    offsets = n.to(tl.int64)[:, None] * stride_n + c[None, :] * stride_c + h * stride_h + w * stride_w
    values = tl.load(x_ptr + offsets, mask=mask, other=0)
    if ROUND_BF16_RTNE:
        values = round_to_bfloat16(values.to(tl.float32))
    tl.store(
        out_ptr + cells.to(tl.int64)[:, None] * CELL_VALUES + j[None, :],
        values.to(out_ptr.dtype.element_ty),
        mask=in_range,
    )


def space_to_depth(images: torch.Tensor, dtype: torch.dtype | None = None, *, layout: str = "NHWC") -> torch.Tensor:
    """Images [N, H, W, C] (layout "NHWC") or [N, C, H, W] ("NCHW") -> cells [N, ceil(H/2), ceil(W/2), 16].

    uint8 images stay uint8 (the stem's prologue normalizes them); float images are cast to `dtype` (default: theirs).
    C <= 4. Value (dy*2 + dx)*4 + c of cell (h, w) is channel c of pixel (2h + dy, 2w + dx); the padding (channels
    past C, pixels past H or W) is 0.
    """
    images = check_tensor("images", images, ndim=4, dtypes=(torch.uint8, *SUPPORTED_DTYPES))
    dtype = dtype or images.dtype
    if (images.dtype == torch.uint8) != (dtype == torch.uint8) or dtype not in (torch.uint8, *SUPPORTED_DTYPES):
        raise ValueError(
            f"dtype: uint8 images give uint8 cells, float images float ones; got {images.dtype} -> {dtype}"
        )
    if layout == "NHWC":
        n, h, w, c = images.shape
        stride_n, stride_h, stride_w, stride_c = images.stride()
    elif layout == "NCHW":
        n, c, h, w = images.shape
        stride_n, stride_c, stride_h, stride_w = images.stride()
    else:
        raise ValueError(f"layout must be 'NHWC' or 'NCHW', got {layout!r}")
    if not 0 < c <= CELL_CHANNELS:
        raise ValueError(f"images must have 1 to {CELL_CHANNELS} channels, got shape {tuple(images.shape)} ({layout})")
    hs, ws = triton.cdiv(h, CELL), triton.cdiv(w, CELL)
    out = torch.empty((n, hs, ws, CELL_VALUES), dtype=dtype, device=images.device)
    cells = n * hs * ws
    if cells == 0:
        return out
    if images.numel() >= 2**31 or out.numel() >= 2**31:
        raise ValueError(f"images of shape {tuple(images.shape)} are too large: offsets must fit in int32")
    _space_to_depth_kernel[(triton.cdiv(cells, BLOCK_CELLS),)](
        images,
        out,
        h,
        w,
        hs,
        ws,
        stride_n,
        stride_c,
        stride_h,
        stride_w,
        cells,
        C=c,
        CELL_CHANNELS=CELL_CHANNELS,
        ROUND_BF16_RTNE=interpreting() and dtype == torch.bfloat16 and images.dtype != torch.bfloat16,
        BLOCK_CELLS=BLOCK_CELLS,
        num_warps=NUM_WARPS,
        num_stages=NUM_STAGES,
    )
    return out


def space_to_depth_geometry(kernel_size: tuple[int, int], padding: tuple[int, int]) -> tuple[tuple, tuple]:
    """(kernel, padding) over cells of a stride-2 convolution with this kernel and padding over pixels.

    Output row p reads pixel rows 2p + r - pad, r < R, i.e. cell rows p + i - pad', i < R', with pad' = ceil(pad/2)
    and R' = ceil((R + 2*pad' - pad) / 2): the stem's 7x7 pad 3 becomes 4x4 pad 2.
    """
    cell_padding = tuple((p + 1) // 2 for p in padding)
    cell_kernel = tuple((k + 2 * cp - p + 1) // 2 for k, p, cp in zip(kernel_size, padding, cell_padding, strict=True))
    return cell_kernel, cell_padding


def pack_space_to_depth_weight(weight: torch.Tensor, padding: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """A stride-2 conv weight [K, C, R, S] -> the weight over cells, [R'*S'*16, K] (`pack_conv_weight`'s layout).

    Cell tap (i, j), value (dy*2 + dx)*4 + c takes weight[:, c, 2i + dy + pad - 2*pad', 2j + dx + ...] where that
    tap exists, 0 elsewhere (taps past the kernel, channels past C). Called once at model load.
    """
    if not isinstance(weight, torch.Tensor) or weight.ndim != 4 or not weight.is_floating_point():
        raise ValueError("weight must be a floating-point tensor [K, C, R, S]")
    k, c, r, s = weight.shape
    if c > CELL_CHANNELS:
        raise ValueError(f"weight has {c} input channels; a cell holds {CELL_CHANNELS}")
    (cell_r, cell_s), (cell_ph, cell_pw) = space_to_depth_geometry((r, s), padding)
    packed = weight.new_zeros((cell_r, cell_s, CELL, CELL, CELL_CHANNELS, k))
    for i in range(cell_r):
        for dy in range(CELL):
            tap_r = CELL * i + dy + padding[0] - CELL * cell_ph
            for j in range(cell_s):
                for dx in range(CELL):
                    tap_s = CELL * j + dx + padding[1] - CELL * cell_pw
                    if 0 <= tap_r < r and 0 <= tap_s < s:
                        packed[i, j, dy, dx, :c] = weight[:, :, tap_r, tap_s].T
    return packed.reshape(cell_r * cell_s * CELL_VALUES, k).to(dtype).contiguous()


def space_to_depth_channels(per_channel: torch.Tensor) -> torch.Tensor:
    """A per-channel vector [C] (a prologue's scale or shift) -> its value at each of a cell's 16 positions."""
    cell = per_channel.new_zeros((CELL * CELL, CELL_CHANNELS))
    cell[:, : per_channel.shape[0]] = per_channel
    return cell.reshape(CELL_VALUES).contiguous()


def compile_cases() -> list[CompileCase]:
    """uint8 -> uint8 (raw images), float32 -> every compute dtype (NCHW input), 16-bit -> the same (NHWC activations:
    the layout is in the strides, not compiled in)."""
    cases = []
    for x_type, dtype in (
        ("u8", torch.uint8),
        ("fp32", torch.float16),
        ("fp32", torch.bfloat16),
        ("fp32", torch.float32),
        ("fp16", torch.float16),
        ("bf16", torch.bfloat16),
    ):
        out_type = "u8" if dtype == torch.uint8 else TRITON_TYPE_NAMES[dtype]
        types = {"x_ptr": f"*{x_type}", "out_ptr": f"*{out_type}"}
        constexprs = {"C": 3, "CELL_CHANNELS": CELL_CHANNELS, "ROUND_BF16_RTNE": False, "BLOCK_CELLS": BLOCK_CELLS}
        signature = {
            arg: "constexpr" if arg in constexprs else types.get(arg, "i32") for arg in _space_to_depth_kernel.arg_names
        }
        cases.append(
            CompileCase(
                kernel="space_to_depth",
                variant=f"{x_type} -> {out_type} C=3",
                fn=_space_to_depth_kernel.fn,
                signature=signature,
                constexprs=constexprs,
                num_warps=NUM_WARPS,
                num_stages=NUM_STAGES,
                dtype=dtype,
            )
        )
    return cases

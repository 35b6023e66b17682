"""The stem's kernels: space-to-depth packing, and the 7x7/2 convolution over its cells with the normalizing prologue.

The contract under test: raw uint8 NHWC images through the fused stem give conv2d over the float32 images that
torchvision's ToTensor + Normalize would make, padding included (zero in normalized space), in every form and config.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels import conv_configs
from kernels.conv_bn_act import conv_bn_act, pack_conv_weight
from kernels.conv_tma import conv_tma
from kernels.space_to_depth import (
    compile_cases,
    pack_space_to_depth_weight,
    space_to_depth,
    space_to_depth_channels,
    space_to_depth_geometry,
)
from tests.kernels.conv_reference import TMA_KINDS, assert_parity, config_id
from tests.support.numerics import TOLERANCES

MEAN = torch.tensor([0.485, 0.456, 0.406])  # torchvision's ImageNet normalization, 0..1 units
STD = torch.tensor([0.229, 0.224, 0.225])


def _cells_reference(images: torch.Tensor) -> torch.Tensor:
    """[N, H, W, C] -> [N, ceil(H/2), ceil(W/2), 16] by zero-padding to even sizes and 4 channels, then regrouping."""
    n, h, w, c = images.shape
    padded = F.pad(images.double(), (0, 4 - c, 0, w % 2, 0, h % 2))  # channels, then W, then H
    cells = padded.reshape(n, (h + 1) // 2, 2, (w + 1) // 2, 2, 4).permute(0, 1, 3, 2, 4, 5)
    return cells.reshape(n, (h + 1) // 2, (w + 1) // 2, 16)


@pytest.mark.parametrize("shape", [(2, 7, 10, 3), (1, 8, 8, 3), (3, 5, 3, 1)])
def test_space_to_depth_of_uint8_nhwc_images(shape) -> None:
    images = torch.randint(0, 256, shape, dtype=torch.uint8)
    cells = space_to_depth(images)
    assert cells.dtype == torch.uint8
    torch.testing.assert_close(cells.double(), _cells_reference(images), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_space_to_depth_of_float_nchw_images_casts_to_the_compute_dtype(dtype) -> None:
    images = torch.randn(2, 3, 9, 6)
    cells = space_to_depth(images, dtype, layout="NCHW")
    assert cells.dtype == dtype
    expected = _cells_reference(images.permute(0, 2, 3, 1)).to(dtype)  # torch's cast rounds to nearest even
    torch.testing.assert_close(cells, expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kernel_size", "padding", "cells"), [((7, 7), (3, 3), (4, 4)), ((3, 3), (1, 1), (2, 2)), ((1, 1), (0, 0), (1, 1))]
)
def test_a_stride_2_convolution_is_a_stride_1_convolution_over_cells(kernel_size, padding, cells) -> None:
    # Pure float64 torch: the packing and the geometry alone, on an odd-sized image.
    x = torch.randn(2, 3, 11, 8, dtype=torch.float64)
    weight = torch.randn(5, 3, *kernel_size, dtype=torch.float64)
    cell_kernel, cell_padding = space_to_depth_geometry(kernel_size, padding)
    assert cell_kernel == cells
    packed = pack_space_to_depth_weight(weight, padding, torch.float64)  # [R'*S'*16, K]
    cell_weight = packed.reshape(*cell_kernel, 16, 5).permute(3, 2, 0, 1)
    cell_images = _cells_reference(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    expected = F.conv2d(x, weight, stride=2, padding=padding)
    out = F.conv2d(F.pad(cell_images, (cell_padding[1], cell_kernel[1], cell_padding[0], cell_kernel[0])), cell_weight)
    torch.testing.assert_close(out[:, :, : expected.shape[2], : expected.shape[3]], expected)


def _stem_case(n: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 images [N, H, W, 3], a stem weight [64, 3, 7, 7] and bias, and relu(conv2d(normalize(images))) float64."""
    images = torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8)
    weight, bias = torch.randn(64, 3, 7, 7) / 12, torch.randn(64)
    normalized = (images.double() / 255 - MEAN.double()) / STD.double()  # ToTensor, then Normalize
    conv = F.conv2d(normalized.permute(0, 3, 1, 2), weight.double(), stride=2, padding=3)
    return images, weight, bias, torch.relu(conv + bias.double()[:, None, None])


def _normalization() -> tuple[torch.Tensor, torch.Tensor]:
    return (1 / (255 * STD)).float(), (-MEAN / STD).float()


def _tma_stem(images, weight, bias, dtype, output_size, **launch) -> torch.Tensor:
    """The TMA stem as models.fused_stem runs it: cells, then the 4x4 convolution over them, normalizing."""
    scale, shift = (t.to(images.device) for t in _normalization())
    cell_kernel, cell_padding = space_to_depth_geometry((7, 7), (3, 3))
    return conv_tma(
        space_to_depth(images),
        pack_space_to_depth_weight(weight, (3, 3), dtype).to(images.device),
        bias,
        kernel_size=cell_kernel,
        padding=cell_padding,
        relu=True,
        prologue_scale=space_to_depth_channels(scale),
        prologue_shift=space_to_depth_channels(shift),
        prologue_relu=False,
        cell=2,
        image_size=tuple(images.shape[1:3]),
        output_size=output_size,
        **launch,
    )


@pytest.mark.parametrize("config", conv_configs.taps_tma_configs(), ids=config_id)
@pytest.mark.parametrize(("dtype", "allow_tf32", "tolerance"), TMA_KINDS)
def test_uint8_through_the_tma_stem_equals_normalize_then_conv(dtype, allow_tf32, tolerance, config) -> None:
    images, weight, bias, ref = _stem_case(3, 13, 10)  # odd batch and height: half-filled cells at the border
    out = _tma_stem(images, weight, bias, dtype, tuple(ref.shape[2:]), allow_tf32=allow_tf32, config=config)
    assert out.dtype == dtype
    assert_parity(out, ref, 0.0, tolerance, f"TMA stem {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_uint8_through_the_pointer_stem_equals_normalize_then_conv(dtype) -> None:
    images, weight, bias, ref = _stem_case(2, 11, 14)
    scale, shift = _normalization()
    out = conv_bn_act(
        images,
        pack_conv_weight(weight, dtype),
        bias,
        kernel_size=(7, 7),
        stride=2,
        padding=3,
        relu=True,
        prologue_scale=scale,
        prologue_shift=shift,
        prologue_relu=False,
    )
    assert out.dtype == dtype
    assert_parity(out, ref, 0.0, TOLERANCES[dtype], f"pointer stem {dtype}")


@pytest.mark.parametrize(
    ("images", "dtype", "layout", "name"),
    [
        (torch.randint(0, 255, (1, 4, 4, 3), dtype=torch.uint8), torch.float16, "NHWC", "dtype"),
        (torch.randn(1, 3, 4, 4), torch.uint8, "NCHW", "dtype"),
        (torch.randn(1, 4, 4, 5), torch.float16, "NHWC", "images"),  # 5 channels
        (torch.randn(1, 3, 4, 4), torch.float16, "CHWN", "layout"),
        (torch.randn(1, 3, 4, 4, dtype=torch.float64), None, "NCHW", "images"),
    ],
)
def test_space_to_depth_rejects_bad_arguments(images, dtype, layout, name) -> None:
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        space_to_depth(images, dtype, layout=layout)


def test_compile_cases_cover_every_input_and_output_dtype() -> None:
    kinds = {(case.signature["x_ptr"], case.signature["out_ptr"]) for case in compile_cases()}
    assert kinds == {("*u8", "*u8"), ("*fp32", "*fp16"), ("*fp32", "*bf16"), ("*fp32", "*fp32")} | {
        ("*fp16", "*fp16"),
        ("*bf16", "*bf16"),
    }


@pytest.mark.gpu
@pytest.mark.parametrize("config", conv_configs.taps_tma_configs(), ids=config_id)
@pytest.mark.parametrize(("dtype", "allow_tf32", "tolerance"), TMA_KINDS)
def test_uint8_tma_stem_at_224_on_gpu(dtype, allow_tf32, tolerance, config) -> None:
    images, weight, bias, ref = _stem_case(2, 224, 224)
    out = _tma_stem(images.cuda(), weight, bias.cuda(), dtype, (112, 112), allow_tf32=allow_tf32, config=config)
    assert_parity(out.cpu(), ref, 0.0, tolerance, f"TMA stem at 224 {dtype}")

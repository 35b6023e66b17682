"""Parity of the max pool and the pool+linear head kernels with PyTorch, computed in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels import SUPPORTED_DTYPES, avgpool_linear, max_pool2d_nhwc, pack_linear_weight
from tests.support.numerics import TOLERANCES, assert_relative_close

DTYPES = [pytest.param(dtype, id=str(dtype).removeprefix("torch.")) for dtype in SUPPORTED_DTYPES]
# (dtype, bound on the head's relative error ‖out − ref‖ / ‖ref‖ against float64)
HEAD_TOLERANCES = [pytest.param(dtype, TOLERANCES[dtype], id=str(dtype).removeprefix("torch.")) for dtype in TOLERANCES]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("shape", "kernel_size", "stride", "padding"),
    [
        ((1, 16, 16, 64), 3, 2, 1),  # ResNet's stem pool, 112×112 scaled down
        ((2, 9, 12, 70), 3, 2, 1),  # odd, non-square, C not a multiple of the channel tile
        ((1, 7, 7, 3), 3, 2, 1),
        ((3, 1, 1, 5), 3, 2, 1),  # the whole window is padding but its centre
        ((1, 10, 7, 66), 2, 2, 0),
        ((1, 6, 5, 17), 3, 1, 1),
    ],
)
def test_max_pool_matches_torch_exactly(shape, kernel_size, stride, padding, dtype):
    x = torch.randn(shape).to(dtype)
    out = max_pool2d_nhwc(x, kernel_size=kernel_size, stride=stride, padding=padding)
    ref = F.max_pool2d(x.double().permute(0, 3, 1, 2), kernel_size, stride, padding).permute(0, 2, 3, 1)
    # A max only selects one of its inputs: exact in every dtype.
    assert out.dtype == dtype
    torch.testing.assert_close(out, ref.to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize(("dtype", "tolerance"), HEAD_TOLERANCES)
@pytest.mark.parametrize("prologue", [False, True], ids=["plain", "bn_relu"])
@pytest.mark.parametrize(
    ("n", "h", "w", "c", "classes"),
    [
        (1, 7, 7, 512, 10),  # ResNet-18's head at 224×224, few classes
        (3, 1, 1, 130, 67),  # 1×1 map; C and classes not multiples of their tiles
        (3, 5, 3, 3, 5),  # non-square, C=3
        (1, 9, 7, 200, 129),  # 63 positions: the last position tile is partial
    ],
)
def test_head_matches_float64_reference(n, h, w, c, classes, prologue, dtype, tolerance):
    x = torch.randn(n, h, w, c)
    fc = torch.nn.Linear(c, classes)
    scale = torch.randn(c) if prologue else None
    shift = torch.rand(c) + 0.1 if prologue else None  # positive: padded lanes would show up as relu(shift)

    out = avgpool_linear(
        x.to(dtype), pack_linear_weight(fc.weight, dtype), fc.bias.detach(), prologue_scale=scale, prologue_shift=shift
    )

    features = x.double()
    if prologue:
        features = torch.relu(features * scale.double() + shift.double())
    ref = features.mean(dim=(1, 2)) @ fc.weight.detach().double().t() + fc.bias.detach().double()
    assert out.dtype == torch.float32 and out.shape == (n, classes)
    assert_relative_close(out, ref, tolerance, what="head logits [n, class]")


def _head_args(**overrides):
    c, classes = 8, 5
    args = {
        "x": torch.randn(2, 3, 3, c),
        "weight": pack_linear_weight(torch.randn(classes, c), torch.float32),
        "bias": torch.randn(classes),
        "prologue_scale": torch.randn(c),
        "prologue_shift": torch.rand(c),
    }
    return {**args, **overrides}


@pytest.mark.parametrize(
    ("overrides", "bad"),
    [
        ({"x": torch.randn(2, 9, 8)}, "x"),
        ({"x": torch.randn(2, 8, 3, 3).permute(0, 2, 3, 1)}, "x"),  # NCHW memory
        ({"x": torch.randint(0, 5, (2, 3, 3, 8))}, "x"),
        ({"weight": torch.randn(5, 8)}, "weight"),  # unpacked [classes, C]
        ({"weight": torch.randn(8, 5, dtype=torch.float16)}, "weight"),
        ({"bias": torch.randn(6)}, "bias"),
        ({"bias": torch.randn(5, dtype=torch.float16)}, "bias"),
        ({"prologue_scale": None}, "prologue_scale"),
        ({"prologue_shift": None}, "prologue_shift"),
        ({"prologue_scale": torch.randn(9)}, "prologue_scale"),
        ({"prologue_shift": torch.randn(8, dtype=torch.float64)}, "prologue_shift"),
    ],
)
def test_head_rejects_bad_arguments(overrides, bad):
    args = _head_args(**overrides)
    with pytest.raises(ValueError, match=rf"^{bad}\b"):
        avgpool_linear(args.pop("x"), args.pop("weight"), args.pop("bias"), **args)


@pytest.mark.parametrize(
    ("fc_weight", "dtype", "bad"),
    [
        (torch.randn(5, 8, 1), torch.float16, "fc_weight"),
        (torch.randint(0, 5, (5, 8)), torch.float16, "fc_weight"),
        (torch.randn(5, 8), torch.int8, "dtype"),
    ],
)
def test_pack_linear_weight_rejects_bad_arguments(fc_weight, dtype, bad):
    with pytest.raises(ValueError, match=rf"^{bad}\b"):
        pack_linear_weight(fc_weight, dtype)


@pytest.mark.parametrize(
    ("x", "kwargs", "bad"),
    [
        (torch.randn(4, 4, 8), {}, "x"),
        (torch.randn(1, 8, 4, 4).permute(0, 2, 3, 1), {}, "x"),  # NCHW memory
        (torch.randn(1, 4, 4, 8).double(), {}, "x"),
        (torch.randn(1, 1, 1, 8), {"padding": 0}, "x"),  # smaller than the window
        (torch.randn(1, 4, 4, 8), {"kernel_size": 0}, "kernel_size"),
        (torch.randn(1, 4, 4, 8), {"kernel_size": (3, 3)}, "kernel_size"),
        (torch.randn(1, 4, 4, 8), {"stride": 0}, "stride"),
        (torch.randn(1, 4, 4, 8), {"padding": 2}, "padding"),  # more than half the window, as torch refuses
        (torch.randn(1, 4, 4, 8), {"padding": -1}, "padding"),
    ],
)
def test_max_pool_rejects_bad_arguments(x, kwargs, bad):
    with pytest.raises(ValueError, match=rf"^{bad}\b"):
        max_pool2d_nhwc(x, **kwargs)

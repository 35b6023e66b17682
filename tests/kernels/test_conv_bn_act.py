"""Parity of the fused implicit-GEMM convolution against PyTorch in float64.

The reference is the unfused chain conv2d -> batch_norm (random running statistics) -> + residual -> ReLU; the test
folds the BatchNorm into the packed weight and bias itself, so the whole contract of `conv_bn_act` is checked.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import conv_bn_act, conv_configs, pack_conv_weight
from kernels.conv_bn_act import _conv_bn_act_kernel, compile_cases
from tests.kernels.conv_reference import Conv, assert_parity, random_case
from tests.support.numerics import TOLERANCES, assert_relative_close, tolerance_for

# (dtype, largest allowed ‖out − ref‖ / ‖ref‖), kept together.
DTYPE_TOLERANCES = [
    pytest.param(dtype, TOLERANCES[dtype], id=name)
    for dtype, name in ((torch.float32, "fp32"), (torch.float16, "fp16"), (torch.bfloat16, "bf16"))
]

# ResNet-18/50 layer shapes with the channel counts and maps scaled down for the interpreter, then odd ones.
LAYERS = [
    Conv(2, 32, 24, 3, 16, (7, 7), (2, 2), (3, 3), relu=True),  # stem: C = 3 takes the flat reduction
    Conv(2, 14, 14, 32, 32, (3, 3), (1, 1), (1, 1), relu=True),  # basic block conv1
    Conv(2, 14, 14, 32, 32, (3, 3), (1, 1), (1, 1), residual=True, relu=True),  # basic block conv2
    Conv(3, 9, 11, 32, 48, (3, 3), (2, 2), (1, 1), relu=True),  # stride 2 on odd, non-square sizes
    Conv(3, 9, 11, 32, 48, (1, 1), (2, 2)),  # downsample shortcut: 1x1 stride 2
    Conv(1, 7, 7, 48, 96, (1, 1), residual=True, relu=True),  # bottleneck conv3 on a 7x7 map
    Conv(1, 1, 1, 64, 40, (3, 3), (1, 1), (1, 1), relu=True),  # 1x1 map: all taps but the centre are padding
    Conv(2, 8, 6, 40, 72, (3, 3), (1, 1), (1, 1), prologue=True, relu=True),  # pre-activation conv1
    Conv(1, 9, 7, 24, 16, (3, 3), (1, 1), (1, 1), prologue=True, residual=True),  # pre-activation conv2
    Conv(2, 5, 6, 1, 8, (3, 3), (1, 1), (1, 1), relu=True),  # C = 1
    Conv(3, 5, 9, 8, 12, (1, 3), (2, 1), (0, 1), prologue=True),  # non-square kernel, stride and padding
]

# Shapes that cross every tile boundary at SMALL_TILES, as real layers do at the GPU tiles: GROUP_SIZE_M groups with a
# short last one, column blocks and channel chunks with masked tails, a flat reduction of 4.5 steps.
SMALL_TILES = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_SIZE_M": 2}
TILE_EDGES = [
    Conv(1, 9, 10, 40, 72, (3, 3), (1, 1), (1, 1), prologue=True, relu=True),
    Conv(1, 10, 10, 8, 40, (3, 3), (1, 1), (1, 1), residual=True),
    Conv(1, 11, 9, 48, 33, (1, 1), (2, 2), relu=True),
]

# Every fusion combination, on a small padded 3x3 layer (padding is where the prologue can go wrong).
FUSIONS = [
    Conv(1, 6, 5, 16, 24, (3, 3), (1, 1), (1, 1), residual=res, relu=relu, prologue=pro)
    for res in (False, True)
    for relu in (False, True)
    for pro in (False, True)
]


def _check_parity(conv: Conv, dtype: torch.dtype, tolerance: float) -> None:
    kwargs, ref, norm_floor = random_case(conv, dtype)
    out = conv_bn_act(**kwargs)
    assert out.dtype == dtype
    assert_parity(out, ref, norm_floor, tolerance, f"{conv} {dtype}")


@pytest.mark.parametrize(("dtype", "tolerance"), DTYPE_TOLERANCES)
@pytest.mark.parametrize("conv", LAYERS, ids=str)
def test_matches_reference_on_resnet_and_odd_layers(conv: Conv, dtype: torch.dtype, tolerance: float) -> None:
    _check_parity(conv, dtype, tolerance)


@pytest.mark.parametrize(("dtype", "tolerance"), DTYPE_TOLERANCES)
@pytest.mark.parametrize("conv", TILE_EDGES, ids=str)
def test_matches_reference_across_tile_boundaries(
    conv: Conv, dtype: torch.dtype, tolerance: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(conv_configs, "interpreter_meta", lambda *_: SMALL_TILES)
    _check_parity(conv, dtype, tolerance)


@pytest.mark.parametrize(("dtype", "tolerance"), DTYPE_TOLERANCES)
@pytest.mark.parametrize("conv", FUSIONS, ids=str)
def test_every_fusion_combination(conv: Conv, dtype: torch.dtype, tolerance: float) -> None:
    _check_parity(conv, dtype, tolerance)


# Every GPU autotune config of every form of the pointer kernel (the interpreter otherwise runs one tile sized to the
# launch), on layers whose tiles all hang over M, K or the reduction: (form, layer).
FORM_LAYERS = {
    "pointwise": Conv(3, 5, 7, 40, 24, (1, 1), residual=True, relu=True, prologue=True),
    "taps": Conv(1, 6, 5, 24, 40, (3, 3), (2, 2), (1, 1), relu=True, prologue=True),
    "flat": Conv(3, 9, 7, 3, 16, (7, 7), (2, 2), (3, 3), relu=True),  # the stem
}
# (dtype, allow_tf32, tolerance): float32 has two candidate lists, FMA (IEEE) and TF32.
DOT_KINDS = [
    (dtype, allow_tf32, tolerance_for(dtype, allow_tf32))
    for dtype, allow_tf32 in (
        (torch.float32, False),
        (torch.float32, True),
        (torch.float16, False),
        (torch.bfloat16, False),
    )
]


def _every_config() -> list:
    return [
        pytest.param(
            form,
            dtype,
            tf32,
            tolerance,
            config,
            id=f"{form}-{str(dtype).removeprefix('torch.')}{'-tf32' if tf32 else ''}-{conv_configs.describe(config)}",
        )
        for form in FORM_LAYERS
        for dtype, tf32, tolerance in DOT_KINDS
        for config in conv_configs.autotune_configs(dtype, tf32, form)
    ]


@pytest.mark.parametrize(("form", "dtype", "allow_tf32", "tolerance", "config"), _every_config())
def test_every_config_of_every_form_matches_reference(form, dtype, allow_tf32, tolerance, config) -> None:
    conv = FORM_LAYERS[form]
    kwargs, ref, norm_floor = random_case(conv, dtype)
    out = conv_bn_act(**kwargs, allow_tf32=allow_tf32, config=config)
    assert_parity(out, ref, norm_floor, tolerance, f"{conv} {dtype} tf32={allow_tf32} {conv_configs.describe(config)}")


def test_non_pointwise_configs_stay_at_four_warps() -> None:
    # Inductor's conv template miscompiled non-1x1 convolutions at >= 8 warps (pytorch#173068).
    for dtype, tf32, _ in DOT_KINDS:
        for form in ("taps", "flat"):
            assert all(config.num_warps <= 4 for config in conv_configs.autotune_configs(dtype, tf32, form))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_affine_prologue_without_relu_keeps_padding_zero(dtype) -> None:
    # x*scale + shift with a large shift: a padding tap that skipped the mask would add shift*weight.
    x = torch.randn(2, 5, 6, 8).to(dtype)
    weight = torch.randn(9 * 8, 16)
    bias, scale, shift = torch.randn(16), torch.randn(8), torch.rand(8) + 3.0
    normalized = x.double().permute(0, 3, 1, 2) * scale.double()[:, None, None] + shift.double()[:, None, None]
    ref = F.conv2d(normalized, weight.to(dtype).double().reshape(3, 3, 8, 16).permute(3, 2, 0, 1), padding=1)
    ref = ref + bias.double()[:, None, None]
    prologue = {"prologue_scale": scale, "prologue_shift": shift, "prologue_relu": False}
    out = conv_bn_act(x, weight.to(dtype), bias, kernel_size=(3, 3), padding=1, **prologue)  # packed: [R*S*C, K]
    assert_parity(out, ref, 1e-3 * ref.norm().item(), TOLERANCES[dtype], f"affine {dtype}")


@settings(max_examples=12, deadline=None)
@given(
    n=st.integers(1, 2),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    c=st.integers(1, 40),
    k=st.integers(1, 70),
    kernel=st.sampled_from([(1, 1), (3, 3), (7, 7), (3, 1)]),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    pad=st.integers(0, 3),
    flags=st.tuples(st.booleans(), st.booleans(), st.booleans()),
)
def test_random_shapes_float32(n, h, w, c, k, kernel, stride, pad, flags) -> None:
    residual, relu, prologue = flags
    padding = (min(pad, kernel[0] - 1), min(pad, kernel[1] - 1))  # wider padding only adds all-zero outputs
    h, w = max(h, kernel[0] - 2 * padding[0]), max(w, kernel[1] - 2 * padding[1])  # at least one output pixel
    conv = Conv(n, h, w, c, k, kernel, stride, padding, residual=residual, relu=relu, prologue=prologue)
    _check_parity(conv, torch.float32, TOLERANCES[torch.float32])


def test_pack_conv_weight_row_order() -> None:
    weight = torch.randn(5, 3, 2, 4, dtype=torch.float64)  # [K, C, R, S]
    packed = pack_conv_weight(weight, torch.float16)
    assert packed.shape == (2 * 4 * 3, 5) and packed.dtype == torch.float16 and packed.is_contiguous()
    for r, s, c in [(0, 0, 0), (1, 3, 2), (0, 2, 1), (1, 0, 2)]:
        torch.testing.assert_close(packed[(r * 4 + s) * 3 + c], weight[:, c, r, s].half())


@pytest.mark.parametrize(
    ("name", "weight", "dtype"),
    [("weight", torch.randn(4, 3, 3), torch.float32), ("dtype", torch.randn(4, 3, 3, 3), torch.float64)],
)
def test_pack_conv_weight_rejects_bad_arguments(name: str, weight: torch.Tensor, dtype: torch.dtype) -> None:
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        pack_conv_weight(weight, dtype)


@pytest.mark.parametrize("prologue", [False, True])
def test_bfloat16_rounds_to_nearest_even(prologue: bool) -> None:
    """bfloat16 inputs and weights are exact, so the float64 result rounded once (to nearest even) is the answer up
    to accumulation order; a truncating cast (the Triton interpreter's own) would miss half of the elements."""
    x = torch.randn(2, 9, 9, 32).to(torch.bfloat16)
    weight = torch.randn(3 * 3 * 32, 48).to(torch.bfloat16)
    bias = torch.randn(48)
    scale, shift = torch.randn(32), torch.rand(32) + 0.1
    conv_in = x.float()
    if prologue:  # the kernel rounds the activated input to bfloat16 before its dot, as an unfused chain would
        conv_in = torch.relu(conv_in * scale + shift).to(torch.bfloat16).float()
    ref = F.conv2d(
        conv_in.double().permute(0, 3, 1, 2), weight.double().reshape(3, 3, 32, 48).permute(3, 2, 0, 1), padding=1
    )
    ref = (ref + bias.double()[:, None, None]).permute(0, 2, 3, 1).to(torch.bfloat16)
    pro = {"prologue_scale": scale, "prologue_shift": shift} if prologue else {}
    out = conv_bn_act(x, weight, bias, kernel_size=(3, 3), padding=1, **pro)
    differ = out != ref
    ulps = (out.view(torch.int16).int() - ref.view(torch.int16).int()).abs()
    assert differ.float().mean() < 0.01, f"{differ.float().mean():.1%} of outputs are not the nearest bfloat16"
    assert ulps.max() <= 1


def test_empty_batch_gives_empty_output() -> None:
    x = torch.randn(0, 5, 5, 8)
    out = conv_bn_act(x, torch.randn(9 * 8, 4), torch.randn(4), kernel_size=(3, 3), padding=1)
    assert out.shape == (0, 5, 5, 4)


def _valid_args() -> dict:
    return {
        "x": torch.randn(2, 6, 6, 4),
        "weight": torch.randn(3 * 3 * 4, 8),
        "bias": torch.randn(8),
        "kernel_size": (3, 3),
        "stride": 1,
        "padding": 1,
        "residual": torch.randn(2, 6, 6, 8),
        "prologue_scale": torch.rand(4),
        "prologue_shift": torch.rand(4),
    }


BAD_ARGUMENTS = [
    ("x", {"x": torch.randn(6, 6, 4)}),
    ("x", {"x": torch.randn(2, 6, 6, 4, dtype=torch.float64)}),
    ("x", {"x": torch.randn(2, 4, 6, 6).permute(0, 2, 3, 1)}),  # NCHW memory viewed as NHWC
    ("x", {"x": torch.randn(2, 6, 6, 0), "weight": torch.randn(0, 8)}),  # no input channels
    ("weight", {"weight": torch.randn(3 * 3 * 5, 8)}),  # rows != R*S*C
    ("weight", {"weight": torch.randn(3 * 3 * 4, 8, dtype=torch.float16)}),
    ("bias", {"bias": torch.randn(7)}),
    ("bias", {"bias": torch.randn(8, dtype=torch.float16)}),
    ("residual", {"residual": torch.randn(2, 6, 6, 7)}),
    ("residual", {"residual": torch.randn(2, 6, 6, 8, dtype=torch.bfloat16)}),
    ("prologue_shift", {"prologue_shift": None}),
    ("prologue_scale", {"prologue_scale": torch.rand(5)}),
    ("kernel_size", {"kernel_size": (3,)}),
    ("stride", {"stride": 0}),
    ("padding", {"padding": -1}),
    ("output size", {"kernel_size": (9, 9), "weight": torch.randn(9 * 9 * 4, 8)}),
    # uint8 images only with a prologue to normalize them
    (
        "x",
        {"x": torch.randint(0, 255, (2, 6, 6, 4), dtype=torch.uint8), "prologue_scale": None, "prologue_shift": None},
    ),
    ("weight", {"x": torch.randint(0, 255, (2, 6, 6, 4), dtype=torch.uint8), "weight": torch.randn(36, 8).double()}),
    ("split_k", {"split_k": 0}),
]


@pytest.mark.parametrize(("name", "changes"), BAD_ARGUMENTS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD_ARGUMENTS)])
def test_bad_argument_raises_value_error_naming_it(name: str, changes: dict) -> None:
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        conv_bn_act(**(_valid_args() | changes))


def test_compile_cases_match_the_kernel_signature() -> None:
    cases = compile_cases()
    kernel_args = _conv_bn_act_kernel.arg_names
    for case in cases:
        assert list(case.signature) == kernel_args
        assert {a for a, t in case.signature.items() if t == "constexpr"} == set(case.constexprs)
    # Every tensor-core config meets every dtype and variant; float32 has two dot precisions.
    assert len({c.variant for c in cases}) == len(cases)
    assert {c.dtype for c in cases} == {torch.float32, torch.float16, torch.bfloat16}


# On a GPU float32 can also take the TF32 tensor cores, with their own tolerance.
GPU_DOT_KINDS = [
    pytest.param(torch.float32, False, id="fp32"),
    pytest.param(torch.float32, True, id="tf32"),
    pytest.param(torch.float16, False, id="fp16"),
    pytest.param(torch.bfloat16, False, id="bf16"),
]


@pytest.mark.gpu
@pytest.mark.parametrize(("dtype", "allow_tf32"), GPU_DOT_KINDS)
def test_resnet50_layers_on_gpu(dtype: torch.dtype, allow_tf32: bool) -> None:
    layers = [
        Conv(4, 224, 224, 3, 64, (7, 7), (2, 2), (3, 3), relu=True),
        Conv(4, 56, 56, 64, 64, (3, 3), (1, 1), (1, 1), relu=True),
        Conv(4, 56, 56, 64, 256, (1, 1), residual=True, relu=True),
        Conv(4, 56, 56, 256, 512, (1, 1), (2, 2)),
        Conv(1, 7, 7, 512, 512, (3, 3), (1, 1), (1, 1), prologue=True, relu=True),
    ]
    for conv in layers:
        kwargs, ref, norm_floor = random_case(conv, dtype)
        kwargs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        out = conv_bn_act(**kwargs, allow_tf32=allow_tf32).permute(0, 3, 1, 2).cpu()
        bound = tolerance_for(dtype, allow_tf32)
        assert_relative_close(out, ref, bound, what=f"{conv} {dtype} tf32={allow_tf32}", floor=norm_floor)

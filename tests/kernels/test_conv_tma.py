"""Parity of the TMA tap kernel (`kernels/conv_tma.py`) against PyTorch in float64, every autotune config.

Under the interpreter the tensor descriptors are emulated with their bounds (out-of-bounds boxes read zeros), so
these tests check the coordinates of every tap, the strided 5-D view and the prologue's padding mask on border-heavy
shapes: maps smaller than or barely over one box, odd batches, non-square maps, K not a multiple of BLOCK_N.
"""

from __future__ import annotations

import pytest
import torch

from kernels import conv_configs, conv_tma, conv_tma_supports
from kernels.conv_tma import _RESNET_VARIANTS, _conv_tma_kernel, compile_cases
from tests.kernels.conv_reference import TMA_KINDS, Conv, assert_parity, config_id, random_case

# Every tile of every config touches the padding: maps of at most 10x12 against boxes of 8x8 and more.
BORDER_LAYERS = [
    Conv(3, 6, 9, 32, 40, (3, 3), (1, 1), (1, 1), residual=True, relu=True, prologue=True),
    Conv(1, 10, 6, 48, 24, (3, 3), (2, 2), (1, 1), relu=True, prologue=True),  # stride 2: the 5-D view
    Conv(1, 8, 12, 32, 72, (1, 1), (2, 2)),  # downsample shortcut
]


def _check(conv: Conv, dtype: torch.dtype, allow_tf32: bool, tolerance: float, **launch) -> torch.Tensor:
    kwargs, ref, norm_floor = random_case(conv, dtype)
    out = conv_tma(**kwargs, allow_tf32=allow_tf32, **launch)
    assert out.dtype == dtype
    assert_parity(out, ref, norm_floor, tolerance, f"{conv} {dtype} {launch}")
    return out


@pytest.mark.parametrize("config", conv_configs.taps_tma_configs(), ids=config_id)
@pytest.mark.parametrize(("dtype", "allow_tf32", "tolerance"), TMA_KINDS)
@pytest.mark.parametrize("conv", BORDER_LAYERS, ids=str)
def test_every_config_matches_reference_on_border_tiles(conv, dtype, allow_tf32, tolerance, config) -> None:
    _check(conv, dtype, allow_tf32, tolerance, config=config)


@pytest.mark.parametrize(("dtype", "allow_tf32", "tolerance"), TMA_KINDS)
@pytest.mark.parametrize(
    "conv",
    [
        Conv(1, 1, 1, 64, 40, (3, 3), (1, 1), (1, 1), relu=True, prologue=True),  # every tap but the centre is padding
        Conv(2, 7, 7, 16, 16, (3, 3), (1, 1), (1, 1), residual=True),  # a 7x7 map, C = one 16-channel step
        Conv(1, 4, 6, 32, 32, (1, 3), (1, 1), (0, 1), prologue=True),  # non-square kernel
    ],
    ids=str,
)
def test_matches_reference_on_odd_layers(conv, dtype, allow_tf32, tolerance) -> None:
    _check(conv, dtype, allow_tf32, tolerance)


def test_supports_names_what_the_tma_boxes_need() -> None:
    assert conv_tma_supports(64, 64, torch.bfloat16, stride=2, height=56, width=56)
    assert not conv_tma_supports(64, 64, torch.bfloat16, stride=2, height=57, width=56)  # odd map at stride 2
    assert not conv_tma_supports(24, 64, torch.float16, stride=1, height=8, width=8)  # C not in 16-channel steps
    assert not conv_tma_supports(64, 60, torch.float16, stride=1, height=8, width=8)  # 120-byte output rows
    assert not conv_tma_supports(64, 64, torch.float32, stride=1, height=8, width=8)  # IEEE float32
    assert conv_tma_supports(64, 64, torch.float32, stride=1, height=8, width=8, allow_tf32=True)
    assert not conv_tma_supports(64, 64, torch.float16, stride=3, height=9, width=9)


def _valid_args() -> dict:
    return {
        "x": torch.randn(1, 6, 6, 16, dtype=torch.float16),
        "weight": torch.randn(9 * 16, 32, dtype=torch.float16),
        "bias": torch.randn(32),
        "kernel_size": 3,
        "padding": 1,
    }


BAD_ARGUMENTS = [
    ("x", {"x": torch.randn(1, 6, 6, 16)}),  # float32 x against a float16 weight
    ("x", {"x": torch.randint(0, 255, (1, 6, 6, 16), dtype=torch.uint8)}),  # uint8 needs a prologue
    ("x", {"x": torch.randn(1, 7, 6, 16, dtype=torch.float16), "stride": 2}),  # odd map at stride 2
    ("x", {"x": torch.randn(1, 6, 6, 8, dtype=torch.float16), "weight": torch.randn(72, 32, dtype=torch.float16)}),
    ("weight", {"weight": torch.randn(9 * 16, 32, dtype=torch.float64)}),
    ("weight", {"weight": torch.randn(9 * 17, 32, dtype=torch.float16)}),
    ("bias", {"bias": torch.randn(31)}),
    ("residual", {"residual": torch.randn(1, 6, 6, 32)}),
    ("prologue_shift", {"prologue_scale": torch.rand(16)}),
    ("split_k", {"split_k": 4}),  # 9 steps of 16 channels
    ("cell", {"cell": 3}),
]


@pytest.mark.parametrize(("name", "changes"), BAD_ARGUMENTS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD_ARGUMENTS)])
def test_bad_argument_raises_value_error_naming_it(name: str, changes: dict) -> None:
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        conv_tma(**(_valid_args() | changes))


def test_compile_cases_match_the_kernel_signature() -> None:
    cases = compile_cases()
    for case in cases:
        assert list(case.signature) == _conv_tma_kernel.arg_names
        assert {a for a, t in case.signature.items() if t == "constexpr"} == set(case.constexprs)
        assert case.num_warps <= 4 and case.min_arch == 90  # non-1x1 convolutions stay at <= 4 warps
    # Every config meets every variant and operand kind (float16, bfloat16, TF32).
    assert (
        len({c.variant for c in cases})
        == len(cases)
        == 3 * len(_RESNET_VARIANTS) * len(conv_configs.taps_tma_configs())
    )


# At 224x224 on a GPU: each config once on ResNet-50 layers at batch 2 (the autotuner only ever runs its winner).
GPU_LAYERS = [
    Conv(2, 56, 56, 64, 64, (3, 3), (1, 1), (1, 1), relu=True),  # layer1
    Conv(2, 56, 56, 128, 128, (3, 3), (2, 2), (1, 1), relu=True),  # layer2.0's strided 3x3
    Conv(2, 28, 28, 128, 128, (3, 3), (1, 1), (1, 1), residual=True, relu=True, prologue=True),
    Conv(2, 56, 56, 256, 512, (1, 1), (2, 2)),  # downsample
]


@pytest.mark.gpu
@pytest.mark.parametrize("config", conv_configs.taps_tma_configs(), ids=config_id)
@pytest.mark.parametrize(("dtype", "allow_tf32", "tolerance"), TMA_KINDS)
def test_every_config_at_224_on_gpu(dtype, allow_tf32, tolerance, config) -> None:
    for conv in GPU_LAYERS:
        kwargs, ref, norm_floor = random_case(conv, dtype)
        kwargs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        out = conv_tma(**kwargs, allow_tf32=allow_tf32, config=config).cpu()
        assert_parity(out, ref, norm_floor, tolerance, f"{conv} {dtype} {config_id(config)}")

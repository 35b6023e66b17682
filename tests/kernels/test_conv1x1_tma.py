"""Parity of the persistent 1x1 TMA GEMM (`kernels/conv1x1_tma.py`) against PyTorch in float64, every autotune config.

The persistent loop, the warp-specialized configs (which the interpreter runs as plain loops: what they compute is
checked here, that they specialize by the compile report) and the split-K configs, on shapes whose tiles all hang
over M or K: an odd batch of a non-square map, K not a multiple of BLOCK_N, C in 16-channel steps that 64 does not
divide.
"""

from __future__ import annotations

import pytest
import torch

from kernels import conv1x1_tma, conv1x1_tma_supports, conv_configs
from kernels.conv1x1_tma import _conv1x1_tma_kernel, compile_cases
from tests.kernels.conv_reference import TMA_KINDS, Conv, assert_parity, config_id, random_case
from tests.support.numerics import tolerance_for

BORDER_LAYERS = [
    Conv(3, 5, 7, 48, 40, (1, 1), residual=True, relu=True),  # M = 105, C = 3 steps of 16
    Conv(1, 3, 5, 64, 72, (1, 1), relu=True, prologue=True),  # M = 15, the pre-activation prologue
]
SPLIT_LAYER = Conv(1, 3, 3, 96, 24, (1, 1), residual=True, relu=True)  # 3 steps of 32 channels, split 3 ways


def _check(conv: Conv, dtype: torch.dtype, allow_tf32: bool, tolerance: float, **launch) -> torch.Tensor:
    kwargs, ref, norm_floor = random_case(conv, dtype)
    for name in ("kernel_size", "stride", "padding"):
        del kwargs[name]
    out = conv1x1_tma(**kwargs, allow_tf32=allow_tf32, **launch)
    assert out.dtype == dtype
    assert_parity(out, ref, norm_floor, tolerance, f"{conv} {dtype} {launch}")
    return out


def _configs(split: bool) -> list:
    # (dtype, config) pairs: float32 (TF32) has its own list, without warp specialization.
    return [
        pytest.param(dtype, config, id=f"{str(dtype).removeprefix('torch.')}-{config_id(config)}")
        for dtype in (torch.float16, torch.bfloat16, torch.float32)
        for config in conv_configs.gemm_tma_configs(dtype, split)
    ]


def _tolerance(dtype: torch.dtype) -> tuple[bool, float]:
    allow_tf32 = dtype == torch.float32  # the TMA forms take float32 only as TF32
    return allow_tf32, tolerance_for(dtype, allow_tf32)


@pytest.mark.parametrize(("dtype", "config"), _configs(split=False))
@pytest.mark.parametrize("conv", BORDER_LAYERS, ids=str)
def test_every_config_matches_reference_on_border_tiles(conv, dtype, config) -> None:
    _check(conv, dtype, *_tolerance(dtype), config=config)


@pytest.mark.parametrize(("dtype", "config"), _configs(split=True))
def test_every_split_k_config_matches_reference(dtype, config) -> None:
    _check(SPLIT_LAYER, dtype, *_tolerance(dtype), config=config, split_k=3)


@pytest.mark.parametrize(("dtype", "allow_tf32", "tolerance"), TMA_KINDS)
def test_interpreter_tile_matches_reference(dtype, allow_tf32, tolerance) -> None:
    _check(Conv(2, 4, 3, 32, 16, (1, 1), prologue=True), dtype, allow_tf32, tolerance)


def test_supports_names_what_the_tma_boxes_need() -> None:
    assert conv1x1_tma_supports(256, 64, torch.bfloat16)
    assert not conv1x1_tma_supports(24, 64, torch.bfloat16)  # C not in 16-channel steps
    assert not conv1x1_tma_supports(64, 4, torch.float16)  # 8-byte output rows
    assert not conv1x1_tma_supports(64, 64, torch.float32)  # IEEE float32 stays on the pointer kernel
    assert conv1x1_tma_supports(64, 64, torch.float32, allow_tf32=True)


def _valid_args() -> dict:
    return {
        "x": torch.randn(1, 4, 4, 32, dtype=torch.bfloat16),
        "weight": torch.randn(32, 16, dtype=torch.bfloat16),
        "bias": torch.randn(16),
    }


BAD_ARGUMENTS = [
    ("x", {"x": torch.randn(1, 4, 4, 32, dtype=torch.float64)}),
    ("weight", {"x": torch.randn(1, 4, 4, 32)}),  # a bfloat16 weight for float32 x
    ("x", {"x": torch.randn(1, 4, 4, 24, dtype=torch.bfloat16), "weight": torch.randn(24, 16, dtype=torch.bfloat16)}),
    ("weight", {"weight": torch.randn(33, 16, dtype=torch.bfloat16)}),
    ("bias", {"bias": torch.randn(16, dtype=torch.float16)}),
    ("residual", {"residual": torch.randn(1, 4, 4, 15, dtype=torch.bfloat16)}),
    ("prologue_scale", {"prologue_shift": torch.rand(32)}),
    ("split_k", {"split_k": 3}),  # 32 channels: one step of 32
]


@pytest.mark.parametrize(("name", "changes"), BAD_ARGUMENTS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD_ARGUMENTS)])
def test_bad_argument_raises_value_error_naming_it(name: str, changes: dict) -> None:
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        conv1x1_tma(**(_valid_args() | changes))


def test_compile_cases_match_the_kernel_signature() -> None:
    cases = compile_cases()
    for case in cases:
        assert list(case.signature) == _conv1x1_tma_kernel.arg_names
        assert {a for a, t in case.signature.items() if t == "constexpr"} == set(case.constexprs)
        assert case.min_arch == 90
    assert len({c.variant for c in cases}) == len(cases)
    tile = ("BLOCK_M", "BLOCK_N", "WARP_SPECIALIZE")
    configs = {(c.dtype, *(c.constexprs[t] for t in tile), c.num_warps, c.num_stages) for c in cases}
    listed = {
        (dtype, *(config.kwargs[t] for t in tile), config.num_warps, config.num_stages)
        for dtype in (torch.float16, torch.bfloat16, torch.float32)
        for split in (False, True)
        for config in conv_configs.gemm_tma_configs(dtype, split)
    }
    assert configs == listed  # every config of every list is compiled


GPU_LAYERS = [  # ResNet-50 at 224x224, batch 2
    Conv(2, 56, 56, 64, 256, (1, 1), residual=True, relu=True),  # layer1 conv3
    Conv(2, 28, 28, 512, 128, (1, 1), relu=True),  # layer2 conv1
    Conv(2, 7, 7, 2048, 512, (1, 1), relu=True, prologue=True),  # layer4, pre-activation
]


@pytest.mark.gpu
@pytest.mark.parametrize(("dtype", "config"), _configs(split=False) + _configs(split=True))
def test_every_config_at_224_on_gpu(dtype, config) -> None:
    allow_tf32, tolerance = _tolerance(dtype)
    for conv in GPU_LAYERS:
        kwargs, ref, norm_floor = random_case(conv, dtype)
        kwargs = {k: v.cuda() for k, v in kwargs.items() if isinstance(v, torch.Tensor)} | {"relu": conv.relu}
        split_k = 4 if config.kwargs["BLOCK_M"] == 64 and conv.c == 2048 else 1
        out = conv1x1_tma(**kwargs, allow_tf32=allow_tf32, split_k=split_k, config=config).cpu()
        assert_parity(out, ref, norm_floor, tolerance, f"{conv} {dtype} {config_id(config)} split {split_k}")

"""Split-K for grids below one wave: when it splits, the reduction kernel, and bit-identical output run after run.

No atomics anywhere: each split writes its own float32 partial tile and `split_k_epilogue` adds them in split order,
so the result cannot depend on which program finishes first. Under the interpreter programs run one after another
anyway; the `gpu` test repeats the check where thousands run at once.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from kernels import conv1x1_tma, conv_bn_act, conv_tma
from kernels._grid import MIN_STEPS_PER_SPLIT, split_k_factor
from kernels.split_k_epilogue import split_k_epilogue
from tests.kernels.conv_reference import Conv, assert_parity, random_case
from tests.support.numerics import TOLERANCES


@pytest.mark.parametrize(
    ("tiles", "steps", "sms", "expected"),
    [
        (8, 72, 132, 12),  # ResNet-50 layer4 3x3 at batch 1: 96 programs instead of 8
        (32, 36, 132, 4),  # layer3 3x3 at batch 1
        (100, 72, 132, 1),  # split 2 would pass one wave
        (4, 6, 132, 1),  # too few steps to split
        (1, 7, 132, 1),  # a prime step count: only 1 divides it within the limit
        (2, 64, 132, 16),  # capped at MAX_SPLIT_K
    ],
)
def test_split_factor(tiles, steps, sms, expected) -> None:
    split = split_k_factor(tiles, steps, sms)
    assert split == expected
    assert steps % split == 0 and (split == 1 or steps // split >= MIN_STEPS_PER_SPLIT)
    assert split == 1 or tiles * split <= sms


def test_split_k_epilogue_adds_the_splits_then_bias_residual_relu() -> None:
    partials = torch.randn(5, 13, 24)  # 11 real rows, 2 of padding per split
    bias, residual = torch.randn(24), torch.randn(11, 24).to(torch.bfloat16)
    out = split_k_epilogue(partials, bias, torch.empty(11, 24, dtype=torch.bfloat16), residual=residual, relu=True)
    expected = torch.relu(partials[:, :11].double().sum(0) + bias.double() + residual.double())
    torch.testing.assert_close(out, expected.to(torch.bfloat16), rtol=0, atol=0)


# Small maps with long reductions: their grids would fill a few SMs of 132, so each form splits on its own.
SUB_WAVE = {
    "conv_tma": (conv_tma, Conv(1, 7, 7, 128, 64, (3, 3), (1, 1), (1, 1), residual=True, relu=True)),
    "conv1x1_tma": (conv1x1_tma, Conv(1, 3, 3, 512, 64, (1, 1), relu=True, prologue=True)),
    "conv_bn_act": (conv_bn_act, Conv(1, 5, 5, 128, 32, (3, 3), (1, 1), (1, 1), relu=True, prologue=True)),
}


def _launch(form: str, dtype: torch.dtype, **launch) -> tuple[torch.Tensor, torch.Tensor, float]:
    function, conv = SUB_WAVE[form]
    kwargs, ref, norm_floor = random_case(conv, dtype)
    if form == "conv1x1_tma":
        for name in ("kernel_size", "stride", "padding"):
            del kwargs[name]
    return function(**kwargs, **launch), ref, norm_floor


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("form", list(SUB_WAVE))
def test_sub_wave_grids_split_and_match_the_reference(form, dtype, monkeypatch) -> None:
    module = importlib.import_module(f"kernels.{form}")  # the launcher's module, whose epilogue call is recorded
    splits = []

    def recording_epilogue(partials, *args, **kwargs):
        splits.append(partials.shape[0])
        return split_k_epilogue(partials, *args, **kwargs)

    monkeypatch.setattr(module, "split_k_epilogue", recording_epilogue)
    out, ref, norm_floor = _launch(form, dtype)
    assert splits and splits[0] > 1, f"{form} did not split a grid of a few tiles"
    assert_parity(out, ref, norm_floor, TOLERANCES[dtype], f"{form} split {splits}")


@pytest.mark.parametrize(("form", "split_k"), [("conv_tma", 3), ("conv1x1_tma", 4), ("conv_bn_act", 4)])
def test_split_k_runs_are_bit_identical(form, split_k) -> None:
    torch.manual_seed(7)
    first, _, _ = _launch(form, torch.float16, split_k=split_k)
    torch.manual_seed(7)
    second, _, _ = _launch(form, torch.float16, split_k=split_k)
    assert torch.equal(first, second)


def test_pointer_kernel_splits_that_do_not_divide_the_steps() -> None:
    # 3x3 over 128 channels in steps of 128 (the interpreter's tile): 9 steps, 5 splits of 2 (the last one of 1).
    out, ref, norm_floor = _launch("conv_bn_act", torch.float32, split_k=5)
    assert_parity(out, ref, norm_floor, TOLERANCES[torch.float32], "conv_bn_act split 5")


GPU_SUB_WAVE = {  # ResNet-50's layer4 at batch 1
    "conv_tma": (conv_tma, Conv(1, 7, 7, 512, 512, (3, 3), (1, 1), (1, 1), relu=True)),
    "conv1x1_tma": (conv1x1_tma, Conv(1, 7, 7, 2048, 512, (1, 1), relu=True)),
    "conv_bn_act": (conv_bn_act, Conv(1, 7, 7, 512, 512, (3, 3), (1, 1), (1, 1), relu=True, prologue=True)),
}


@pytest.mark.gpu
@pytest.mark.parametrize("form", list(GPU_SUB_WAVE))
def test_split_k_runs_are_bit_identical_on_gpu(form) -> None:
    function, conv = GPU_SUB_WAVE[form]
    kwargs, ref, norm_floor = random_case(conv, torch.bfloat16)
    kwargs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    if form == "conv1x1_tma":
        for name in ("kernel_size", "stride", "padding"):
            del kwargs[name]
    runs = [function(**kwargs) for _ in range(5)]  # autotuned: the first run tunes, the rest reuse its config
    assert all(torch.equal(runs[-1], run) for run in runs[1:])
    assert_parity(runs[-1].cpu(), ref, norm_floor, TOLERANCES[torch.bfloat16], f"{form} on GPU")

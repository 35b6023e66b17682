"""Grid sizing shared by the convolution launchers: the card's SM count, and split-K for grids below one wave."""

from __future__ import annotations

import functools

import torch

from kernels._common import interpreting

# The interpreter has no SMs; its grids are sized as for an H200 (132 SMs), the card the GPU passes run on, so that
# the split-K decisions the CPU tests exercise are the ones that card takes.
INTERPRETER_SM_COUNT = 132
# Splitting further leaves each program too few reduction steps to fill its load pipeline (3-4 stages), and the
# float32 partials ([SPLIT_K, M, K]) and their reduction start to cost more than the idle SMs did.
MIN_STEPS_PER_SPLIT = 4
MAX_SPLIT_K = 16


@functools.cache
def _device_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (one wave of one program per SM), or the H200's under the interpreter."""
    if interpreting() or device.type != "cuda":
        return INTERPRETER_SM_COUNT
    return _device_sm_count(device.index if device.index is not None else torch.cuda.current_device())


def split_k_factor(tiles: int, steps: int, sms: int) -> int:
    """How many ways to split the reduction of a grid of `tiles` output tiles, each `steps` reduction steps long.

    1 when the tiles already fill a wave of `sms` programs; otherwise the largest divisor of `steps` that keeps the
    grid within one wave and every split at least MIN_STEPS_PER_SPLIT steps long. A divisor, so that every split
    has the same number of steps and none reads past the reduction. Layer4's 3x3 of ResNet-50 at batch 1 (49
    pixels x 512 channels: 8 tiles of 64x64, 72 steps of 64 channels): split 12, 96 programs instead of 8.
    """
    if tiles <= 0 or tiles * 2 > sms:
        return 1
    limit = min(sms // tiles, steps // MIN_STEPS_PER_SPLIT, MAX_SPLIT_K)
    return max((d for d in range(1, limit + 1) if steps % d == 0), default=1)

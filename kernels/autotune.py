"""Autotuning shared by every kernel: one candidate timer, and every autotuner on record for reports.

Each kernel form builds its autotuner with `autotune(configs, key)`: the key lists every launcher argument (constexprs
included) that changes which config is best. `autotuners()` lists what has been built, so a benchmark can read the
config each one chose (`Autotuner.cache`: tuning key -> Config).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import triton
import triton.testing
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

# Milliseconds that autotuning spends warming up and timing each candidate. Triton's default (25 + 100) makes a
# served ResNet-50 tune ~25 layer shapes x 5 tiles for every batch-size bucket at start-up, minutes in all;
# a ResNet layer runs in 5 us to 2 ms, so 20 ms still averages at least ten launches.
AUTOTUNE_WARMUP_MS = 5
AUTOTUNE_REP_MS = 20

_AUTOTUNERS: dict[str, Autotuner] = {}


def time_candidate(kernel_call: Callable[[], None], quantiles: Sequence[float]) -> list[float]:
    """The autotuner's benchmark: Triton's do_bench (L2 flushed between launches) with the shorter budget above."""
    return triton.testing.do_bench(kernel_call, warmup=AUTOTUNE_WARMUP_MS, rep=AUTOTUNE_REP_MS, quantiles=quantiles)


def autotune(name: str, configs: Sequence[triton.Config], key: Sequence[str]) -> Callable[[JITFunction], Autotuner]:
    """`triton.autotune` with our timer, registered under `name` (e.g. "conv_bn_act fp16")."""

    def decorate(kernel: JITFunction) -> Autotuner:
        tuner = triton.autotune(configs=list(configs), key=list(key), do_bench=time_candidate)(kernel)
        _AUTOTUNERS[name] = tuner
        return tuner

    return decorate


def autotuners() -> dict[str, Autotuner]:
    """Every autotuner built so far in this process, by name."""
    return dict(_AUTOTUNERS)

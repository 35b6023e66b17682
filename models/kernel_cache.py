"""The kernels' compile and autotune cache as the service sees it: where it lives, and what a load took from it.

The service never imports kernels/ (docs/ARCHITECTURE.md, layers); these pass through to kernels' public API. They
import the kernels only when called, so a server that serves eager or ONNX Runtime never imports Triton.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path


def use_kernel_cache(root: Path) -> Path:
    """Compiled kernels and autotune results under root/<card, driver, torch, Triton>; call before any model loads.

    Returns that directory; raises OSError where it cannot be created."""
    from kernels import use_cache_dir

    return use_cache_dir(root)


def autotune_outcomes() -> Counter[str]:
    """Tuning keys settled so far in this process, by outcome: read from the cache, or tuned here."""
    from kernels import outcome_counts

    return outcome_counts()


def describe_autotune(counts: Counter[str]) -> str:
    """One log line for `counts` (a difference of two `autotune_outcomes()`)."""
    from kernels import describe_outcomes

    return describe_outcomes(counts)

"""The numerics rules (docs/ARCHITECTURE.md, "Numerics") as the one set of helpers every tensor comparison uses.

`relative_error` is the project's own (models/numerics.py, which the benchmarks report too); `TOLERANCES` is the one
table of bounds, keyed by compute dtype; `assert_relative_close` fails with the worst element's index and values.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.numerics import relative_error

__all__ = [
    "CROSS_BACKEND_TOLERANCE",
    "TF32_TOLERANCE",
    "TOLERANCES",
    "assert_relative_close",
    "relative_error",
    "tolerance_for",
]

# Largest ‖out − ref‖ / ‖ref‖ against a float64 reference of the same computation, by the dtype it ran in.
TOLERANCES: dict[torch.dtype, float] = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}
# float32 storage with TF32 products (a GPU's tensor cores: 10-bit mantissas).
TF32_TOLERANCE = 5e-3
# Two float32 implementations of one model against each other or float64 (eager, onnxruntime, the interpreter, a
# served answer): each sums in its own order, and a deep network spreads that further than one kernel does.
CROSS_BACKEND_TOLERANCE = 1e-4


def tolerance_for(dtype: torch.dtype, allow_tf32: bool = False) -> float:
    """The bound for a computation in `dtype` (TF32 products when `allow_tf32`, float32 only)."""
    return TF32_TOLERANCE if allow_tf32 and dtype == torch.float32 else TOLERANCES[dtype]


def assert_relative_close(
    out: torch.Tensor | np.ndarray,
    reference: torch.Tensor | np.ndarray,
    bound: float,
    *,
    what: str = "",
    floor: float = 0.0,
) -> None:
    """Fails unless `out` and `reference` have one shape and relative_error(out, reference, floor=floor) < bound;
    the message names `what`, the error, and the worst element: its index in the reference's shape and both values."""
    out, reference = torch.as_tensor(out).double(), torch.as_tensor(reference).double()
    prefix = f"{what}: " if what else ""
    if out.shape != reference.shape:
        pytest.fail(f"{prefix}shape {tuple(out.shape)} is not the reference's {tuple(reference.shape)}")
    error = relative_error(out, reference, floor=floor)
    if not error < bound:  # `not <`: NaN fails too
        worst = tuple(int(i) for i in torch.unravel_index((out - reference).abs().argmax(), reference.shape))
        pytest.fail(
            f"{prefix}relative error {error:.3g} >= {bound:g}; worst at {worst}: "
            f"got {out[worst].item():.6g}, reference {reference[worst].item():.6g}"
        )

"""The one error measure of the project: ‖out − ref‖ / ‖ref‖ (docs/ARCHITECTURE.md, "Numerics").

Tests and benchmarks alike report it, so a benchmark row's `rel_err` and a parity test's bound mean the same thing.
"""

from __future__ import annotations

import torch


def relative_error(
    out: torch.Tensor, reference: torch.Tensor, *, floor: float = 0.0, dtype: torch.dtype = torch.float64
) -> float:
    """‖out − reference‖ / max(‖reference‖, floor), both cast to `dtype` first (float64: exact enough to judge a
    float32 kernel; a benchmark on a GPU may pass float32 to keep large batches in memory).

    `floor` guards a reference that is nearly zero (a ReLU output can be): the error is then taken relative to the
    scale the caller knows the values have.
    """
    out, reference = out.to(dtype), reference.to(dtype)
    norm = torch.linalg.vector_norm(reference).item()
    return torch.linalg.vector_norm(out - reference).item() / max(norm, floor)

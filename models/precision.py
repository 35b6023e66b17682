"""Compute precisions by name: what a model repository's `dtype` and a benchmark's `--dtype` may say.

A name is parsed once, where it enters (the repository file, a command line), into a `Precision`; everything past that
point passes the parsed value on and never looks at the string again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Precision:
    """The dtype weights and activations are stored and multiplied in (accumulation is float32 whatever it is), and,
    for float32, whether the products may run on TF32 tensor cores (a GPU's; about 1e-3 relative error per product)."""

    dtype: torch.dtype
    allow_tf32: bool = False

    @property
    def name(self) -> str:
        """ "float32", "tf32", "float16" or "bfloat16"."""
        return "tf32" if self.allow_tf32 else str(self.dtype).removeprefix("torch.")


FLOAT32 = Precision(torch.float32)
PRECISIONS: dict[str, Precision] = {
    p.name: p
    for p in (FLOAT32, Precision(torch.float32, allow_tf32=True), Precision(torch.float16), Precision(torch.bfloat16))
}


def parse_precision(name: str) -> Precision:
    """The precision called `name`; ValueError naming the choices for any other string."""
    try:
        return PRECISIONS[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(PRECISIONS)}") from None

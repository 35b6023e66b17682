"""ResNet models: eager definitions (torchvision state-dict compatible), weights, how each takes its input, and the
fused Triton version.

`build` and `fuse` are the package's contract (docs/ARCHITECTURE.md, contracts 1 and 2).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from models.errors import FusedUnavailableError
from models.inputs import InputSpec
from models.zoo import MODEL_NAMES, build, input_spec

__all__ = ["MODEL_NAMES", "FusedUnavailableError", "InputSpec", "build", "fuse", "input_spec"]


def fuse(
    model: nn.Module,
    dtype: torch.dtype = torch.float32,
    *,
    allow_tf32: bool = False,
    input_mean: Sequence[float] | None = None,
    input_std: Sequence[float] | None = None,
) -> nn.Module:
    """`model` (from `build`) rebuilt on the fused Triton kernels; forward: NCHW float32 -> float32 logits [N, classes].

    allow_tf32 (float32 only): the convolutions may multiply on TF32 tensor cores. input_mean, input_std (per channel,
    0..1 units as torchvision writes them): forward also takes uint8 NHWC images and normalizes them in the stem.
    The kernels are imported here, not with the package, because Triton decides at import whether to interpret
    (TRITON_INTERPRET=1): serving eager or ONNX Runtime never imports them.
    """
    from models.fused import fuse as _fuse

    return _fuse(model, dtype, allow_tf32=allow_tf32, input_mean=input_mean, input_std=input_std)

"""ResNet models: eager definitions (torchvision state-dict compatible), weights, and the fused Triton version.

`build` and `fuse` are the package's contract (DESIGN.md, contracts 1 and 2).
"""

from __future__ import annotations

import torch
from torch import nn

from models.zoo import MODEL_NAMES, build

__all__ = ["MODEL_NAMES", "build", "fuse"]


def fuse(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """`model` (from `build`) rebuilt on the fused Triton kernels; forward: NCHW float32 -> float32 logits [N, classes].

    The kernels are imported here, not with the package, because Triton decides at import whether to interpret
    (TRITON_INTERPRET=1): serving eager or ONNX Runtime never imports them.
    """
    from models.fused import fuse as _fuse

    return _fuse(model, dtype)

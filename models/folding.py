"""BatchNorm folding, done once at load: eval-mode BN is an affine map per channel, so it folds into the conv
before it (epilogue) or becomes a scale/shift applied to the conv's input as it is loaded (prologue, ResNet v2).

Everything is computed in float64 and cast by the caller, so folding adds no rounding of its own.
"""

from __future__ import annotations

import torch
from torch import nn


def bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) with bn(x) == x * scale + shift in eval mode; both float64 [C]."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("BatchNorm without running statistics (track_running_stats=False) cannot be folded")
    inv_std = torch.rsqrt(bn.running_var.double() + bn.eps)
    gamma = bn.weight.double() if bn.affine else torch.ones_like(inv_std)
    beta = bn.bias.double() if bn.affine else torch.zeros_like(inv_std)
    scale = gamma * inv_std
    return scale, beta - bn.running_mean.double() * scale


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [K, C, R, S], bias [K]) in float64 of bn(conv(x)); with bn None, the conv alone (bias 0 if absent)."""
    if conv.groups != 1 or conv.dilation != (1, 1):
        raise ValueError(f"only dense, undilated convolutions fold; got groups={conv.groups}, dilation={conv.dilation}")
    weight = conv.weight.detach().double()
    bias = conv.bias.detach().double() if conv.bias is not None else weight.new_zeros(weight.shape[0])
    if bn is None:
        return weight, bias
    if bn.num_features != weight.shape[0]:
        raise ValueError(f"BatchNorm has {bn.num_features} channels, the conv before it {weight.shape[0]}")
    scale, shift = bn_scale_shift(bn)
    return weight * scale[:, None, None, None], bias * scale + shift

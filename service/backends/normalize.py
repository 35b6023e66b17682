"""Raw uint8 images -> the model's normalized float input, as a module the eager and ONNX backends run on their device
(in the exported graph, for ONNX Runtime), so the CPU that decoded the image never widens it to float32."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from models.inputs import normalization_affine


class NormalizeImages(nn.Module):
    """uint8 NHWC images [N, H, W, 3] -> float32 NCHW [N, 3, H, W], (x/255 - mean) / std per channel.

    The same affine map (`models.inputs.normalization_affine`) the fused stem applies in its prologue.
    """

    scale: torch.Tensor  # [1, 3, 1, 1] float32, buffers (so .to(device) moves them)
    shift: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        scale, shift = normalization_affine(mean, std)
        self.register_buffer("scale", scale.reshape(1, 3, 1, 1))
        self.register_buffer("shift", shift.reshape(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # images: [N, H, W, 3] uint8 -> [N, 3, H, W] float32
        return images.permute(0, 3, 1, 2).float() * self.scale + self.shift

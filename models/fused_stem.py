"""The fused stem: conv1 (7x7, stride 2, RGB) + folded BN + ReLU, on float images or on raw uint8 NHWC images.

Raw images are normalized inside the convolution's prologue, as x*scale + shift with scale = 1/(255*std) and
shift = -mean/std (torchvision's Normalize on ToTensor's 0..1 values), and the zero padding is applied after it:
the result is conv2d over the normalized float image, padding included. Folding mean and std into the weights
instead would be wrong at the border, where the padding is 0 in normalized space (a raw value of 255*mean).

Forms, from `models.conv_forms.FORM_TABLE`'s "stem" row: the TMA tap kernel over space-to-depth cells (one packing
pass, `kernels.space_to_depth`, then TMA boxes of 16-value cells), or the pointer kernel straight on the images.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from kernels import (
    CELL,
    CELL_CHANNELS,
    CELL_VALUES,
    conv_bn_act,
    conv_tma,
    pack_conv_weight,
    pack_space_to_depth_weight,
    space_to_depth,
    space_to_depth_channels,
    space_to_depth_geometry,
    tma_channels_ok,
    tma_device,
    tma_operands,
)
from models.conv_forms import Form, choose_form, conv_geometry
from models.folding import fold_conv_bn


def _normalization(mean: Sequence[float], std: Sequence[float], channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) [C] float32 that map raw 0..255 values to (x/255 - mean) / std."""
    mean_t = torch.as_tensor(mean, dtype=torch.float64).flatten()
    std_t = torch.as_tensor(std, dtype=torch.float64).flatten()
    if mean_t.numel() != channels or std_t.numel() != channels:
        raise ValueError(f"input_mean and input_std need {channels} values each (one per channel)")
    if not (torch.isfinite(mean_t).all() and torch.isfinite(std_t).all() and (std_t > 0).all()):
        raise ValueError(f"input_std must be positive and input_mean finite, got mean {mean} std {std}")
    return (1 / (255 * std_t)).float(), (-mean_t / std_t).float()


class FusedStem(nn.Module):
    """The stem convolution with its folded BN and ReLU; `forward` takes NHWC, `forward_nchw` the model's NCHW input.

    input_mean/input_std (per channel, 0..1 units, torchvision's): given, uint8 images are accepted and normalized
    in the prologue; float images are taken as already normalized either way.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    cell_weight: torch.Tensor
    input_scale: torch.Tensor
    input_shift: torch.Tensor
    cell_scale: torch.Tensor
    cell_shift: torch.Tensor

    def __init__(
        self,
        conv: nn.Conv2d,
        bn: nn.BatchNorm2d,
        dtype: torch.dtype,
        *,
        allow_tf32: bool = False,
        input_mean: Sequence[float] | None = None,
        input_std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        weight, bias = fold_conv_bn(conv, bn)
        self.dtype = dtype
        self.in_channels = conv.in_channels
        self.kernel_size, self.stride, self.padding = conv_geometry(conv)
        self.allow_tf32 = allow_tf32
        self.register_buffer("weight", pack_conv_weight(weight, dtype))
        self.register_buffer("bias", bias.float().contiguous())
        cells = (
            choose_form("stem", 0) is Form.TAPS_TMA
            and tma_device(weight.device)
            and tma_operands(dtype, allow_tf32)
            and tma_channels_ok(CELL_VALUES, conv.out_channels, dtype)
            and self.stride == (CELL, CELL)
            and conv.in_channels <= CELL_CHANNELS
        )
        self.form = Form.TAPS_TMA if cells else Form.POINTER
        if cells:
            self.cell_kernel, self.cell_padding = space_to_depth_geometry(self.kernel_size, self.padding)
            self.register_buffer("cell_weight", pack_space_to_depth_weight(weight, self.padding, dtype))
        if (input_mean is None) != (input_std is None):
            raise ValueError("input_mean and input_std go together: give both or neither")
        self.normalizes = input_mean is not None and input_std is not None
        if input_mean is not None and input_std is not None:
            scale, shift = _normalization(input_mean, input_std, conv.in_channels)
            self.register_buffer("input_scale", scale.to(weight.device))
            self.register_buffer("input_shift", shift.to(weight.device))
            self.register_buffer("cell_scale", space_to_depth_channels(self.input_scale))
            self.register_buffer("cell_shift", space_to_depth_channels(self.input_shift))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, H, W, C], the compute dtype, or uint8 raw images -> [N, P, Q, K]
        return self._run(x, "NHWC")

    def forward_nchw(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, C, H, W] float (normalized images, the model's input contract) -> [N, P, Q, K]
        return self._run(x, "NCHW")

    def _run(self, images: torch.Tensor, layout: str) -> torch.Tensor:
        raw = images.dtype == torch.uint8
        if raw and not self.normalizes:
            raise ValueError("x: uint8 images need models.fuse(..., input_mean=..., input_std=...) to normalize them")
        h, w = images.shape[1:3] if layout == "NHWC" else images.shape[2:]
        (r, s), (stride_h, stride_w), (pad_h, pad_w) = self.kernel_size, self.stride, self.padding
        output_size = ((h + 2 * pad_h - r) // stride_h + 1, (w + 2 * pad_w - s) // stride_w + 1)
        if self.form is Form.TAPS_TMA:
            cells = space_to_depth(images, torch.uint8 if raw else self.dtype, layout=layout)
            return conv_tma(
                cells,
                self.cell_weight,
                self.bias,
                kernel_size=self.cell_kernel,
                padding=self.cell_padding,
                relu=True,
                cell=CELL,
                image_size=(h, w),
                output_size=output_size,
                allow_tf32=self.allow_tf32,
                prologue_scale=self.cell_scale if raw else None,
                prologue_shift=self.cell_shift if raw else None,
                prologue_relu=False,
            )
        x = images if layout == "NHWC" else images.permute(0, 2, 3, 1)
        x = x.contiguous() if raw else x.to(self.dtype).contiguous()
        return conv_bn_act(
            x,
            self.weight,
            self.bias,
            kernel_size=self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            relu=True,
            allow_tf32=self.allow_tf32,
            prologue_scale=self.input_scale if raw else None,
            prologue_shift=self.input_shift if raw else None,
            prologue_relu=False,
        )

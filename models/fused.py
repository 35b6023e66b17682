"""The fused ResNet: every conv+BN(+residual)(+ReLU), the max pool and the pool+FC head run as Triton kernels.

Built once from an eager model by `fuse`: BatchNorm is folded into the convolutions (or into the next conv's input
prologue for pre-activation blocks), weights are packed into the kernels' layout and dtype, and activations stay NHWC
from the stem to the head. No eager conv, BN, ReLU, add, pool or linear runs in `forward`. Each convolution runs the
kernel form that `models.conv_forms.FORM_TABLE` picks for its layer; the stem is `models.fused_stem.FusedStem`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from kernels import (
    SUPPORTED_DTYPES,
    avgpool_linear,
    interpreting,
    max_pool2d_nhwc,
    pack_conv_weight,
    pack_linear_weight,
    tma_device,
)
from models import conv_forms
from models.errors import FusedUnavailableError
from models.folding import bn_scale_shift, fold_conv_bn
from models.fused_stem import FusedStem
from models.preact_resnet import PreActBasicBlock, PreActBottleneck, PreActResNet
from models.resnet import BasicBlock, Bottleneck, ResNet


class FusedConv(nn.Module):
    """One convolution with its folded BatchNorm, optional input prologue, and a fixed activation.

    Holds the packed weight [R*S*C, K] in the compute dtype and the float32 bias [K]; `forward` is one kernel launch
    (two where a sub-wave grid splits K), in the form `models.conv_forms` picks for the input's map size.
    allow_tf32 (float32 only): the kernel may multiply on TF32 tensor cores instead of the IEEE float32 dot.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    prologue_scale: torch.Tensor | None
    prologue_shift: torch.Tensor | None

    def __init__(
        self,
        conv: nn.Conv2d,
        bn: nn.BatchNorm2d | None,
        dtype: torch.dtype,
        *,
        relu: bool,
        prologue_bn: nn.BatchNorm2d | None = None,
        allow_tf32: bool = False,
    ) -> None:
        super().__init__()
        weight, bias = fold_conv_bn(conv, bn)
        self.tma_device = tma_device(weight.device)
        self.register_buffer("weight", pack_conv_weight(weight, dtype))
        self.register_buffer("bias", bias.float().contiguous())
        if prologue_bn is not None:
            scale, shift = bn_scale_shift(prologue_bn)
            self.register_buffer("prologue_scale", scale.float().contiguous())
            self.register_buffer("prologue_shift", shift.float().contiguous())
        else:
            self.prologue_scale = self.prologue_shift = None
        self.in_channels = conv.in_channels
        self.kernel_size, self.stride, self.padding = conv_forms.conv_geometry(conv)
        self.relu = relu
        self.allow_tf32 = allow_tf32

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        # x: [N, H, W, C] -> [N, P, Q, K]
        return conv_forms.launch(self, x, residual)


class FusedBlock(nn.Module):
    """A residual block as a chain of fused convs; the last one adds the shortcut in its epilogue."""

    def __init__(self, convs: list[FusedConv], shortcut: FusedConv | None) -> None:
        super().__init__()
        self.convs = nn.ModuleList(convs)
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.shortcut is None else self.shortcut(x)
        for conv in self.convs[:-1]:
            x = conv(x)
        return self.convs[-1](x, residual=residual)


class FusedResNet(nn.Module):
    """Forward: NCHW float32 [N, 3, H, W] -> float32 logits [N, classes]; NHWC in `dtype` inside.

    With normalization (fuse's input_mean/input_std) forward also takes raw uint8 NHWC images [N, H, W, 3].
    """

    fc_weight: torch.Tensor
    fc_bias: torch.Tensor
    head_scale: torch.Tensor | None
    head_shift: torch.Tensor | None

    def __init__(
        self,
        stem: FusedStem,
        maxpool: nn.MaxPool2d | None,
        blocks: list[FusedBlock],
        fc: nn.Linear,
        dtype: torch.dtype,
        head_bn: nn.BatchNorm2d | None = None,
    ) -> None:
        super().__init__()
        self.dtype = dtype
        self.in_channels = stem.in_channels
        self.stem = stem
        # (kernel_size, stride, padding) of the stem's max pool, None where the model has none (digits_resnet)
        self.maxpool = None if maxpool is None else _square_window(maxpool)
        self.blocks = nn.ModuleList(blocks)
        self.register_buffer("fc_weight", pack_linear_weight(fc.weight.detach(), dtype))
        self.register_buffer("fc_bias", fc.bias.detach().float().contiguous())
        if head_bn is not None:  # ResNet v2's final BN + ReLU, applied by the head as it loads the features
            scale, shift = bn_scale_shift(head_bn)
            self.register_buffer("head_scale", scale.float().contiguous())
            self.register_buffer("head_shift", shift.float().contiguous())
        else:
            self.head_scale = self.head_shift = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.in_channels
        if isinstance(x, torch.Tensor) and x.dtype == torch.uint8:
            if not self.stem.normalizes:
                raise ValueError("x: uint8 images need models.fuse(..., input_mean=..., input_std=...) to normalize")
            if x.ndim != 4 or x.shape[3] != c:
                raise ValueError(f"x: uint8 images must be NHWC [N, H, W, {c}], got {tuple(x.shape)}")
        elif not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != c:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be NCHW [N, {c}, H, W], got {shape}")
        elif x.dtype != torch.float32:
            raw = " (or uint8 NHWC images)" if self.stem.normalizes else ""
            raise ValueError(f"x must be float32{raw}, got {x.dtype}")
        if x.device != self.fc_bias.device:
            raise ValueError(f"x is on {x.device}, the model on {self.fc_bias.device}")
        x = self.stem(x) if x.dtype == torch.uint8 else self.stem.forward_nchw(x.contiguous())
        if self.maxpool is not None:
            kernel_size, stride, padding = self.maxpool
            x = max_pool2d_nhwc(x, kernel_size=kernel_size, stride=stride, padding=padding)
        for block in self.blocks:
            x = block(x)
        return avgpool_linear(
            x, self.fc_weight, self.fc_bias, prologue_scale=self.head_scale, prologue_shift=self.head_shift
        )


def _square_window(pool: nn.MaxPool2d) -> tuple[int, int, int]:
    """(kernel_size, stride, padding) of a max pool the fused kernel implements: a square window."""
    sides = [
        value if isinstance(value, tuple) else (value, value) for value in (pool.kernel_size, pool.stride, pool.padding)
    ]
    if pool.ceil_mode or pool.dilation not in (1, (1, 1)) or any(len(set(pair)) != 1 for pair in sides):
        raise ValueError("the fused max pool implements a square window in floor mode without dilation only")
    kernel_size, stride, padding = (pair[0] for pair in sides)
    return kernel_size, stride, padding


def _fuse_v1_block(block: nn.Module, dtype: torch.dtype, allow_tf32: bool) -> FusedBlock:
    if not isinstance(block, BasicBlock | Bottleneck):
        raise ValueError(f"a ResNet layer holds BasicBlock or Bottleneck blocks, got {type(block).__name__}")
    # conv -> BN -> ReLU for every conv but the last, whose epilogue adds the shortcut before the ReLU.
    pairs = [(block.conv1, block.bn1), (block.conv2, block.bn2)]
    if isinstance(block, Bottleneck):
        pairs.append((block.conv3, block.bn3))
    convs = [FusedConv(conv, bn, dtype, relu=True, allow_tf32=allow_tf32) for conv, bn in pairs]
    shortcut = None
    if block.downsample is not None:
        ds_conv, ds_bn = block.downsample
        if not isinstance(ds_conv, nn.Conv2d) or not isinstance(ds_bn, nn.BatchNorm2d):
            raise ValueError(f"a downsample shortcut is Conv2d then BatchNorm2d, got {block.downsample}")
        shortcut = FusedConv(ds_conv, ds_bn, dtype, relu=False, allow_tf32=allow_tf32)
    return FusedBlock(convs, shortcut)


def _fuse_v2_block(block: nn.Module, dtype: torch.dtype, allow_tf32: bool) -> FusedBlock:
    # v2: out = conv1(relu(bn1(x))); conv2(relu(bn2(.))) ...; + shortcut, no ReLU after the add.
    # relu(bn1(x)) is the first conv's (and the downsample's) input prologue; every later BN+ReLU follows a conv
    # whose output feeds nothing else, so it folds into that conv's epilogue.
    if not isinstance(block, PreActBasicBlock | PreActBottleneck):
        raise ValueError(f"a PreActResNet layer holds pre-activation blocks, got {type(block).__name__}")
    convs_and_next_bn: list[tuple[nn.Conv2d, nn.BatchNorm2d | None]] = [(block.conv1, block.bn2)]
    if isinstance(block, PreActBottleneck):
        convs_and_next_bn += [(block.conv2, block.bn3), (block.conv3, None)]
    else:
        convs_and_next_bn.append((block.conv2, None))
    convs = [
        FusedConv(
            conv,
            next_bn,
            dtype,
            relu=next_bn is not None,
            prologue_bn=block.bn1 if i == 0 else None,
            allow_tf32=allow_tf32,
        )
        for i, (conv, next_bn) in enumerate(convs_and_next_bn)
    ]
    shortcut = None
    if block.downsample is not None:
        shortcut = FusedConv(block.downsample, None, dtype, relu=False, prologue_bn=block.bn1, allow_tf32=allow_tf32)
    return FusedBlock(convs, shortcut)


def fuse(
    model: nn.Module,
    dtype: torch.dtype = torch.float32,
    *,
    allow_tf32: bool = False,
    input_mean: Sequence[float] | None = None,
    input_std: Sequence[float] | None = None,
) -> FusedResNet:
    """The same function as `model` (a ResNet or PreActResNet from models.build), built on the Triton kernels.

    BN is folded and weights are packed here, once. The result lives on the model's device; on a CPU it runs only
    under TRITON_INTERPRET=1 (set before the kernels are first imported), and FusedUnavailableError says so.
    allow_tf32 (float32 only): every convolution may multiply on TF32 tensor cores (a GPU's; the interpreter computes
    IEEE float32 whatever it is told).
    input_mean, input_std: per channel, in 0..1 units as torchvision writes them (ImageNet: (0.485, 0.456, 0.406),
    (0.229, 0.224, 0.225)). Given, forward also takes uint8 NHWC images [N, H, W, 3] and normalizes them in the stem's
    prologue, exactly as conv2d over the normalized float image; float32 NCHW input is taken as normalized already.
    """
    if not isinstance(model, ResNet | PreActResNet):
        raise ValueError(f"fuse expects a ResNet or PreActResNet from models.build, got {type(model).__name__}")
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype must be one of float32, float16, bfloat16, got {dtype}")
    if allow_tf32 and dtype != torch.float32:
        raise ValueError(f"allow_tf32 applies to float32 only, not {dtype}")
    if model.training:
        raise ValueError("fuse folds BatchNorm running statistics: call model.eval() first")
    device = model.fc.weight.device
    if device.type != "cuda" and not interpreting():
        raise FusedUnavailableError(
            f"the model is on {device}: fused kernels need a CUDA device, or TRITON_INTERPRET=1 set before "
            "the first import of kernels to run them (slowly) on the CPU"
        )
    layers = [model.layer1, model.layer2, model.layer3, model.layer4]
    if isinstance(model, PreActResNet):
        blocks = [_fuse_v2_block(block, dtype, allow_tf32) for layer in layers for block in layer]
        head_bn = model.bn_final
    else:
        blocks = [_fuse_v1_block(block, dtype, allow_tf32) for layer in layers for block in layer]
        head_bn = None
    stem = FusedStem(model.conv1, model.bn1, dtype, allow_tf32=allow_tf32, input_mean=input_mean, input_std=input_std)
    maxpool = model.maxpool if isinstance(model.maxpool, nn.MaxPool2d) else None
    return FusedResNet(stem, maxpool, blocks, model.fc, dtype, head_bn=head_bn).to(device).eval()

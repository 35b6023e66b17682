"""ResNet v1.5 with torchvision's module names, so a torchvision checkpoint loads with strict=True.

v1.5 puts the stride of a bottleneck on its 3x3 convolution (conv2), as torchvision does; the 1x1 projection
shortcut (`downsample`) is a strided 1x1 convolution followed by BatchNorm.
"""

from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import nn


@dataclass(frozen=True)
class ResNetConfig:
    """Architecture of one ResNet; the stem has widths[0] channels, stage i widths[i] * expansion outputs."""

    block: Literal["basic", "bottleneck"]
    layers: tuple[int, int, int, int]  # blocks per stage
    widths: tuple[int, int, int, int] = (64, 128, 256, 512)
    stem_kernel: int = 7
    stem_stride: int = 2
    stem_maxpool: bool = True
    num_classes: int = 1000


CONFIGS: dict[str, ResNetConfig] = {
    "resnet18": ResNetConfig("basic", (2, 2, 2, 2)),
    "resnet34": ResNetConfig("basic", (3, 4, 6, 3)),
    "resnet50": ResNetConfig("bottleneck", (3, 4, 6, 3)),
    "resnet101": ResNetConfig("bottleneck", (3, 4, 23, 3)),
    "resnet152": ResNetConfig("bottleneck", (3, 8, 36, 3)),
    # 32x32 digit scans: a 3x3 stride-1 stem without max pooling keeps the small maps from vanishing.
    "digits_resnet": ResNetConfig(
        "basic",
        (1, 1, 1, 1),
        widths=(16, 32, 64, 128),
        stem_kernel=3,
        stem_stride=1,
        stem_maxpool=False,
        num_classes=10,
    ),
}


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)


def needs_projection(in_channels: int, out_channels: int, stride: int) -> bool:
    """Whether a block's shortcut must change shape (a 1x1 projection) rather than pass x through."""
    return stride != 1 or in_channels != out_channels


class BasicBlock(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)); conv1 carries the stride."""

    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(width, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = _projection(in_channels, width, stride)
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, C_in, H, W] -> [N, width, H / stride, W / stride]
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (with the stride, v1.5) -> 1x1 expand to 4 * width, plus the shortcut, then ReLU."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = conv1x1(in_channels, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, out_channels)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _projection(in_channels, out_channels, stride)
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, C_in, H, W] -> [N, 4 * width, H / stride, W / stride]
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


def _projection(in_channels: int, out_channels: int, stride: int) -> nn.Sequential | None:
    if not needs_projection(in_channels, out_channels, stride):
        return None
    return nn.Sequential(conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))


def make_stem(config: ResNetConfig) -> tuple[nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Module]:
    """conv1, bn1, relu, maxpool (nn.Identity when the config has no max pooling); shared by v1 and v2."""
    width = config.widths[0]
    conv = nn.Conv2d(
        3, width, config.stem_kernel, stride=config.stem_stride, padding=config.stem_kernel // 2, bias=False
    )
    maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if config.stem_maxpool else nn.Identity()
    return conv, nn.BatchNorm2d(width), nn.ReLU(inplace=True), maxpool


class BlockClass(Protocol):
    """A residual block class: its output has width * expansion channels."""

    expansion: int

    def __call__(self, in_channels: int, width: int, stride: int = 1) -> nn.Module: ...


def make_stages(block: BlockClass, config: ResNetConfig) -> list[nn.Sequential]:
    """layer1..layer4; every stage but the first halves the resolution in its first block."""
    stages = []
    in_channels = config.widths[0]
    for index, (width, num_blocks) in enumerate(zip(config.widths, config.layers, strict=True)):
        stride = 1 if index == 0 else 2
        blocks = [block(in_channels, width, stride)]
        in_channels = width * block.expansion
        blocks += [block(in_channels, width) for _ in range(num_blocks - 1)]
        stages.append(nn.Sequential(*blocks))
    return stages


class ResNet(nn.Module):
    """ResNet v1.5: stem, four stages of residual blocks, global average pool, linear classifier."""

    def __init__(self, config: ResNetConfig) -> None:
        super().__init__()
        block = BasicBlock if config.block == "basic" else Bottleneck
        self.config = config
        self.conv1, self.bn1, self.relu, self.maxpool = make_stem(config)
        self.layer1, self.layer2, self.layer3, self.layer4 = make_stages(block, config)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(config.widths[-1] * block.expansion, config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, 3, H, W] -> logits [N, num_classes]
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # [N, widths[0], H / 4, W / 4] (ImageNet stem)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # [N, C_out, H / 32, W / 32] (ImageNet stem)
        x = torch.flatten(self.avgpool(x), 1)  # [N, C_out]
        return self.fc(x)

"""Pre-activation ResNet (v2; He et al. 2016, "Identity Mappings in Deep Residual Networks").

Each block applies BatchNorm and ReLU before its convolutions and adds its output to an untouched shortcut, with
no ReLU after the add; a projection shortcut is a bare strided 1x1 convolution of the pre-activated input (no
BatchNorm). The stem is v1's; since the stream is never normalised after the add, `bn_final` + ReLU close layer4.
No published weights exist for these: they serve random-weight parity checks and benchmarks.
"""

import torch
from torch import nn

from models.resnet import ResNetConfig, conv1x1, conv3x3, make_stages, make_stem, needs_projection

CONFIGS: dict[str, ResNetConfig] = {
    "preact_resnet18": ResNetConfig("basic", (2, 2, 2, 2)),
    "preact_resnet50": ResNetConfig("bottleneck", (3, 4, 6, 3)),
}


class PreActBasicBlock(nn.Module):
    """conv2(relu(bn2(conv1(relu(bn1(x)))))) + shortcut; conv1 carries the stride."""

    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = conv3x3(in_channels, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = conv1x1(in_channels, width, stride) if needs_projection(in_channels, width, stride) else None
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, C_in, H, W] -> [N, width, H / stride, W / stride]
        pre = self.relu(self.bn1(x))
        shortcut = x if self.downsample is None else self.downsample(pre)
        out = self.conv1(pre)
        out = self.conv2(self.relu(self.bn2(out)))
        return out + shortcut


class PreActBottleneck(nn.Module):
    """Pre-activated 1x1 reduce -> 3x3 (with the stride) -> 1x1 expand to 4 * width, plus the shortcut."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = conv1x1(in_channels, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride)
        self.bn3 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, out_channels)
        self.relu = nn.ReLU(inplace=True)
        projects = needs_projection(in_channels, out_channels, stride)
        self.downsample = conv1x1(in_channels, out_channels, stride) if projects else None
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, C_in, H, W] -> [N, 4 * width, H / stride, W / stride]
        pre = self.relu(self.bn1(x))
        shortcut = x if self.downsample is None else self.downsample(pre)
        out = self.conv1(pre)
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """v1's stem, four stages of pre-activation blocks, bn_final + ReLU, global average pool, linear classifier."""

    def __init__(self, config: ResNetConfig) -> None:
        super().__init__()
        block = PreActBasicBlock if config.block == "basic" else PreActBottleneck
        self.config = config
        self.conv1, self.bn1, self.relu, self.maxpool = make_stem(config)
        self.layer1, self.layer2, self.layer3, self.layer4 = make_stages(block, config)
        out_channels = config.widths[-1] * block.expansion
        self.bn_final = nn.BatchNorm2d(out_channels)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(out_channels, config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, 3, H, W] -> logits [N, num_classes]
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # [N, widths[0], H / 4, W / 4]
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # [N, C_out, H / 32, W / 32]
        x = self.relu(self.bn_final(x))
        x = torch.flatten(self.avgpool(x), 1)  # [N, C_out]
        return self.fc(x)

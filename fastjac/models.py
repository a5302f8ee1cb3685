"""Member architectures for 28x28 single-channel inputs (MNIST, Fashion-MNIST).

Every builder returns a model made only of layers the stacked engine fuses (``fastjac.layers``), so an
``Ensemble`` of them runs on the fast path: ``mlp`` and ``lenet`` are ``nn.Sequential`` stacks,
``resnet`` a graph of residual blocks with BatchNorm.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import nn

INPUT_SHAPE = (1, 28, 28)


def mlp(hidden: Sequence[int] = (256, 256), num_classes: int = 10, in_features: int = 784) -> nn.Sequential:
    """Flatten -> [Linear -> ReLU] per hidden width -> Linear(num_classes). Default 784-256-256-10."""
    widths = [in_features, *hidden]
    layers: list[nn.Module] = [nn.Flatten()]
    for fan_in, fan_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    layers.append(nn.Linear(widths[-1], num_classes))
    return nn.Sequential(*layers)


def lenet(channels: Sequence[int] = (6, 16), hidden: Sequence[int] = (120, 84), num_classes: int = 10) -> nn.Sequential:
    """LeNet-5 style: [Conv5x5(pad 2 first) -> ReLU -> MaxPool2] x2 -> Flatten -> MLP head.

    Shapes for 28x28 input: [B,1,28,28] -> [B,c1,14,14] -> [B,c2,5,5] -> [B, c2*25] -> ... -> [B, classes].
    """
    c1, c2 = channels
    layers: list[nn.Module] = [
        nn.Conv2d(1, c1, kernel_size=5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, kernel_size=5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
    ]
    widths = [c2 * 5 * 5, *hidden]
    for fan_in, fan_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    layers.append(nn.Linear(widths[-1], num_classes))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """conv3x3 -> BN -> ReLU -> conv3x3 -> BN, plus the shortcut, then ReLU (He et al. 2016). The shortcut is
    the identity, or a 1x1 convolution + BN where the stride or the width changes."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(channels))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet for [B, 1, 28, 28] inputs: a conv3x3 + BN + ReLU stem of ``width`` channels, three
    stages of (depth - 2) / 6 BasicBlocks at widths w, 2w, 4w (28 -> 28 -> 14 -> 7 pixels), global average
    pooling and a Linear classifier."""

    def __init__(self, depth: int = 8, width: int = 16, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 8 or (depth - 2) % 6:
            raise ValueError(f"resnet depth must be an int 6n + 2 with n >= 1 (8, 14, 20, ...), got {depth!r}")
        if not isinstance(width, int) or isinstance(width, bool) or width < 1:
            raise ValueError(f"resnet width must be an int >= 1, got {width!r}")
        blocks = (depth - 2) // 6
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        stages, channels = [], width
        for stage, stride in enumerate((1, 2, 2)):
            out_channels = width * 2 ** stage
            for index in range(blocks):
                stages.append(BasicBlock(channels, out_channels, stride if index == 0 else 1))
                channels = out_channels
        self.blocks = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        out = F.relu(self.bn(self.conv(x)))
        out = self.pool(self.blocks(out))
        return self.fc(out.flatten(1))


def resnet(depth: int = 8, width: int = 16, num_classes: int = 10) -> ResNet:
    """ResNet-``depth`` (8 or 20 for the study: 1 or 3 BasicBlocks per stage) of base width ``width``.

    Shapes for 28x28 input: [B,1,28,28] -> [B,w,28,28] -> [B,2w,14,14] -> [B,4w,7,7] -> [B,4w] -> [B, classes].
    """
    return ResNet(depth, width, num_classes)


ARCHITECTURES = {"mlp": mlp, "lenet": lenet, "resnet": resnet}


def build(arch: str, **kwargs) -> nn.Module:
    """Member of architecture ``arch`` (a key of ``ARCHITECTURES``)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch](**kwargs)

"""Member architectures for 28x28 single-channel inputs (MNIST, Fashion-MNIST).

Both builders return plain ``nn.Sequential`` models made only of layers the stacked engine fuses
(Flatten, Linear, Conv2d, ReLU, MaxPool2d), so an ``Ensemble`` of them runs on the fast path.
"""
from __future__ import annotations

from collections.abc import Sequence

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


ARCHITECTURES = {"mlp": mlp, "lenet": lenet}


def build(arch: str, **kwargs) -> nn.Sequential:
    """Member of architecture ``arch`` ('mlp' or 'lenet')."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch](**kwargs)

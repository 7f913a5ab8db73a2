"""The MLPerf Tiny inference benchmark models, built in PyTorch from their published topologies.

They are the TinyML anchors for planning and tiling: small enough that every byte of the arena
matters, and shaped like the models users deploy to microcontrollers.
"""

import itertools

from torch import nn


def _conv_bn_relu(cin: int, cout: int, kernel, stride=1, padding=0, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    )


def _depthwise_separable(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        _conv_bn_relu(cin, cin, 3, stride, 1, groups=cin),
        _conv_bn_relu(cin, cout, 1),
    )


def ds_cnn_kws(num_classes: int = 12) -> nn.Module:
    """Keyword spotting DS-CNN: 49×10 MFCC, conv 64 10×4/2, 4 depthwise-separable blocks, FC 12."""
    return nn.Sequential(
        _conv_bn_relu(1, 64, (10, 4), stride=2, padding=(5, 1)),
        *[_depthwise_separable(64, 64) for _ in range(4)],
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, num_classes),
    )


def mobilenet_v1(alpha: float = 0.25, num_classes: int = 2) -> nn.Module:
    """MobileNetV1 (visual wake words uses alpha 0.25 at 96×96×3 with 2 classes)."""
    plan = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)]
    plan += [(512, 1)] * 5 + [(1024, 2), (1024, 1)]
    width = int(32 * alpha)
    layers: list[nn.Module] = [_conv_bn_relu(3, width, 3, 2, 1)]
    for channels, stride in plan:
        layers.append(_depthwise_separable(width, int(channels * alpha), stride))
        width = int(channels * alpha)
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes)]
    return nn.Sequential(*layers)


class _ResidualStack(nn.Module):
    """One ResNet-8 stage: two 3×3 convs with a (1×1 projected when strided) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = _conv_bn_relu(cin, cout, 3, stride, 1)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn2(self.conv2(self.conv1(x))) + self.shortcut(x))


def resnet8_cifar(num_classes: int = 10) -> nn.Module:
    """Image classification ResNet-8 (32×32×3; stages of 16, 32, 64 filters)."""
    return nn.Sequential(
        _conv_bn_relu(3, 16, 3, 1, 1),
        _ResidualStack(16, 16, 1),
        _ResidualStack(16, 32, 2),
        _ResidualStack(32, 64, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, num_classes),
    )


def autoencoder_ad(features: int = 640) -> nn.Module:
    """Anomaly detection autoencoder: 640 → 4×128 → 8 → 4×128 → 640 (dense, BN, ReLU)."""

    def dense(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Linear(cin, cout), nn.BatchNorm1d(cout), nn.ReLU()]

    widths = [features, 128, 128, 128, 128, 8, 128, 128, 128, 128]
    layers = [m for cin, cout in itertools.pairwise(widths) for m in dense(cin, cout)]
    return nn.Sequential(*layers, nn.Linear(128, features))

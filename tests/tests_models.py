"""Small models for tests, loadable by the zoo as `tests_models:NAME`."""

import torch
from torch import nn


class DataDependent(nn.Module):
    """Python control flow on a tensor value: torch.export cannot trace it."""

    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x - 1


def data_dependent():
    return DataDependent(), (torch.ones(1, 3, 8, 8),)


def conv_flatten_linear():
    """conv -> flatten (a view) -> linear: the conv output must live until the linear reads it."""
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 8 * 8, 5))


def conv_bn_relu():
    """A user's model with BatchNorm: the zoo must not touch its running statistics."""
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()), (
        torch.randn(1, 3, 8, 8),
    )


class TinyUnet(nn.Module):
    """An encoder-decoder with every op whole-network bands take: strided conv, max pool,
    transposed conv, nearest upsampling to a skip's size, bilinear upsampling, channel cat
    of skips, BatchNorm. Its reach is small, so 64 rows in 4 bands give crops inside the image."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.enc1 = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.enc2 = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.enc3 = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(16, 16, 3, 1, 1), nn.ReLU())
        self.up3 = nn.ConvTranspose2d(16, 8, 2, 2)
        self.dec2 = nn.Sequential(nn.Conv2d(40, 8, 3, 1, 1), nn.ReLU())
        self.up2 = nn.Upsample(scale_factor=2, mode="bilinear")
        self.head = nn.Conv2d(16, classes, 3, 1, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        near = nn.functional.interpolate(e3, size=e2.shape[-2:], mode="nearest")
        d2 = self.dec2(torch.cat([self.up3(e3), near, e2], 1))
        return self.head(torch.cat([self.up2(d2), e1], 1))


class NearestUnet(nn.Module):
    """A U-net of the ops 2PS takes (strided convs, BatchNorm, nearest upsampling, skip `cat`),
    four levels deep: its decoder lags its encoder by more rows than a band of 8 holds."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        def block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout),
                                 nn.ReLU(inplace=True))
        self.down = nn.ModuleList([block(3, 8), block(8, 12, 2), block(12, 16, 2),
                                   block(16, 16, 2), block(16, 16, 2)])
        self.up = nn.ModuleList([block(32, 16), block(32, 12), block(24, 8), block(16, 8)])
        self.head = nn.Conv2d(8, classes, 3, 1, 1)

    def forward(self, x):
        skips = []
        for layer in self.down:
            x = layer(x)
            skips.append(x)
        for layer, skip in zip(self.up, reversed(skips[:-1]), strict=True):
            x = layer(torch.cat([nn.functional.interpolate(x, scale_factor=2), skip], 1))
        return self.head(x)


def nearest_unet():
    """`NearestUnet` with calibrated BatchNorm statistics, and a 2 x 3 x 128 x 32 input."""
    from memtile.zoo import calibrate_norms

    torch.manual_seed(0)
    return (calibrate_norms(NearestUnet(), (3, 128, 32), passes=2, batch=2),
            (torch.randn(2, 3, 128, 32),))


def tiny_unet():
    """`TinyUnet` with calibrated BatchNorm statistics, and a 2 x 3 x 64 x 24 input."""
    from memtile.zoo import calibrate_norms

    torch.manual_seed(0)
    return calibrate_norms(TinyUnet(), (3, 64, 24), passes=2, batch=2), (torch.randn(2, 3, 64, 24),)


class ExactUnet(TinyUnet):
    """`TinyUnet` upsampling with mode="nearest-exact", which OverL takes and 2PS refuses."""

    def __init__(self) -> None:
        super().__init__()
        self.up2 = nn.Upsample(scale_factor=2, mode="nearest-exact")


def exact_unet():
    """`ExactUnet` with calibrated BatchNorm statistics, and a 2 x 3 x 64 x 24 input."""
    from memtile.zoo import calibrate_norms

    torch.manual_seed(0)
    return calibrate_norms(ExactUnet(), (3, 64, 24), passes=2, batch=2), (torch.randn(2, 3, 64, 24),)


def tiny_unet_one_class():
    """`TinyUnet` with one output channel (a binary mask, like smp's default)."""
    torch.manual_seed(0)
    return TinyUnet(classes=1).eval(), (torch.randn(1, 3, 64, 24),)

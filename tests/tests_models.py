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

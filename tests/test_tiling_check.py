"""The tiling check falls back to float64 only to forgive rounding, never a changed function."""

import copy

import torch
from torch import nn

from memtile.tiling.check import Reference, compare, equivalent, equivalent_models


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 2, 3, padding=1)).eval()


class SplitSum(nn.Module):
    """The same convolution summed over two halves of its input channels: another float32 order."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, conv.out_channels, 3, padding=1, bias=False)
        self.b = nn.Conv2d(4, conv.out_channels, 3, padding=1)
        self.a.weight.data, self.b.weight.data = conv.weight.data[:, :4].clone(), conv.weight.data[:, 4:].clone()
        self.b.bias.data = conv.bias.data.clone()

    def forward(self, x):
        return self.a(x[:, :4]) + self.b(x[:, 4:])


def test_a_tiny_weight_change_fails_in_float32_and_in_float64():
    model = _model()
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken[2].weight[0, 0, 0, 0] += 1e-3
    x = torch.randn(1, 3, 16, 16)
    assert not equivalent(*compare(model, broken, [x]))
    assert not equivalent_models(model, broken, [x])


def test_a_reordered_sum_is_equivalent():
    model = _model()
    reordered = nn.Sequential(model[0], model[1], SplitSum(model[2])).eval()
    x = torch.randn(1, 3, 16, 16) * 1e3
    assert equivalent_models(model, reordered, [x])



def test_the_reference_runs_once_for_every_candidate_checked():
    """Discovery checks each candidate against one Reference: the original runs once (and once
    more in float64 only when a candidate needs the recheck), not once per candidate."""
    model = _model()
    candidates = [copy.deepcopy(model) for _ in range(3)]
    runs = []
    model.register_forward_hook(lambda *_: runs.append(1))
    reference = Reference(model, [torch.randn(1, 3, 16, 16)])
    assert all(reference.matches(c) for c in candidates)
    assert len(runs) == 1

"""The shared fx trace drops static shape checks (timm's `_assert(x.ndim == 4)`) and nothing else."""

import pytest
import torch
from torch import nn

from memtile.errors import UnsupportedOpError
from memtile.spatial import SpatialGraph
from memtile.trace import trace


class CheckedConv(nn.Module):
    """A conv that asserts its input rank and reads its shape, like timm's norm layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        torch._assert(x.ndim == 4, "expected 4D input")
        y = self.conv(x)
        torch._assert(y.shape[1] == 4, "channels")
        return torch.relu(y)


def _targets(gm) -> list:
    return [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")]


def test_shape_checks_are_removed_and_the_function_is_kept():
    model = CheckedConv().eval()
    gm = trace(model)
    assert torch._assert not in _targets(gm)
    assert getattr not in _targets(gm)
    assert _targets(gm) == [torch.relu]
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


def test_spatial_analysis_sees_through_shape_checks():
    graph = SpatialGraph(CheckedConv().eval())  # before: "getattr ... not a supported spatially local op"
    assert graph.gm is not None


def test_untraceable_model_gets_a_clear_error():
    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(UnsupportedOpError, match="could not trace Branchy"):
        trace(Branchy())

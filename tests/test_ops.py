"""The one op table: bands, tiles, FDT and the peak estimate classify every op alike."""

import pytest
import torch
from torch import nn

from memtile import ops
from memtile.errors import UnsupportedOpError
from memtile.spatial import SpatialGraph
from memtile.tiling.estimate import is_elementwise
from memtile.tiling.fdt import fdt_path
from memtile.tiling.rewrite import propagate_shapes
from memtile.trace import trace


class Mixed(nn.Module):
    """Ops the old tables disagreed on: PReLU and Softplus (pointwise for bands only), Dropout
    (elementwise for tiling only), a functional dropout and a division by a scalar."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.prelu, self.softplus, self.drop = nn.PReLU(), nn.Softplus(), nn.Dropout(0.2)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.drop(self.softplus(self.prelu(self.a(x))))
        return self.b(torch.nn.functional.dropout(y, 0.5, training=False) / 2)


def test_bands_fdt_and_the_estimate_agree_on_every_op():
    model = Mixed().eval()
    gm = propagate_shapes(trace(model), [torch.randn(1, 3, 8, 8)])
    middle = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")][1:-1]
    assert all(is_elementwise(gm, n) for n in middle)
    path = fdt_path(gm, "a")
    assert path.tail == "b" and len(path.mids) == len(middle)
    graph = SpatialGraph(model)
    assert all(graph.ops[n].kind == "pointwise" for n in graph.order[1:-1])


def test_an_unknown_op_is_named_by_bands_and_fdt():
    class Cumsum(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.b(torch.cumsum(self.a(x), 2))

    gm = propagate_shapes(trace(Cumsum()), [torch.randn(1, 3, 8, 8)])
    with pytest.raises(UnsupportedOpError, match=r"cumsum \(cumsum\) is an op memtile does not"):
        SpatialGraph(Cumsum())
    with pytest.raises(UnsupportedOpError, match=r"cumsum \(cumsum\) mixes channels .* not know"):
        fdt_path(gm, "a")


def test_kinds_of_known_ops():
    gm = trace(nn.Sequential(nn.BatchNorm2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval())
    kinds = [ops.kind(gm, n) for n in gm.graph.nodes if n.op == "call_module"]
    assert kinds == [ops.PER_CHANNEL, ops.GLOBAL_POOL, ops.VIEW]

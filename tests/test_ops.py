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


class Upsampling(nn.Module):
    """The three spellings of one nearest x2 upsampling, and a bilinear module."""

    def __init__(self):
        super().__init__()
        self.up = nn.Upsample(scale_factor=2)
        self.bilinear = nn.UpsamplingBilinear2d(scale_factor=2)

    def forward(self, x):
        a = self.up(x)
        b = torch.nn.functional.interpolate(x, scale_factor=2)
        c = torch.nn.functional.interpolate(x, None, 2, "nearest")
        return a + b + c, self.bilinear(x)


def test_upsampling_is_one_kind_with_one_reading_of_its_arguments():
    gm = trace(Upsampling())
    up = [n for n in gm.graph.nodes if ops.kind(gm, n) == ops.UPSAMPLE]
    assert [n.op for n in up] == ["call_module", "call_function", "call_function",
                                  "call_module"]
    arguments = [ops.upsample_arguments(gm, n) for n in up]
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    for bound in arguments:
        assert bound["input"] is x and bound["size"] is None and not bound["antialias"]
        assert float(bound["scale_factor"]) == 2.0
    assert [b["mode"] for b in arguments] == ["nearest", "nearest", "nearest", "bilinear"]
    assert arguments[3]["align_corners"] is True  # UpsamplingBilinear2d's own setting


def test_bands_fdt_and_whole_network_bands_take_upsampling_from_the_table():
    """Every user of the table reads upsampling the same way, module or function."""
    from memtile.rows.locality import Locality

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Upsample(scale_factor=2),
                          nn.Conv2d(4, 4, 3, padding=1))
    x = torch.randn(1, 3, 8, 8)
    gm = propagate_shapes(trace(model, [x]), [x])
    assert [graph_op.kind for graph_op in SpatialGraph(model).ops.values()][1:] == [
        "local", "local", "local"]
    conv, up, last = [n.name for n in gm.graph.nodes if n.op == "call_module"]
    assert fdt_path(gm, conv).tail == last  # the upsampling is channel-local
    steps = {node.name: step.kind for node, step in Locality(model).steps.items()}
    assert steps[up] == "resample"

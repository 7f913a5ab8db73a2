"""Tiling on real models (timm): the planned peak drops and the outputs match the untiled model.

timm's layers trace differently from torchvision's: BatchNormAct2d becomes a functional
`F.batch_norm` reading get_attr statistics, followed by drop/act submodules. These tests fail
while that op stops every band, tile and channel path.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

timm = pytest.importorskip("timm")

from memtile import zoo
from memtile.spatial import SpatialGraph, full
from memtile.tiling import tile
from memtile.tiling.check import compare, equivalent
from memtile.tiling.estimate import estimate_peak
from memtile.tiling.fdt import apply_fdt, fdt_path
from memtile.tiling.ffmt import apply_ffmt, cuts, span
from memtile.tiling.rewrite import node_named, propagate_shapes
from memtile.trace import trace


def _relative(reference: nn.Module, tiled: nn.Module, x: torch.Tensor) -> float:
    error, scale = compare(reference, tiled, (x,))
    assert scale > 1e-3  # calibrated statistics: an output of ~0 would prove nothing
    return error / scale


def _tile_whole_graph(model: nn.Module, grid: tuple[int, int]) -> tuple[object, float]:
    """FFMT over the whole traced model at 12x12; (graph, relative error on a fresh input)."""
    gm = propagate_shapes(trace(model), [torch.randn(1, 3, 12, 12)])
    names = [n.name for n in cuts(gm)]
    tiled = apply_ffmt(gm, span(gm, names[0], names[-1]), grid)
    return gm, _relative(model, tiled, torch.randn(1, 3, 12, 12))


def _band_matches_whole(graph: SpatialGraph, model: nn.Module, x: torch.Tensor, out) -> bool:
    """Run the output region `out` of `graph` as one band from just the input rows it needs."""
    size = tuple(x.shape[-2:])
    need = graph.input_region(out, size)
    (r0, r1), (c0, c1) = need
    band = graph.run_band(out, x[..., r0:r1, c0:c1], need, size)
    (o0, o1), (p0, p1) = out
    return torch.allclose(band, model(x)[..., o0:o1, p0:p1], atol=1e-6)


def test_band_through_timm_batchnorm_act_matches_whole_map():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, 2, 1), timm.layers.BatchNormAct2d(8, act_layer=nn.Hardswish),
        nn.Conv2d(8, 8, 3, 1, 1, groups=8), timm.layers.BatchNormAct2d(8),
    )
    zoo.calibrate_norms(model, (3, 20, 20))
    graph = SpatialGraph(model)
    x = torch.randn(1, 3, 20, 20)
    whole = model(x)
    assert _band_matches_whole(graph, model, x, ((3, 7), (0, 10)))
    assert graph.output_size((20, 20)) == tuple(whole.shape[-2:])
    assert graph.run_band(full((10, 10)), x, full((20, 20))).shape == whole.shape


def test_functional_batch_norm_in_training_mode_is_named():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), timm.layers.BatchNormAct2d(4)).train()
    with pytest.raises(Exception, match="batch_norm in training mode"):
        SpatialGraph(model)


def test_ffmt_lowers_planned_peak_of_mobilenetv3():
    model, inputs = zoo.get("timm:mobilenetv3_large_100", input_shape=(3, 64, 64))
    tiled, report = tile(model, inputs, methods=("ffmt",))
    assert report.peak_after_bytes * 1.5 <= report.peak_before_bytes
    assert any(step.method == "ffmt" for step in report.steps)
    assert any(barrier.startswith("ffmt: mean") for barrier in report.barriers)  # SE squeeze
    assert _relative(model, tiled, torch.randn(1, 3, 64, 64)) <= 1e-5
    assert equivalent(report.max_abs_error, report.output_scale)


def test_fdt_splits_a_timm_inverted_residual_through_functional_batch_norm():
    model, inputs = zoo.get("timm:efficientnet_lite0", input_shape=(3, 64, 64))
    gm = propagate_shapes(trace(model), inputs)
    path = fdt_path(gm, "blocks_1_0_conv_pw")
    assert path.tail == "blocks_1_0_conv_pwl"
    assert sum(node_named(gm, n).target is F.batch_norm for n in path.mids) == 2
    tiled = apply_fdt(gm, path, 4)
    assert _relative(model, tiled, torch.randn(1, 3, 64, 64)) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("name", ["timm:mobilenetv3_large_100", "timm:efficientnet_lite0"])
def test_fdt_discovery_steps_on_timm_inverted_residuals(name):
    model, inputs = zoo.get(name, input_shape=(3, 96, 96))
    tiled, report = tile(model, inputs, methods=("fdt",))
    assert [step.method for step in report.steps][:1] == ["fdt"]
    assert report.peak_after_bytes < report.peak_before_bytes
    assert report.macs_after == report.macs_before
    assert _relative(model, tiled, torch.randn(1, 3, 96, 96)) <= 1e-5


def test_resnet_d_average_pool_with_ceil_mode_runs_in_bands_where_its_windows_are_whole():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1),
                          nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)).eval()
    graph = SpatialGraph(model)
    x = torch.randn(1, 3, 12, 12)
    assert _band_matches_whole(graph, model, x, ((2, 4), (0, 6)))
    with pytest.raises(Exception, match="on 11 positions ends in a partial window"):
        graph.sizes((11, 12))


def test_channel_slices_run_in_bands_and_other_slices_are_refused():
    class Ghost(nn.Module):  # timm's GhostModule keeps the first channels of a concat
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            y = self.a(x)
            return torch.cat([y, self.b(y)], dim=1)[:, :6, :, :] + 1

    model = Ghost().eval()
    graph = SpatialGraph(model)
    x = torch.randn(1, 3, 10, 10)
    assert _band_matches_whole(graph, model, x, ((4, 7), (0, 10)))

    class RowSlice(nn.Module):
        def forward(self, x):
            return x[:, :, 1:]

    with pytest.raises(Exception, match=r"getitem \(getitem\) is not spatially local \(view\)"):
        SpatialGraph(RowSlice())


def test_ffmt_span_with_a_value_it_never_uses():
    class Unused(nn.Module):  # timm's dla34 Tree computes a projection it may not use
        def __init__(self):
            super().__init__()
            self.a, self.b, self.project = (nn.Conv2d(3, 4, 3, padding=1),
                                            nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1))

        def forward(self, x):
            y = self.a(x)
            self.project(y)
            return self.b(y)

    assert _tile_whole_graph(Unused().eval(), (3, 1))[1] <= 1e-5


def test_ffmt_spans_timm_convnext_layernorm2d():
    """convnext_atto's stem and stage 0: LayerNorm2d runs permute -> layer_norm over channels
    -> permute back, and every block scales by `gamma.reshape(1, -1, 1, 1)`."""
    model, _ = zoo.get("timm:convnext_atto")
    x = torch.randn(1, 3, 64, 64)
    gm = propagate_shapes(trace(model), [x])
    assert "add_1" in [n.name for n in cuts(gm)]  # the end of stage 0
    tiled = apply_ffmt(gm, span(gm, "x", "add_1"), (3, 2))
    assert _relative(model, tiled, torch.randn(1, 3, 64, 64)) <= 1e-5


def test_peak_estimate_of_a_view_of_a_parameter():
    class LayerScale(nn.Module):  # timm's convnext: x * gamma.reshape(1, -1, 1, 1)
        def __init__(self):
            super().__init__()
            self.conv, self.gamma = nn.Conv2d(3, 4, 1), nn.Parameter(torch.ones(4))

        def forward(self, x):
            return self.conv(x).mul(self.gamma.reshape(1, -1, 1, 1))

    gm = propagate_shapes(trace(LayerScale()), [torch.randn(1, 3, 8, 8)])
    assert estimate_peak(gm).peak_without_input_bytes == 4 * 8 * 8 * 4 + 16


def test_channel_split_runs_in_tiles():
    class Res2(nn.Module):  # res2net's Bottle2neck: split channels, convolve, add, concat
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            parts = torch.split(self.a(x), 4, 1)
            return torch.cat([self.b(parts[0]), self.b(parts[0]) + parts[1]], 1)

    gm, error = _tile_whole_graph(Res2().eval(), (3, 2))
    assert error <= 1e-5
    assert estimate_peak(gm).peak_without_input_bytes > 0

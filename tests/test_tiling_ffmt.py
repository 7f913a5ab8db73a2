"""FFMT: spatially tiled spans compute the same outputs, write tiles in place and pay halo MACs."""

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from test_spatial import convnext_like
from torch import fx, nn

from memtile import zoo
from memtile.errors import UnsupportedOpError
from memtile.tiling.check import compare, equivalent, equivalent_models
from memtile.tiling.ffmt import apply_ffmt, cuts, span
from memtile.tiling.macs import count_macs
from memtile.tiling.rewrite import nbytes, propagate_shapes


class Residual(nn.Module):
    def __init__(self, channels: int, kernel: int = 3, dilation: int = 1):
        super().__init__()
        pad = dilation * (kernel // 2)
        self.body = nn.Sequential(
            nn.Conv2d(channels, 2 * channels, 1), nn.ReLU6(),
            nn.Conv2d(2 * channels, 2 * channels, kernel, 1, pad, dilation, groups=2 * channels),
            nn.Conv2d(2 * channels, channels, 1),
        )

    def forward(self, x):
        return x + self.body(x)


@st.composite
def trunks(draw) -> tuple[nn.Module, int]:
    """Conv/pool/BN/activation/residual layers with random kernels, strides, padding, dilation."""
    channels = first = draw(st.integers(1, 4))
    layers: list[nn.Module] = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["conv", "dw", "maxpool", "avgpool", "residual"]))
        k = draw(st.sampled_from([1, 2, 3, 5]))
        s = draw(st.sampled_from([1, 2]))
        p = draw(st.integers(0, k // 2))
        if kind == "conv":
            out = draw(st.integers(1, 5))
            layers += [nn.Conv2d(channels, out, k, s, p, draw(st.sampled_from([1, 2]))),
                       nn.BatchNorm2d(out), nn.ReLU()]
            channels = out
        elif kind == "dw":
            layers += [nn.Conv2d(channels, channels, k, s, p, groups=channels), nn.Hardswish()]
        elif kind == "maxpool":
            layers.append(nn.MaxPool2d(k, s, p, ceil_mode=draw(st.booleans())))
        elif kind == "avgpool":
            layers.append(nn.AvgPool2d(k, s, p))
        else:
            layers.append(Residual(channels, draw(st.sampled_from([1, 3])),
                                   draw(st.sampled_from([1, 2]))))
    return nn.Sequential(*layers).eval(), first


def tile_whole(model: nn.Module, x: torch.Tensor, grid: tuple[int, int]):
    gm = propagate_shapes(fx.symbolic_trace(model), [x])
    nodes = [n for n in gm.graph.nodes if n.op != "output"]
    return gm, apply_ffmt(gm, span(gm, nodes[0].name, nodes[-1].name), grid)


def random_case(trunk, size: int, data):
    """(model, input, its output's (H, W), a grid of at most H x W tiles) of a drawn trunk."""
    model, channels = trunk
    x = torch.randn(1, channels, size, size)
    try:
        out_hw = tuple(model(x).shape[-2:])
    except RuntimeError:  # the random trunk shrank the map below a kernel
        assume(False)
    return model, x, out_hw, (data.draw(st.integers(1, out_hw[0])),
                              data.draw(st.integers(1, out_hw[1])))


@settings(max_examples=30, deadline=None)
@given(trunk=trunks(), size=st.integers(12, 24), data=st.data())
def test_ffmt_random_spans_are_equivalent(trunk, size, data):
    torch.manual_seed(0)
    model, x, _, grid = random_case(trunk, size, data)
    _, tiled = tile_whole(model, x, grid)
    error, scale = compare(model, tiled, [x])
    assert equivalent(error, scale), (error, scale, grid)


def test_ffmt_pointwise_span_has_no_recompute_and_halo_span_does():
    torch.manual_seed(0)
    x = torch.randn(1, 4, 16, 16)
    pointwise = nn.Sequential(nn.Conv2d(4, 16, 1), nn.ReLU(), nn.Conv2d(16, 4, 1)).eval()
    gm, tiled = tile_whole(pointwise, x, (4, 4))
    assert count_macs(tiled, [x]) == count_macs(gm, [x])
    halo = nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 4, 3, padding=1))
    gm, tiled = tile_whole(halo.eval(), x, (4, 1))
    # 4 strips of 4 output rows: the first conv must make 6 rows per inner strip and 5 per border
    # strip (6 extra rows); spatial.py may compute one more row per conv at each border and crop
    # it (4 more). Both convs cost the same per output row.
    base = count_macs(gm, [x])
    row = 16 * 16 * 4 * 9
    extra = count_macs(tiled, [x]) - base
    assert 6 * row <= extra <= 10 * row


def test_ffmt_writes_tiles_in_place_without_concat():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, 1, 1)).eval()
    x = torch.randn(1, 3, 32, 32)
    _, tiled = tile_whole(model, x, (2, 3))
    program = torch.export.export(tiled, (x,))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert not any("cat" in t or "stack" in t for t in targets)
    assert targets.count("aten.copy_.default") == 6


def test_ffmt_tile_working_set_shrinks_with_tiles():
    model = nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1), nn.ReLU(), nn.Conv2d(32, 3, 3, 2, 1)).eval()
    x = torch.randn(1, 3, 64, 64)
    gm = propagate_shapes(fx.symbolic_trace(model), [x])
    wide = nbytes(next(n for n in gm.graph.nodes if n.name == "_1"))
    _, strips = tile_whole(model, x, (8, 1))
    working = strips.ffmt0.tile_bytes()
    # an inner strip: 4 output rows of the stride-2 conv read 9 rows of the 32-channel map (the
    # ReLU overwrites it in place), plus the 4 x 32 x 3 result
    assert working == 9 * 64 * 32 * 4 + 4 * 32 * 3 * 4
    assert working < wide / 6


def test_cuts_skip_the_inside_of_residual_blocks():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Residual(4), nn.Conv2d(4, 4, 1)).eval()
    gm = propagate_shapes(fx.symbolic_trace(model), [torch.randn(1, 3, 8, 8)])
    names = [n.name for n in cuts(gm)]
    assert names == ["input_1", "_0", "add", "_2"]


def test_ffmt_refuses_spans_with_a_second_input():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Residual(4)).eval()
    gm = propagate_shapes(fx.symbolic_trace(model), [torch.randn(1, 3, 8, 8)])
    path = span(gm, "_0", "add")
    broken = type(path)("_1_body_0", path.nodes[1:])
    with pytest.raises(UnsupportedOpError, match="single input"):
        apply_ffmt(gm, broken, (2, 1))


@pytest.mark.parametrize("grid", [(3, 1), (3, 3)])
def test_ffmt_on_the_stem_of_mobilenet_v1_vww(grid):
    model, inputs = zoo.get("mobilenet_v1_025_vww", batch=1)
    gm = propagate_shapes(fx.symbolic_trace(model), inputs)
    names = [n.name for n in cuts(gm)]
    path = span(gm, names[0], names[names.index("_4_1_2")])  # input .. end of the 4th block
    tiled = apply_ffmt(gm, path, grid)
    assert equivalent_models(model, tiled, inputs)  # float32: 1.8e-5 of the 2-logit output; float64: 6e-15
    assert count_macs(tiled, inputs) > count_macs(model, inputs)  # 3x3 halos are recomputed


@pytest.mark.parametrize("grid", [(2, 2), (7, 1)])
def test_ffmt_tiles_through_permuted_layer_norms(grid):
    """timm's LayerNorm2d (permute, layer_norm over channels, permute back) inside a span: the
    NHWC interior is cropped along its own H and W dims and costed per NHWC position."""
    model = convnext_like(c=8)
    x = torch.randn(1, 3, 56, 56)
    gm, tiled = tile_whole(model, x, grid)
    error, scale = compare(model, tiled, [torch.randn(1, 3, 56, 56)])  # a fresh input
    assert error / scale < 1e-6
    tiles = tiled.ffmt0
    nhwc = [n.name for n in tiles.spatial.order if tiles.spatial.ops[n].dims != (-2, -1)]
    assert nhwc and all(tiles.pixel_bytes[name] == 8 * 4 for name in nhwc)  # C floats
    assert tiles.tile_bytes() < nbytes(next(n for n in gm.graph.nodes if n.name == "_2_fc1"))


@settings(max_examples=30, deadline=None)
@given(trunk=trunks(), size=st.integers(12, 24), data=st.data())
def test_tile_regions_are_their_strips_rows_and_columns(trunk, size, data):
    """`tile_needs` walks the regions of row strips and column strips only; every tile's
    regions must be what a walk from that tile's own output region gives."""
    from memtile.spatial import SpatialGraph, split
    from memtile.tiling.ffmt import tile_needs

    model, _, (out_h, out_w), grid = random_case(trunk, size, data)
    graph = SpatialGraph(model)
    walks = []
    walk = graph.regions
    graph.regions = lambda *a: walks.append(a) or walk(*a)
    needs = tile_needs(graph, (size, size), grid)
    del graph.regions
    assert len(walks) == grid[0] + grid[1]
    tiles = [(rows, cols) for rows in split(out_h, grid[0]) for cols in split(out_w, grid[1])]
    assert [out for out, _ in needs] == tiles
    assert all(need == graph.regions(out, (size, size)) for out, need in needs)

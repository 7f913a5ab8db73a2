"""spatial.py: band/tile outputs stitched together equal the full forward, for random graphs."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from memtile.errors import InputShapeError, UnsupportedOpError
from memtile.spatial import NCHW, SpatialGraph, Window, band_region, split

SETTINGS = settings(max_examples=20, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def conv_layer(draw, channels: int) -> nn.Module:
    kind = draw(st.sampled_from(["conv", "conv", "conv", "max", "avg", "relu"]))
    k = draw(st.integers(1, 4))
    s = draw(st.integers(1, 3))
    if kind == "conv":
        d = draw(st.integers(1, 2))
        groups = draw(st.sampled_from([1, channels]))
        return nn.Conv2d(channels, channels, k, s, draw(st.integers(0, k)), d, groups)
    if kind == "max":
        return nn.MaxPool2d(k, s, draw(st.integers(0, k // 2)), draw(st.integers(1, 2)),
                            ceil_mode=draw(st.booleans()))
    if kind == "avg":
        return nn.AvgPool2d(k, s, draw(st.integers(0, k // 2)))
    return nn.ReLU()


class Block(nn.Module):
    """A residual or concat block: branch a (kxk, stride s) joined with branch b (1x1, stride s)."""

    def __init__(self, c: int, k: int, s: int, d: int, join: str) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(c, c, k, s, d * (k - 1) // 2, d), nn.BatchNorm2d(c),
                               nn.ReLU(), nn.Conv2d(c, c, 3, 1, 1))
        self.b = nn.Conv2d(c, c, 1, s) if s > 1 else nn.Identity()
        self.join = join
        self.fuse = nn.Conv2d(2 * c, c, 1)

    def forward(self, x):
        if self.join == "add":
            return torch.relu(self.a(x) + self.b(x))
        return self.fuse(torch.cat([self.a(x), self.b(x)], 1))


@st.composite
def conv_stack(draw):
    c = 3
    layers = [nn.Conv2d(2, c, 3, 1, 1)]
    layers += [draw(conv_layer(c)) for _ in range(draw(st.integers(1, 5)))]
    return nn.Sequential(*layers)


@st.composite
def residual_net(draw):
    c = 3
    blocks = [nn.Conv2d(2, c, 3, 1, 1)]
    for _ in range(draw(st.integers(1, 3))):
        k = draw(st.sampled_from([1, 3, 5]))
        blocks.append(Block(c, k, draw(st.integers(1, 2)), draw(st.integers(1, 2)),
                            draw(st.sampled_from(["add", "cat"]))))
    return nn.Sequential(*blocks)


def stitched(graph: SpatialGraph, x: torch.Tensor, parts: tuple[int, int]) -> torch.Tensor:
    """Run every tile of a parts[0] x parts[1] grid of the output and stitch the tiles."""
    in_size = tuple(x.shape[-2:])
    size = graph.output_size(in_size)
    rows = []
    for hi in split(size[0], parts[0]):
        tiles = []
        for wi in split(size[1], parts[1]):
            out = (hi, wi)
            (a, b), (c, d) = graph.input_region(out, in_size)
            tiles.append(graph.run_band(out, x[..., a:b, c:d], ((a, b), (c, d)), in_size))
        rows.append(torch.cat(tiles, -1))
    return torch.cat(rows, -2)


def check_splits(model: nn.Module, x: torch.Tensor, data) -> None:
    model = model.eval()
    with torch.no_grad():
        try:
            ref = model(x)
        except RuntimeError:  # the random graph shrank the image below a window
            return
        graph = SpatialGraph(model)
        size = graph.output_size(tuple(x.shape[-2:]))
        assert tuple(ref.shape[-2:]) == size
        parts = (data.draw(st.integers(1, size[0])), data.draw(st.integers(1, size[1])))
        got = stitched(graph, x, parts)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@SETTINGS
@given(conv_stack(), st.integers(9, 40), st.integers(9, 24), st.data())
def test_random_conv_stack_bands_equal_full_forward(model, h, w, data):
    check_splits(model, torch.randn(2, 2, h, w), data)


@SETTINGS
@given(residual_net(), st.integers(9, 40), st.integers(9, 24), st.data())
def test_random_residual_graph_bands_equal_full_forward(model, h, w, data):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
    check_splits(model, torch.randn(2, 2, h, w), data)


def test_intervals_of_strided_dilated_conv_are_exact():
    conv = nn.Sequential(nn.Conv2d(1, 1, 3, 2, 1), nn.Conv2d(1, 1, 3, 1, 2, dilation=2))
    graph = SpatialGraph(conv)
    assert graph.output_size((97, 10)) == (49, 5)
    regions = graph.regions(band_region(0, (10, 20), (49, 5)), (97, 10))
    # dilated conv: rows 10..19 read 8..21; stride-2 conv: rows 8..21 read 15..43
    assert [regions[n][0] for n in [graph.input, *graph.order]] == [(15, 44), (8, 22), (10, 20)]
    assert [regions[n][1] for n in [graph.input, *graph.order]] == [(0, 10), (0, 5), (0, 5)]


def test_window_ceil_mode_size_matches_torch():
    for n, k, s, p in itertools.product(range(5, 12), (2, 3), (2, 3), (0, 1)):
        if p > k // 2:
            continue
        pool = nn.MaxPool2d(k, s, p, ceil_mode=True)
        want = pool(torch.zeros(1, 1, n, 1 + 2 * p + k)).shape[2]
        assert Window(k, s, p, p, True).out_size(n) == want


def test_unsupported_op_is_named():
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3)
            self.pool = nn.AdaptiveAvgPool2d(1)

        def forward(self, x):
            return self.pool(self.conv(x))

    with pytest.raises(UnsupportedOpError, match="pool.*AdaptiveAvgPool2d"):
        SpatialGraph(Head())


def test_training_batchnorm_is_refused_unless_frozen():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)).train()
    with pytest.raises(UnsupportedOpError, match="'1'.*BatchNorm2d.*training mode"):
        SpatialGraph(model)
    x = torch.randn(1, 1, 12, 12)
    graph = SpatialGraph(model, frozen_bn=True)
    with torch.no_grad():
        got = stitched(graph, x, (3, 1))
        torch.testing.assert_close(got, model.eval()(x))


def test_band_missing_rows_is_an_error():
    graph = SpatialGraph(nn.Sequential(nn.Conv2d(1, 1, 3, padding=1)))
    x = torch.randn(1, 1, 10, 4)
    with pytest.raises(InputShapeError, match="does not cover"):
        graph.run_band(band_region(0, (2, 5), (10, 4)), x[..., 2:5, :], ((2, 5), (0, 4)), (10, 4))


class LayerNorm2d(nn.LayerNorm):
    """timm's LayerNorm2d: channels moved last, normalized, moved back (NHWC inside)."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """timm's ConvNeXt block with conv MLP (convnext_atto): 7x7 depthwise, LayerNorm2d, MLP,
    layer scale `gamma.reshape(1, -1, 1, 1)`, residual."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = LayerNorm2d(c)
        self.fc1, self.fc2 = nn.Conv2d(c, 4 * c, 1), nn.Conv2d(4 * c, c, 1)
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):
        y = self.fc2(F.gelu(self.fc1(self.norm(self.conv_dw(x)))))
        return x + y.mul(self.gamma.reshape(1, -1, 1, 1))


def convnext_like(c: int = 8) -> nn.Module:
    """A ConvNeXt stem (4x4 patchify conv + LayerNorm2d) and two blocks, with random norms."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, c, 4, 4), LayerNorm2d(c), ConvNeXtBlock(c),
                          ConvNeXtBlock(c))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
    return model.eval()


@pytest.mark.parametrize("parts", [(1, 1), (3, 1), (2, 3), (7, 7)])
def test_permuted_channel_norm_tiles_equal_full_forward(parts):
    model = convnext_like()
    x = torch.randn(2, 3, 28, 36)
    graph = SpatialGraph(model, layouts=True)
    nhwc = [n for n in graph.order if graph.ops[n].dims != NCHW]
    assert nhwc and all(graph.ops[n].dims == (-3, -2) for n in nhwc)  # H, W of N x H x W x C
    with torch.no_grad():
        ref = model(x)
        got = stitched(graph, x, parts)
    assert (got - ref).abs().max() / ref.abs().max() < 1e-6


def test_permutes_need_layouts_and_norms_and_constants_must_not_span_h_or_w():
    with pytest.raises(UnsupportedOpError, match="permute"):
        SpatialGraph(convnext_like())  # the row engine joins rows along dim -2: NCHW only

    class NormOverWidth(nn.Module):
        def forward(self, x):
            return F.layer_norm(x, (16,))

    class EndsNHWC(nn.Module):
        def forward(self, x):
            return x.permute(0, 2, 3, 1)

    class ConvOnNHWC(nn.Module):
        def forward(self, x):
            return F.max_pool2d(x.permute(0, 2, 3, 1), 3).permute(0, 3, 1, 2)

    class PositionalMap(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = nn.Parameter(torch.randn(4, 16, 1))

        def forward(self, x):
            return x + self.pos.unsqueeze(0)  # varies over H: a band would need its rows

    for tail, why in [(NormOverWidth(), "layer_norm.*include H or W"),
                      (PositionalMap(), "add.*unsqueeze of shape \\(1, 4, 16, 1\\) varies over H"),
                      (EndsNHWC(), "must return an NCHW"),
                      (ConvOnNHWC(), "max_pool2d.*needs H and W as the last two dims")]:
        with pytest.raises(UnsupportedOpError, match=why):
            SpatialGraph(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), tail), layouts=True)


class Interpolate(nn.Module):
    """`F.interpolate` as a call in the graph (smp's decoders), not a module."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return F.interpolate(x, scale_factor=self.factor, mode="nearest")


@st.composite
def transposed_conv(draw, c: int) -> nn.ConvTranspose2d:
    stride = draw(st.integers(1, 3))
    kernel = draw(st.integers(stride, stride + 2))  # smaller than the stride is refused
    return nn.ConvTranspose2d(c, c, kernel, stride, draw(st.integers(0, kernel - 1)),
                              draw(st.integers(0, stride - 1)), bias=draw(st.booleans()))


@st.composite
def upsampling_stack(draw):
    c = 3
    layers = [nn.Conv2d(2, c, 3, 1, 1)]
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["module", "function", "bilinear", "transposed", "layer"]))
        factor = draw(st.sampled_from([2, 4]))
        layers.append(nn.Upsample(scale_factor=factor) if kind == "module"
                      else Interpolate(float(factor)) if kind == "function"
                      else nn.Upsample(scale_factor=factor, mode="bilinear")
                      if kind == "bilinear"
                      else draw(transposed_conv(c)) if kind == "transposed"
                      else draw(conv_layer(c)))
    return nn.Sequential(*layers)


@SETTINGS
@given(upsampling_stack(), st.integers(3, 12), st.integers(3, 10), st.data())
def test_upsampling_tiles_equal_full_forward(model, h, w, data):
    """Nearest and bilinear upsampling and transposed convolutions, in bands and tiles."""
    check_splits(model, torch.randn(1, 2, h, w), data)


@pytest.mark.parametrize("kernel,stride,padding,output_padding", [(3, 2, 0, 1), (4, 3, 0, 2)])
def test_transposed_output_padding_past_every_input_holds_the_bias_alone(
        kernel, stride, padding, output_padding):
    """With output_padding > padding the last rows and columns get no input's terms: a tile
    there holds zeros plus the bias, as the whole op does."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1),
                          nn.ConvTranspose2d(4, 5, kernel, stride, padding, output_padding))
    x = torch.randn(1, 3, 7, 6, dtype=torch.float64)
    model = model.double().eval()
    with torch.no_grad():
        torch.testing.assert_close(stitched(SpatialGraph(model), x, (4, 3)), model(x),
                                   rtol=1e-12, atol=1e-12)


def test_upsampling_factor_and_mode_are_checked():
    for layer, why in ((nn.Upsample(scale_factor=3), "not a power of two"),
                       (nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
                        "align_corners=True"),
                       (nn.Upsample(scale_factor=2, mode="nearest-exact"), "nearest-exact"),
                       (nn.ConvTranspose2d(1, 1, 2, 3), "kernel smaller than its stride")):
        with pytest.raises(UnsupportedOpError, match=why):
            SpatialGraph(nn.Sequential(nn.Conv2d(1, 1, 3), layer))


def test_upsampling_to_a_traced_size_reads_the_factor_from_the_shapes():
    """smp's Unet upsamples to the skip's size: traced at example inputs, that size is a number."""
    from memtile.tiling.rewrite import propagate_shapes
    from memtile.trace import trace

    class ToSkip(nn.Module):
        def __init__(self):
            super().__init__()
            self.down, self.up = nn.Conv2d(2, 3, 3, 4, 1), nn.Conv2d(3, 3, 3, 1, 1)

        def forward(self, x):
            y = self.up(self.down(x))
            return F.interpolate(y, size=x.shape[-2:])

    x = torch.randn(1, 2, 16, 12)
    model = ToSkip().eval()
    with pytest.raises(UnsupportedOpError, match="getattr"):
        SpatialGraph(trace(model))  # the size is a shape read: no factor without example inputs
    graph = SpatialGraph(propagate_shapes(trace(model, (x,)), (x,)))
    with torch.no_grad():
        torch.testing.assert_close(stitched(graph, x, (3, 2)), model(x), rtol=1e-5, atol=1e-5)


class _Dispatched(TorchDispatchMode):
    """The ATen calls of a run, each with its non-tensor arguments and, per tensor argument,
    where it came from (the band, an earlier call's output by position, or a constant) and its
    shape and strides."""

    def __init__(self, band: torch.Tensor) -> None:
        super().__init__()
        self.calls: list[tuple] = []
        self.made = {id(band): "band"}
        self.keep = [band]  # ids stay unique while the run lasts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))

        def seen(value):
            if not isinstance(value, torch.Tensor):
                return value
            return self.made.get(id(value), "constant"), tuple(value.shape), value.stride()

        self.calls.append((str(func), tree_map(seen, (args, kwargs))))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self.made[id(tensor)] = len(self.calls)
                self.keep.append(tensor)
        return out


def dispatched(graph: SpatialGraph, x: torch.Tensor, out, in_size) -> list[tuple]:
    (a, b), (c, d) = region = graph.input_region(out, in_size)
    band = x[..., a:b, c:d]
    with torch.no_grad(), _Dispatched(band) as mode:
        graph.run_band(out, band, region, in_size)
    return mode.calls


@SETTINGS
@given(st.sampled_from([conv_stack, residual_net, upsampling_stack]), st.data(),
       st.integers(9, 40), st.integers(9, 24))
def test_tiles_with_one_band_signature_run_the_same_calls(stack, data, h, w):
    """FFMT traces one tile per signature (tiling/stitch.py): tiles that share a signature must
    dispatch the same ATen calls with the same arguments, offsets into their bands included."""
    model = data.draw(stack()).eval()
    x = torch.randn(1, 2, h, w)
    try:
        with torch.no_grad():
            model(x)
    except RuntimeError:  # the random graph shrank the image below a window
        return
    graph, in_size = SpatialGraph(model), (h, w)
    size = graph.output_size(in_size)
    # up to 5x5 tiles: one tile per output position made this test take 500 s
    parts = tuple(data.draw(st.integers(1, min(n, 5))) for n in size)
    calls: dict[tuple, list] = {}
    for out in itertools.product(split(size[0], parts[0]), split(size[1], parts[1])):
        signature = graph.band_signature(out, graph.input_region(out, in_size), in_size)
        ran = dispatched(graph, x, out, in_size)
        assert calls.setdefault(signature, ran) == ran

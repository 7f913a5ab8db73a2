"""FDT: channel-split rewrites compute the same outputs with no extra MACs and per-partition buffers."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn

from memtile import zoo
from memtile.errors import UnsupportedOpError
from memtile.tiling.check import compare, equivalent
from memtile.tiling.fdt import Accumulate, PartialSum, apply_fdt, fdt_path, fdt_paths_through
from memtile.tiling.macs import count_macs
from memtile.tiling.planned import planned_peak
from memtile.tiling.rewrite import module_of, nbytes, propagate_shapes

ACTIVATIONS = [nn.ReLU, nn.ReLU6, nn.Hardswish, nn.SiLU, nn.Identity]


def randomize_bn(model: nn.Module) -> nn.Module:
    """Non-trivial eval-mode BN statistics so that slicing mistakes show up in the outputs."""
    gen = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            n = module.num_features
            module.running_mean.copy_(torch.rand(n, generator=gen) * 2 - 1)
            module.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            module.bias.data.copy_(torch.rand(n, generator=gen) - 0.5)
    return model.eval()


def traced(model: nn.Module, x: torch.Tensor) -> fx.GraphModule:
    return propagate_shapes(fx.symbolic_trace(model), [x])


def check_split(model: nn.Module, x: torch.Tensor, head: str, parts: int) -> fx.GraphModule:
    """Apply FDT at `head`; assert equivalence, equal MACs and that the widest buffer shrank."""
    gm = traced(model, x)
    path = fdt_path(gm, head)
    tiled = apply_fdt(gm, path, parts)
    error, scale = compare(model, tiled, [x])
    assert equivalent(error, scale), (error, scale)
    assert count_macs(tiled, [x]) == count_macs(gm, [x])
    inner = max(nbytes(n) for n in gm.graph.nodes if n.name in path.nodes[:-1])
    original = {n.name for n in gm.graph.nodes}
    partition_nodes = [
        n for n in tiled.graph.nodes
        if n.name not in original and not str(n.target).endswith(("_tail", "accumulate"))
    ]
    tiled_inner = max(nbytes(n) for n in partition_nodes)
    expected = -(-path.width // parts) / path.width
    assert tiled_inner <= inner * expected + 64
    return tiled


@settings(max_examples=30, deadline=None)
@given(
    cin=st.integers(1, 5), wide=st.integers(2, 24), cout=st.integers(1, 6),
    k1=st.sampled_from([1, 3]), s1=st.sampled_from([1, 2]),
    depthwise=st.booleans(), k2=st.sampled_from([1, 3, 5]), s2=st.sampled_from([1, 2]),
    mult=st.sampled_from([1, 2]), bn=st.booleans(), act=st.sampled_from(ACTIVATIONS),
    pool=st.sampled_from(["none", "max", "avg"]), k3=st.sampled_from([1, 3]),
    tail_bias=st.booleans(), size=st.integers(5, 12), data=st.data(),
)
def test_fdt_random_conv_paths_are_equivalent(
    cin, wide, cout, k1, s1, depthwise, k2, s2, mult, bn, act, pool, k3, tail_bias, size, data
):
    torch.manual_seed(0)
    layers = [nn.Conv2d(cin, wide, k1, s1, k1 // 2)]
    width = wide
    if bn:
        layers.append(nn.BatchNorm2d(wide))
    layers.append(act())
    if depthwise:
        layers += [nn.Conv2d(wide, wide * mult, k2, s2, k2 // 2, groups=wide), act()]
        width = wide * mult
    if pool == "max":
        layers.append(nn.MaxPool2d(2, ceil_mode=True))
    elif pool == "avg":
        layers.append(nn.AvgPool2d(3, 1, 1))
    layers.append(nn.Conv2d(width, cout, k3, 1, k3 // 2, bias=tail_bias))
    model = randomize_bn(nn.Sequential(*layers))
    parts = data.draw(st.integers(1, wide))
    check_split(model, torch.randn(1, cin, size, size), "_0", parts)


@settings(max_examples=20, deadline=None)
@given(
    widths=st.lists(st.integers(1, 64), min_size=3, max_size=3),
    batch=st.integers(1, 3), bn=st.booleans(), data=st.data(),
)
def test_fdt_random_dense_paths_are_equivalent(widths, batch, bn, data):
    torch.manual_seed(0)
    a, b, c = widths
    layers = [nn.Linear(a, b)] + ([nn.BatchNorm1d(b)] if bn else []) + [nn.GELU(), nn.Linear(b, c)]
    model = randomize_bn(nn.Sequential(*layers))
    check_split(model, torch.randn(batch, a), "_0", data.draw(st.integers(1, b)))


@pytest.mark.parametrize("parts", [2, 4, 10, 32])
def test_fdt_dense_widening_mlp(parts):
    """100 -> 1000 -> 10: the 1000-wide buffer exists only 1000/N at a time, MACs unchanged."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(100, 1000), nn.ReLU(), nn.Linear(1000, 10)).eval()
    tiled = check_split(model, torch.randn(1, 100), "_0", parts)
    tails = [m for name, m in tiled.named_modules() if name.endswith("_tail")]
    assert len(tails) == parts
    assert sum(getattr(m, "bias", None) is not None for m in tails) == 1  # bias added once


class InvertedResidual(nn.Module):
    def __init__(self, channels: int = 8, expand: int = 6):
        super().__init__()
        wide = channels * expand
        self.conv = nn.Sequential(
            nn.Conv2d(channels, wide, 1, bias=False), nn.BatchNorm2d(wide), nn.ReLU6(inplace=True),
            nn.Conv2d(wide, wide, 3, 1, 1, groups=wide, bias=False), nn.BatchNorm2d(wide),
            nn.ReLU6(inplace=True), nn.Conv2d(wide, channels, 1, bias=False), nn.BatchNorm2d(channels),
        )

    def forward(self, x):
        return x + self.conv(x)


@pytest.mark.parametrize("parts", [2, 3, 48])
def test_fdt_inverted_residual(parts):
    torch.manual_seed(0)
    model = randomize_bn(InvertedResidual())
    x = torch.randn(1, 8, 14, 14)
    check_split(model, x, "conv_0", parts)
    gm = traced(model, x)
    assert fdt_path(gm, "conv_0").tail == "conv_6"
    assert fdt_paths_through(gm, "conv_3") == [fdt_path(gm, "conv_0")]
    assert fdt_paths_through(gm, "conv_6") == []  # the tail's output is not split


def test_fdt_residual_add_ends_path_and_is_named():
    model = randomize_bn(InvertedResidual())
    gm = traced(model, torch.randn(1, 8, 6, 6))
    with pytest.raises(UnsupportedOpError, match=r"ended at add \(add\).*residual"):
        fdt_path(gm, "conv_6")


def test_fdt_channel_mixing_op_ends_path():
    class Shuffle(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.b(torch.softmax(self.a(x), dim=1))

    gm = traced(Shuffle(), torch.randn(1, 3, 4, 4))
    with pytest.raises(UnsupportedOpError, match="softmax.*mixes channels"):
        fdt_path(gm, "a")


def test_fdt_refuses_transposed_convolutions():
    """A transposed conv's weight is (in, out, k, k): slicing it as a conv's built a module with
    its arguments out of place, and tiling smp's Linknet crashed with a TypeError."""
    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.up = nn.ConvTranspose2d(8, 8, 2, stride=2)
            self.b = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.b(torch.relu(self.up(torch.relu(self.a(x)))))

    gm = traced(Decoder().eval(), torch.randn(1, 3, 4, 4))
    with pytest.raises(UnsupportedOpError, match="ConvTranspose2d.*mixes channels"):
        fdt_path(gm, "a")
    with pytest.raises(UnsupportedOpError, match="ConvTranspose2d.*cannot head"):
        fdt_path(gm, "up")


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
@pytest.mark.parametrize("parts", [2, 3])
def test_fdt_through_upsampling(mode, parts):
    """Upsampling reads one channel at a time (any mode): a path runs through it, as through
    smp Unet's decoder (before: "interpolate ... mixes channels or is not channel-local")."""
    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 12, 3, padding=1), nn.Conv2d(12, 4, 1)
            self.up = nn.Upsample(scale_factor=2, mode=mode)

        def forward(self, x):
            y = nn.functional.interpolate(torch.relu(self.a(x)), scale_factor=2.0, mode=mode)
            return self.b(self.up(y))

    torch.manual_seed(0)
    tiled = check_split(Decoder().eval(), torch.randn(1, 3, 6, 5), "a", parts)
    assert any(isinstance(m, nn.Upsample) for m in tiled.modules())


def test_fdt_through_global_pool_and_flatten_to_classifier():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 40, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(40, 5),
    ).eval()
    tiled = check_split(model, torch.randn(2, 3, 9, 9), "_0", 5)
    partial_sums = [n for n in tiled.graph.nodes if isinstance(module_of(tiled, n), PartialSum)]
    assert len(partial_sums) == 4  # partitions 1..4 multiply into partition 0's output


def test_fdt_refuses_training_mode_batchnorm():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.Conv2d(8, 2, 1)).train()
    gm = traced(model, torch.randn(2, 3, 4, 4))
    with pytest.raises(UnsupportedOpError, match="training mode"):
        fdt_path(gm, "_0")


def test_fdt_on_every_path_of_mobilenet_v2_035():
    model, inputs = zoo.get("mobilenet_v2_035_144", batch=1)
    gm = propagate_shapes(fx.symbolic_trace(model), inputs)
    paths, used = [], set()
    for node in gm.graph.nodes:
        try:
            path = fdt_path(gm, node.name)
        except UnsupportedOpError:
            continue
        if used.isdisjoint(path.nodes):  # a tail cannot also head the next path
            paths.append(path)
            used.update(path.nodes)
    assert len(paths) >= 16  # one per inverted-residual block
    tiled = gm
    for path in paths:
        tiled = apply_fdt(tiled, path, 4)
    assert equivalent(*compare(model, tiled, inputs))
    assert count_macs(tiled, inputs) == count_macs(model, inputs)


@pytest.mark.parametrize("parts", [2, 4, 8])
def test_fdt_partial_sums_multiply_into_the_accumulator(parts):
    """1x1-conv tail: partitions 1.. multiply straight into partition 0's output, so the planned
    peak is input + one partition of the wide buffer + output, with no partial-sum buffer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 96, 1), nn.ReLU(), nn.Conv2d(96, 8, 1)).eval()
    x = torch.randn(1, 8, 16, 16)
    tiled = check_split(model, x, "_0", parts)
    pixel = 16 * 16 * 4
    assert planned_peak(tiled, [x]).arena_bytes == (8 + 96 // parts + 8) * pixel
    modules = [module_of(tiled, n) for n in tiled.graph.nodes]
    assert sum(isinstance(m, PartialSum) for m in modules) == parts - 1
    assert not any(isinstance(m, Accumulate) for m in modules)

"""Convolution + ReLU fused into one oneDNN call (`memtile.runtime.fusion`), and its fallbacks."""

import dataclasses

import torch
from torch import nn

from memtile import zoo
from memtile.measure import measure
from memtile.runtime import PlannedModule, convolution, fusion
from memtile.runtime.outvariants import relative_error

CONV_TOLERANCE = 1e-5  # the planned convolution's, as in test_runtime
SMALL = (3, 64, 64)
FUSED_LABEL = "aten.convolution.default + aten.relu.default"


def conv_relu_pairs(graph) -> list[str]:
    """Convolutions whose output only a ReLU reads, found from the graph alone."""
    return [op.node.name for op in graph.ops if op.target == "aten.convolution.default"
            and [str(u.target) for u in op.node.users] == ["aten.relu.default"]]


def eager(model, inputs):
    with torch.no_grad():
        return model(*inputs)


def test_vgg11_runs_each_conv_relu_pair_as_one_step():
    """vgg11: every convolution's only reader is a ReLU. Fused, the program has one step fewer
    per pair, each fused ReLU writes its convolution's arena slot, outputs equal the unfused
    module's bit for bit (and eager's within the convolution tolerance), and a call allocates
    no more (count and bytes) than unfused."""
    model, inputs = zoo.get("vgg11", input_shape=SMALL)
    fused = PlannedModule(model, inputs)
    apart = PlannedModule(model, inputs, fuse_relu=False)
    pairs = conv_relu_pairs(fused.main.graph)
    assert len(pairs) == 8 and sorted(fused.main.fused) == sorted(pairs)
    assert apart.main.fused == {} and fused.main.unfused == {}
    assert len(apart.main.program.steps) - len(fused.main.program.steps) == len(pairs)
    assert [s.label for s in fused.main.program.steps].count(FUSED_LABEL) == len(pairs)
    program = fused.main
    for conv, pair in program.fused.items():
        assert pair.relu.args[0].name == conv
        conv_out, relu_out = (program.graph.value_of[n] for n in (pair.relu.args[0], pair.relu))
        assert program.shared[relu_out] == conv_out  # one slot for the pair
        assert pair.variant.overload is convolution.INTO_RELU
    expected = eager(model, inputs)
    got = fused(*inputs)
    assert torch.equal(got, apart(*inputs))
    assert relative_error(expected, got) <= CONV_TOLERANCE
    with_fusion, without = measure(fused, *inputs), measure(apart, *inputs)
    assert len(with_fusion.allocations) <= len(without.allocations)
    assert sum(a.size for a in with_fusion.allocations) <= sum(a.size for a in without.allocations)
    assert fused.arena_bytes <= apart.arena_bytes


def test_relu_is_not_fused_where_the_convolution_has_another_reader():
    """relu(conv(x)) + conv(x) needs the value before the ReLU: the two run as separate steps.
    The second ReLU is read by flatten (a view), so it stays NCHW and is not fused either."""

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            # 3 -> 32 channels: oneDNN's reorder of the NCHW model input stays below the first
            # convolution's output at 1 and 2 threads (3 -> 8 allocated its output at 2 threads)
            self.a, self.b = nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 32, 3, padding=1)

        def forward(self, x):
            y = self.a(x)
            return torch.relu(self.b(torch.relu(y) + y)).flatten(1)

    torch.manual_seed(0)
    model, inputs = Residual().eval(), (torch.randn(2, 3, 16, 16),)
    module = PlannedModule(model, inputs)
    assert len(conv_relu_pairs(module.main.graph)) == 1  # the second: its ReLU is NCHW
    assert module.main.fused == {}
    assert len([n for n in module.main.planned if n.startswith("convolution")]) == 2
    assert relative_error(eager(model, inputs), module(*inputs)) <= CONV_TOLERANCE


def test_a_fused_call_that_differs_falls_back_to_two_steps(monkeypatch):
    """A fused variant that is not bit-identical to convolution then ReLU (here: the post-op
    left out, so negative values survive) is refused by the check at construction; the pairs
    then run as separate steps and outputs stay right."""
    model, inputs = zoo.get("vgg11", input_shape=SMALL)
    real = fusion.fused
    monkeypatch.setattr(fusion, "fused", lambda variant: dataclasses.replace(
        real(variant), overload=convolution.ConvolutionInto()))
    module = PlannedModule(model, inputs)
    pairs = conv_relu_pairs(module.main.graph)
    assert module.main.fused == {} and sorted(module.main.unfused) == sorted(pairs)
    assert all("differs from the functional op" in why for why in module.main.unfused.values())
    apart = PlannedModule(model, inputs, fuse_relu=False)
    assert len(module.main.program.steps) == len(apart.main.program.steps)
    assert torch.equal(module(*inputs), apart(*inputs))

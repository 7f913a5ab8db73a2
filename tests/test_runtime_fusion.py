"""Convolution + batch norm + ReLU fused into one oneDNN call (`memtile.runtime.fusion`), and its
fallbacks."""

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
    apart = PlannedModule(model, inputs, fuse=False)
    pairs = conv_relu_pairs(fused.main.graph)
    assert len(pairs) == 8 and sorted(fused.main.fused) == sorted(pairs)
    assert apart.main.fused == {} and fused.main.unfused == {}
    assert len(apart.main.program.steps) - len(fused.main.program.steps) == len(pairs)
    assert [s.label for s in fused.main.program.steps].count(FUSED_LABEL) == len(pairs)
    program = fused.main
    for conv, pair in program.fused.items():
        assert pair.chain.batch_norm is None and pair.chain.activation.args[0].name == conv
        conv_out, relu_out = (program.graph.value_of[n] for n in (pair.chain.convolution,
                                                                   pair.chain.activation))
        assert program.shared[relu_out] == conv_out  # one slot for the pair
        assert pair.variant.overload.unary == "relu"
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
    monkeypatch.setattr(fusion, "fused", lambda chain, variant, constants: dataclasses.replace(
        real(chain, variant, constants), overload=convolution.ConvolutionInto()))
    module = PlannedModule(model, inputs)
    pairs = conv_relu_pairs(module.main.graph)
    assert module.main.fused == {} and sorted(module.main.unfused) == sorted(pairs)
    assert all("differs from the functional op" in why for why in module.main.unfused.values())
    apart = PlannedModule(model, inputs, fuse=False)
    assert len(module.main.program.steps) == len(apart.main.program.steps)
    assert torch.equal(module(*inputs), apart(*inputs))


def conv_bn_pairs(graph) -> list[str]:
    """Convolutions whose output only an eval-mode batch norm reads, found from the graph alone."""
    return [op.node.name for op in graph.ops if op.target == "aten.convolution.default"
            and [str(u.target) for u in op.node.users] == [fusion.BATCH_NORM]]


def with_random_batch_norm(model: nn.Module) -> nn.Module:
    """Non-trivial statistics and affine parameters, so a fold that ignores any is visible."""
    torch.manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.normal_(1.0, 0.3)
            module.bias.data.normal_(0.0, 0.3)
    return model


def test_batch_norm_add_and_relu_fuse_into_the_convolution():
    """resnet18: every convolution's batch norm is folded into its weight and bias, every
    residual add is the convolution accumulating into its identity's slot, and every ReLU
    becomes a post-op: one step per chain, one slot (the identity's where there is one), outputs
    within the convolution tolerance of eager; the folded packed weights replace the
    convolutions' own (held bytes grow by the folded biases only), and a call allocates no more
    than unfused."""
    model, inputs = zoo.get("resnet18", input_shape=SMALL)
    model = with_random_batch_norm(model)
    fused = PlannedModule(model, inputs)
    apart = PlannedModule(model, inputs, fuse=False)
    program, graph = fused.main, fused.main.graph
    pairs = conv_bn_pairs(graph)
    assert len(pairs) == 20 and sorted(program.fused) == sorted(pairs) and program.unfused == {}
    absorbed = [n for c in program.fused.values() for n in c.chain.absorbed]
    for target, count in ((fusion.ADD, 8), (fusion.RELU, 17)):  # all of them
        in_graph = [op.node for op in graph.ops if op.target == target]
        assert len(in_graph) == count and set(in_graph) <= set(absorbed)
    assert len(apart.main.program.steps) - len(program.program.steps) == len(absorbed)
    for pair in program.fused.values():
        chain = pair.chain
        slot = graph.value_of[chain.identity if chain.add else chain.convolution]
        assert slot in program.arena_storages
        for node in (chain.convolution, *chain.absorbed) if chain.add else chain.absorbed:
            name = graph.value_of[node]
            assert program.shared[name[0] if isinstance(name, tuple) else name] == slot
    expected = eager(model, inputs)
    got = fused(*inputs)
    assert relative_error(expected, got) <= CONV_TOLERANCE
    assert relative_error(apart(*inputs), got) <= CONV_TOLERANCE
    folded_biases = sum(c.chain.convolution.meta["val"].shape[1] * 4 for c in program.fused.values())
    assert fused.packed_bytes - apart.packed_bytes == folded_biases
    with_fusion, without = measure(fused, *inputs), measure(apart, *inputs)
    assert len(with_fusion.allocations) <= len(without.allocations)
    assert sum(a.size for a in with_fusion.allocations) <= sum(a.size for a in without.allocations)


def test_an_add_is_fused_only_where_its_identity_may_be_overwritten():
    """The convolution may accumulate into the identity only if nothing reads the identity after
    the convolution runs: not the convolution itself (bn(conv(c)) + c) and not a later op (d read
    again after the add). Of three residual adds only the first qualifies; outputs stay right."""

    class Blocks(nn.Module):
        def __init__(self):
            super().__init__()
            conv = [nn.Conv2d(3 if i == 0 else 32, 32, 3, padding=1) for i in range(6)]
            self.conv = nn.ModuleList(conv)
            self.bn = nn.ModuleList(nn.BatchNorm2d(32) for _ in range(6))

        def forward(self, x):
            conv, bn = self.conv, self.bn
            a = torch.relu(conv[0](x))
            c = torch.relu(bn[2](conv[2](torch.relu(conv[1](a)))) + a)  # fused: a read before
            d = bn[3](conv[3](c)) + c  # c is conv[3]'s own input
            e = bn[5](conv[5](torch.relu(conv[4](d)))) + d
            return e + d  # d read again after the add

    model, inputs = with_random_batch_norm(Blocks()).eval(), (torch.randn(2, 3, 16, 16),)
    module = PlannedModule(model, inputs)
    adds = [c.chain for c in module.main.fused.values() if c.chain.add is not None]
    assert len(adds) == 1 and adds[0].convolution.args[1].name == "p_conv_2_weight"
    assert relative_error(eager(model, inputs), module(*inputs)) <= CONV_TOLERANCE


def test_batch_norm_is_folded_only_with_packed_weights():
    """pack_weights=False holds no weight copies, so no batch norm is folded (a ReLU still may
    be, where it directly follows a convolution: none in resnet18)."""
    model, inputs = zoo.get("resnet18", input_shape=SMALL)
    module = PlannedModule(with_random_batch_norm(model), inputs, pack_weights=False)
    assert all(c.chain.batch_norm is None for c in module.main.fused.values())
    assert relative_error(eager(model, inputs), module(*inputs)) <= CONV_TOLERANCE


def test_a_wrong_fold_is_refused_at_construction(monkeypatch):
    """A fold that leaves the batch norm out (the convolution's own weight and bias) differs from
    convolution then batch norm: the check refuses every chain and the ops run apart, right."""
    model, inputs = zoo.get("resnet18", input_shape=SMALL)
    model = with_random_batch_norm(model)

    def unfolded(chain, constants):
        conv = chain.convolution
        bias = torch.zeros(conv.meta["val"].shape[1])
        return constants[conv.args[1].name], bias

    monkeypatch.setattr(fusion, "folded", unfolded)
    module = PlannedModule(model, inputs)
    assert module.main.fused == {}
    assert sorted(module.main.unfused) == sorted(conv_bn_pairs(module.main.graph))
    assert all("differs from the functional op" in why for why in module.main.unfused.values())
    assert relative_error(eager(model, inputs), module(*inputs)) <= CONV_TOLERANCE


def test_relu6_fuses_as_hardtanh_where_the_convolution_writes_its_slot(monkeypatch):
    """mobilenet_v2: all 35 ReLU6s (`hardtanh(x, 0, 6)`, none after an add) become oneDNN's
    hardtanh post-op; outputs within the convolution tolerance of eager and of the unfused
    module. Without the slot allocator the convolution accumulates into its destination, and
    oneDNN takes no activation but ReLU after that add: the ReLU6s stay steps of their own."""
    from memtile.runtime import slots

    model, inputs = zoo.get("mobilenet_v2", input_shape=SMALL)
    model = with_random_batch_norm(model)
    fused = PlannedModule(model, inputs)
    assert fused.main.fused_counts() == {"batch_norm": 52, "add": 10, "relu": 0, "relu6": 35}
    relu6 = [op.node for op in fused.main.graph.ops if op.target == fusion.HARDTANH]
    absorbed = {n for c in fused.main.fused.values() for n in c.chain.absorbed}
    assert len(relu6) == 35 and set(relu6) <= absorbed
    expected = eager(model, inputs)
    assert relative_error(expected, fused(*inputs)) <= CONV_TOLERANCE
    with monkeypatch.context() as patched:
        patched.setattr(slots, "load", lambda: "not installed (test)")
        accumulating = PlannedModule(model, inputs)
    assert accumulating.main.fused_counts()["relu6"] == 0
    assert len(accumulating.main.program.steps) - len(fused.main.program.steps) == 35
    assert relative_error(expected, accumulating(*inputs)) <= CONV_TOLERANCE

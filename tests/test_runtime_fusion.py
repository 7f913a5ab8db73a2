"""Convolution + batch norm + residual add (+ SiLU or hardswish) fused into one oneDNN call
(`memtile.runtime.fusion`), its fallbacks, and ReLU/ReLU6 kept apart."""


import torch
from torch import nn

from memtile import zoo
from memtile.measure import measure
from memtile.planner import prepare
from memtile.runtime import PlannedModule, fusion
from memtile.runtime.outvariants import relative_error

CONV_TOLERANCE = 1e-5  # the planned convolution's, as in test_runtime
SMALL = (3, 64, 64)


def eager(model, inputs):
    with torch.no_grad():
        return model(*inputs)


class ConvActivations(nn.Module):
    """conv -> ReLU, conv -> batch norm -> ReLU6 and conv -> batch norm -> add (of the first
    ReLU) -> ReLU: each activation directly after what the convolution's call computes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.ModuleList(nn.Conv2d(3 if i == 0 else 16, 16, 3, padding=1)
                                  for i in range(3))
        self.bn = nn.ModuleList(nn.BatchNorm2d(16) for _ in range(2))

    def forward(self, x):
        a = torch.relu(self.conv[0](x))
        b = nn.functional.relu6(self.bn[0](self.conv[1](a)))
        return torch.relu(self.bn[1](self.conv[2](b)) + a)


def test_activations_run_apart_so_nan_and_inf_propagate():
    """oneDNN's relu and hardtanh post-ops turn NaN into 0 (or 6): no activation is fused into a
    convolution's call; each runs as a step of its own, in place in its input's slot, and the
    non-finite outputs are eager's, position for position."""
    torch.manual_seed(0)
    model = with_random_batch_norm(ConvActivations()).eval()
    x = torch.randn(1, 3, 16, 16)
    module = PlannedModule(model, (x,))
    program, graph = module.main, module.main.graph
    assert module.main.fused_counts() == {"batch_norm": 2, "add": 1, "activation": 0}
    absorbed = {n for c in program.fused.values() for n in c.chain.absorbed}
    activations = [op for op in graph.ops if op.target in ("aten.relu.default",
                                                           "aten.hardtanh.default")]
    assert len(activations) == 3 and not absorbed & {op.node for op in activations}
    for op in activations[:2]:  # the last is the output, returned fresh
        assert program.shared[op.outputs[0]] == graph.value_of[op.node.args[0]]
    x[0, 0, 3, 3], x[0, 1, 9, 2], x[0, 2, 12, 12] = float("nan"), float("inf"), -float("inf")
    expected, got = eager(model, (x,)), module(x)
    assert expected.isnan().any() and torch.equal(expected.isnan(), got.isnan())
    assert torch.equal(expected.isinf(), got.isinf())
    finite = expected.isfinite()
    assert relative_error(expected[finite], got[finite]) <= CONV_TOLERANCE


class ConvSwishes(nn.Module):
    """conv -> batch norm -> SiLU, conv -> SiLU and conv -> batch norm -> add (of the first
    SiLU) -> SiLU, then a last convolution: SiLU's oneDNN post-op keeps NaN and Inf as eager;
    oneDNN takes none after its add post-op, so the SiLU after the add runs apart."""

    def __init__(self):
        super().__init__()
        self.conv = nn.ModuleList(nn.Conv2d(3 if i == 0 else 16, 16, 3, padding=1)
                                  for i in range(4))
        self.bn = nn.ModuleList(nn.BatchNorm2d(16) for _ in range(2))

    def forward(self, x):
        a = nn.functional.silu(self.bn[0](self.conv[0](x)))
        b = nn.functional.silu(self.conv[1](a))
        return self.conv[3](nn.functional.silu(self.bn[1](self.conv[2](b)) + a))


def test_silu_fuses_and_keeps_nan_and_inf():
    """SiLU (core ATen's x * sigmoid(x)) becomes the convolution call's swish post-op: three
    chains, two of them with the SiLU (the SiLU after the add stays a sigmoid and a mul), eager's values within the convolution tolerance, and NaN, +Inf and -Inf
    (SiLU(-inf) is NaN) where eager puts them."""
    torch.manual_seed(0)
    model = with_random_batch_norm(ConvSwishes()).eval()
    x = torch.randn(1, 3, 16, 16)
    module = PlannedModule(model, (x,))
    assert module.main.fused_counts() == {"batch_norm": 2, "add": 1, "activation": 2}
    steps = [step.label for step in module.main.program.steps]
    assert sum(s.endswith(" + aten.sigmoid.default + aten.mul.Tensor") for s in steps) == 2
    assert steps.count("aten.sigmoid.default") == steps.count("aten.mul.Tensor") == 1
    assert relative_error(eager(model, (x,)), module(x)) <= CONV_TOLERANCE
    for position, value in ((0, float("nan")), (40, float("inf")), (300, -float("inf"))):
        y = x.clone()
        y.view(-1)[position] = value
        expected, got = eager(model, (y,)), module(y)
        assert not expected.isfinite().all()
        assert torch.equal(expected.isnan(), got.isnan())
        assert torch.equal(expected == float("inf"), got == float("inf"))
        assert torch.equal(expected == -float("inf"), got == -float("inf"))
        finite = expected.isfinite()
        assert relative_error(expected[finite], got[finite]) <= CONV_TOLERANCE


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


def test_batch_norm_and_add_fuse_into_the_convolution():
    """resnet18: every convolution's batch norm is folded into its weight and bias, and every
    residual add is the convolution accumulating into its identity's slot: one step per chain, one slot (the identity's where there is one), outputs
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
    adds = [op.node for op in graph.ops if op.target == fusion.ADD]
    assert len(adds) == 8 and set(adds) <= set(absorbed)  # all of them
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
    """pack_weights=False holds no weight copies, so no batch norm is folded (an add still may
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


def test_the_arena_problem_is_planner_prepare_narrowed_by_the_executor():
    """The executor plans in `memtile plan`'s op order, and its Problem is `planner.prepare`'s
    given its in-place pair filter (both tensors in the arena, of one layout), its fused chains'
    slots and its arena storages."""
    model, inputs = zoo.get("resnet18", input_shape=SMALL)
    program = PlannedModule(model, inputs).main
    graph = program.graph
    unfiltered = prepare(graph)
    assert program.order == unfiltered.order
    slots = fusion.slots(graph, program.fused_chains(), program.arena_storages)
    assert len(slots) > len(program.fused)  # every chain absorbs its batch norm at least
    kept = {out: source for out, source in unfiltered.shared.items()
            if out in program.arena_storages and source in program.arena_storages
            and (out in program.channels_last) == (source in program.channels_last)}
    assert program.shared == {**kept, **slots}
    again = prepare(graph, order=program.order, keep_pair=program.keeps_pair,
                    extra_shared=slots, storages=program.arena_storages)
    assert again.problem == program.problem
    assert {b.id for b in program.problem.buffers} <= program.arena_storages

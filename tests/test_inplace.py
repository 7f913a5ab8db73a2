import pytest
import torch
from torch import nn

from memtile import zoo
from memtile.capture import ACTIVATION, capture
from memtile.inplace import inplace_input, inplace_pairs
from memtile.lifetimes import load
from memtile.planner import prepare
from memtile.planning import lower_bound, solve, verify
from memtile.schedule import schedule

ORT_RESNET18 = 5.97 * 2**20  # ONNX Runtime's memory pattern for resnet18 at 1x3x224x224


@pytest.fixture(scope="module")
def resnet18():
    return capture(*zoo.get("resnet18"))


def test_inplace_plans_verify_and_beat_onnx_runtime_on_resnet18(resnet18):
    pairs = inplace_pairs(resnet18)
    plain = prepare(resnet18, reorder=False, inplace=False).problem
    shared = prepare(resnet18, reorder=False).problem
    plan = solve(shared, "best")
    verify(shared, plan)
    assert len(shared.buffers) == len(plain.buffers) - len(pairs)
    assert lower_bound(shared) < lower_bound(plain)
    # conv1 output (3.06 MiB) no longer coexists with bn1's: the peak moves to the max-pool
    # (relu output 3.06 MiB + pooled 0.77 MiB + int64 indices 1.53 MiB).
    assert load(resnet18, shared=pairs) == 64 * 112 * 112 * 4 + 64 * 56 * 56 * (4 + 8)
    assert plan.arena_bytes == lower_bound(shared) < ORT_RESNET18


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "googlenet"])
def test_no_pair_overwrites_an_input_read_later(name, resnet18):
    graph = resnet18 if name == "resnet18" else capture(*zoo.get(name))
    order = schedule(graph, inplace=True).order
    position = {op: step for step, op in enumerate(order)}
    made_by = {o: op.index for op in graph.ops for o in op.outputs}
    users = graph.storage_users()
    pairs = inplace_pairs(graph, order)
    assert pairs
    for out, overwritten in pairs.items():
        op = graph.ops[made_by[out]]
        a, b = graph.tensors[out], graph.tensors[overwritten]
        assert (b.category, b.is_view, a.is_view) == (ACTIVATION, False, False)
        assert (a.dtype, a.nbytes) == (b.dtype, b.nbytes)
        readers = {c for user in users[overwritten] for c in graph.tensors[user].consumers}
        assert max(position[c] for c in readers) == position[op.index]


def test_inplace_input_names_the_overwritten_argument(resnet18):
    pairs = inplace_pairs(resnet18)
    marked = [op for op in resnet18.ops if inplace_input(op, pairs) is not None]
    assert len(marked) == len(pairs)
    for op in marked:
        k = inplace_input(op, pairs)
        assert op.inputs[k] == pairs[op.outputs[0]]
        assert resnet18.value_of[op.node.args[k]] == op.inputs[k]


class Reuse(nn.Module):
    """relu(a) cannot overwrite a (the add reads a later); the add may overwrite either input."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        a = self.conv(x)
        return torch.relu(a) + a, torch.relu(x)


def test_inputs_read_later_graph_inputs_and_outputs_are_never_overwritten():
    graph = capture(Reuse().eval(), (torch.ones(1, 3, 4, 4),))
    assert [op.target for op in graph.ops] == [
        "aten.convolution.default", "aten.relu.default", "aten.add.Tensor", "aten.relu.default"
    ]
    assert inplace_pairs(graph) == {"add": "relu"}  # relu_1 reads the graph input x: kept
    assert load(graph, shared={"add": "relu"}) == load(graph) - 4 * 16 * 4

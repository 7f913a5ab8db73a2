import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from memtile import lifetimes, zoo
from memtile.capture import OUTPUT, capture, reusing_exports, trace_functional
from memtile.errors import ExportError


class _StorageLifetimes(TorchDispatchMode):
    """Independent LOAD: follow tensor storages through the eager ATen calls of a real run."""

    def __init__(self, skip: set[int]):
        super().__init__()
        self.skip, self.step, self.first, self.last, self.size = skip, 0, {}, {}, {}
        self.keep = []  # holding every output stops the allocator from reusing addresses

    def _storages(self, values):
        for value in tree_flatten(values)[0]:
            if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() not in self.skip:
                yield value.untyped_storage()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for storage in self._storages((args, kwargs)):
            self.first.setdefault(storage.data_ptr(), 0)
            self.size[storage.data_ptr()] = storage.nbytes()
            self.last[storage.data_ptr()] = self.step
        out = func(*args, **(kwargs or {}))
        for storage in self._storages(out):
            self.first.setdefault(storage.data_ptr(), self.step)
            self.size[storage.data_ptr()] = storage.nbytes()
            self.last[storage.data_ptr()] = max(self.last.get(storage.data_ptr(), 0), self.step)
        self.keep.append(out)
        self.step += 1
        return out

    def load(self, outputs) -> int:
        for storage in self._storages(outputs):
            self.last[storage.data_ptr()] = self.step
        live = [0] * (self.step + 1)
        for ptr, first in self.first.items():
            for step in range(first, self.last[ptr] + 1):
                live[step] += self.size[ptr]
        return max(live)


def test_resnet18_load_matches_an_independent_count():
    model, inputs = zoo.get("resnet18")
    graph = capture(model, inputs)
    params = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    with torch.no_grad(), _StorageLifetimes(params) as counter:
        output = model(*inputs)
    independent = counter.load(output)
    assert independent == pytest.approx(lifetimes.load(graph), rel=0.01)
    assert lifetimes.load(graph) == 2 * 64 * 112 * 112 * 4  # conv1 output + bn1 output


def test_tensors_know_producer_consumers_and_module():
    model, inputs = zoo.get("resnet18")
    graph = capture(model, inputs)
    convs = [op for op in graph.ops if op.target == "aten.convolution.default"]
    assert len(convs) == 20
    assert convs[1].module_path == "layer1.0.conv1"
    first = graph.tensors[convs[0].outputs[0]]
    assert first.shape == (1, 64, 112, 112) and first.nbytes == 64 * 112 * 112 * 4
    assert first.producer == convs[0].index and first.consumers == [convs[0].index + 1]
    categories = {t.category for t in graph.tensors.values()}
    assert categories == {"input", "parameter", "activation", "output"}
    assert graph.macs() == pytest.approx(1.814e9, rel=0.01)


def test_views_are_not_buffers_and_extend_their_base():
    model, inputs = zoo.get("tests_models:conv_flatten_linear", input_shape=(3, 8, 8))
    graph = capture(model, inputs)
    view = next(t for t in graph.tensors.values() if t.is_view and t.category != "parameter")
    buffers = {b.id: b for b in lifetimes.buffers(graph)}
    assert view.name not in buffers and view.base in buffers
    linear = next(op for op in graph.ops if op.target == "aten.addmm.default")
    assert buffers[view.base].end == linear.index + 1
    assert {b.id for b in lifetimes.buffers(graph)} == {
        t.name for t in graph.tensors.values()
        if not t.is_view and t.category != "parameter" and t.nbytes > 0
    }
    output = next(b for b in lifetimes.buffers(graph) if graph.tensors[b.id].category == OUTPUT)
    assert output.end == graph.num_steps


def test_execution_order_changes_lifetimes():
    model, inputs = zoo.get("resnet8_cifar")
    graph = capture(model, inputs)
    order = list(range(graph.num_steps))
    assert lifetimes.load(graph, order) == lifetimes.load(graph)
    with pytest.raises(ValueError, match="permutation"):
        lifetimes.load(graph, order[:-1])


def test_reusing_exports_traces_a_model_once_and_hands_out_independent_copies(monkeypatch):
    """`memtile report` captures one model in four sections: inside the scope it is exported
    once per input shape; each caller may edit its graph (the executor does) alone."""
    calls = []
    real = torch.export.export
    monkeypatch.setattr(torch.export, "export", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()).eval()
    x = torch.randn(1, 3, 16, 16)
    with reusing_exports():
        first, second = capture(model, (x,)), capture(model, (x,))
        capture(model, (torch.randn(2, 3, 16, 16),))
    capture(model, (x,))
    assert len(calls) == 3  # once per shape inside, then again outside
    assert first.program.graph_module is not second.program.graph_module
    assert first.program.state_dict["0.weight"] is model[0].weight
    assert second.program.state_dict["0.weight"] is model[0].weight
    relu = next(n for n in first.program.graph.nodes if n.op == "call_function" and "relu" in str(n.target))
    relu.target = torch.ops.aten.sigmoid.default
    assert any("relu" in str(n.target) for n in second.program.graph.nodes)
    torch.testing.assert_close(second.program.module()(x), model(x))


def test_traces_record_no_stack_traces_and_leave_the_setting_as_it_was():
    """Stack traces cost about a tenth of every trace and memtile never reads them; the
    user's own fx setting is left as it was."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()).eval()
    x = torch.randn(1, 3, 16, 16)
    ops = [n for n in capture(model, (x,)).program.graph.nodes if n.op == "call_function"]
    assert ops and not any(n.meta.get("stack_trace") for n in ops)
    assert torch.fx.config.do_not_emit_stack_traces is False
    plain = torch.export.export(model, (x,))  # the user's export keeps them
    assert any(n.meta.get("stack_trace") for n in plain.graph.nodes if n.op == "call_function")


def test_export_failure_names_the_construct():
    model, inputs = zoo.get("tests_models:data_dependent")
    with pytest.raises(ExportError, match="torch.export cannot trace"):
        capture(model, inputs)


def test_capture_does_not_import_planning():
    """Capture depends on torch alone: buffers and Problems are built by their consumers
    (`lifetimes`, `planner`)."""
    code = ("import sys, memtile.capture; "
            "print(sorted(m for m in sys.modules if m.startswith('memtile.')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "['memtile.capture', 'memtile.errors']"


def test_functional_trace_returns_what_the_model_writes_in_place_first():
    """`trace_functional` (one make_fx pass) gives an input that the model writes in place as
    AOT export did: its new value is an output ahead of the model's, and no copy_ is left."""
    class WritesItsInput(torch.nn.Module):
        def forward(self, x):
            x.relu_()
            return (x * 2,)

    traced = trace_functional(WritesItsInput(), [torch.randn(2, 3)])
    assert traced.mutated == traced.user_inputs and not traced.constants
    (returned,) = [n.args[0] for n in traced.graph.nodes if n.op == "output"]
    assert [n.target for n in returned] == [torch.ops.aten.relu.default, torch.ops.aten.mul.Tensor]
    assert torch.ops.aten.copy_.default not in {n.target for n in traced.graph.nodes}

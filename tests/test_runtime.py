"""PlannedModule: same outputs as eager, no allocations by planned ops, threads, shapes, errors."""

import threading

import pytest
import torch
from torch import nn

from memtile import zoo
from memtile.errors import BudgetError, ExportError, InputShapeError
from memtile.measure import measure
from memtile.runtime import PlannedModule, executor
from memtile.runtime.codegen import compile_program, interpret
from memtile.runtime.outvariants import find_out_variant

SMALL = (3, 64, 64)  # big torchvision models at 64x64: every op runs, in a fraction of the time
MODELS = [("resnet18", SMALL), ("mobilenet_v2", SMALL), ("googlenet", SMALL),
          ("densenet121", SMALL), ("ds_cnn_kws", None), ("resnet8_cifar", None)]


def mlp():
    """Every op has a direct out= kernel: addmm, relu (as clamp_min), and views."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, 10)).eval(), (torch.randn(8, 64),)


def eager(model, inputs):
    with torch.no_grad():
        return model(*inputs)


@pytest.mark.parametrize("name,shape", MODELS)
def test_planned_outputs_equal_eager_bit_exact(name, shape):
    """Every planned op runs the same kernel as eager (out= overloads checked bit-identical at
    construction; relu as clamp_min), unplanned ops run eagerly: the outputs are bit-exact."""
    model, inputs = zoo.get(name, input_shape=shape)
    module = PlannedModule(model, inputs)
    assert module.main.planned, "some ops must run from the arena"
    assert 0 < module.arena_bytes <= module.main.graph.load(module.main.order) + 64 * len(
        module.main.problem.buffers)
    for _ in range(2):  # the second call reuses the arena
        assert torch.equal(module(*inputs), eager(model, inputs))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "googlenet", "densenet121"])
def test_planned_outputs_equal_eager_224(name):
    model, inputs = zoo.get(name)
    assert torch.equal(PlannedModule(model, inputs)(*inputs), eager(model, inputs))


def test_fully_planned_tiny_model_allocates_output_and_scratch_only():
    """autoencoder_ad (MLPerf Tiny) plans every op; a call allocates its output and the batch
    norms' scratch, nothing else."""
    model, inputs = zoo.get("autoencoder_ad", batch=4)
    module = PlannedModule(model, inputs)
    assert module.unplanned_ops == []
    module(*inputs)
    measurement = measure(module, *inputs)
    scratch = sum(module.main.kernel_bytes.values())
    assert sum(a.size for a in measurement.allocations) == 4 * 640 * 4 + scratch
    assert measurement.peak_bytes <= 4 * 640 * 4 + max(module.main.kernel_bytes.values())
    assert torch.equal(measurement.result, eager(model, inputs))


def test_fully_planned_call_peak_is_the_arena():
    """An MLP plans every op: the first call's measured peak (arena allocation included) is at
    most the arena + 10% plus the returned output; later calls allocate only the output."""
    model, inputs = mlp()
    module = PlannedModule(model, inputs)
    assert module.unplanned_ops == []
    output_bytes = 8 * 10 * 4
    first = measure(module, *inputs)
    assert first.peak_bytes <= 1.1 * module.arena_bytes + output_bytes
    assert first.peak_bytes >= module.arena_bytes
    second = measure(module, *inputs)
    assert [a.size for a in second.allocations] == [output_bytes]
    assert torch.equal(second.result, eager(model, inputs))


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_only_unplanned_ops_outputs_and_scratch_allocate(name):
    """Allocator events during a planned call: unplanned ops (convolution), the fresh output,
    and the small scratch of planned kernels measured at construction (batch norm's per-channel
    scale and shift), each freed within its op: the most planned ops add to the arena is under 10%."""
    model, inputs = zoo.get(name, input_shape=SMALL)
    module = PlannedModule(model, inputs)
    module(*inputs)  # allocate this thread's arena
    program = module.main
    unplanned = {op.node.target._schema.name for op in program.graph.ops
                 if op.node.name in program.unplanned}
    assert unplanned == {"aten::convolution"}
    measurement = measure(module, *inputs)
    fresh = [a.size for a in measurement.allocations if a.op == "aten::empty_strided"]
    assert fresh == [1000 * 4]  # the logits, written straight into a new tensor
    scratch = sum(a.size for a in measurement.allocations
                  if a.op not in unplanned and a.op != "aten::empty_strided")
    assert scratch == sum(program.kernel_bytes[name] for name in program.planned)
    assert max(program.kernel_bytes[name] for name in program.planned) < 0.1 * module.arena_bytes


def test_copy_outputs_false_returns_arena_views():
    model, inputs = mlp()
    module = PlannedModule(model, inputs, copy_outputs=False)
    first = module(*inputs)
    expected = eager(model, inputs)
    assert torch.equal(first, expected)
    arena = module._local.arenas[id(module.main)][0]
    assert first.untyped_storage().data_ptr() == arena.untyped_storage().data_ptr()
    other = torch.randn_like(inputs[0])
    second = module(other)
    assert torch.equal(first, second)  # the same memory, overwritten by the next call
    assert torch.equal(second, eager(model, (other,)))


def test_four_threads_each_get_their_own_arena():
    model, inputs = zoo.get("resnet8_cifar")
    module = PlannedModule(model, inputs)
    batches = [torch.randn_like(inputs[0]) for _ in range(4)]
    expected = [eager(model, (b,)) for b in batches]
    results: dict[int, list] = {i: [] for i in range(4)}
    start = threading.Barrier(4)

    def work(i):
        start.wait()
        for _ in range(5):
            results[i].append(module(batches[i]))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i in range(4):
        assert len(results[i]) == 5
        assert all(torch.equal(r, expected[i]) for r in results[i])


def test_new_shape_raises_by_default():
    model, inputs = zoo.get("resnet8_cifar")
    module = PlannedModule(model, inputs)
    with pytest.raises(InputShapeError, match="on_new_shape='replan'"):
        module(torch.randn(2, 3, 32, 32))


def test_new_shape_replans_and_caches():
    model, inputs = zoo.get("resnet8_cifar")
    module = PlannedModule(model, inputs, on_new_shape="replan")
    bigger = torch.randn(4, 3, 32, 32)
    assert torch.equal(module(bigger), eager(model, (bigger,)))
    assert len(module._programs) == 2
    programs = dict(module._programs)
    assert programs[executor._signature((bigger,))].arena_bytes > module.arena_bytes
    assert torch.equal(module(*inputs), eager(model, inputs))
    assert module._programs == programs  # cached, not planned again


def test_wrong_dtype_or_count_is_a_clear_error():
    model, inputs = zoo.get("resnet8_cifar")
    module = PlannedModule(model, inputs, on_new_shape="replan")
    with pytest.raises(InputShapeError, match=r"torch.float64 .* \.to\(torch.float32"):
        module(inputs[0].double())
    with pytest.raises(InputShapeError, match="expected 1 input tensors, got 2"):
        module(inputs[0], inputs[0])


def test_wrong_device_is_a_clear_error():
    model, inputs = zoo.get("resnet8_cifar")
    module = PlannedModule(model, inputs)
    meta = torch.empty(inputs[0].shape, device="meta")
    with pytest.raises(InputShapeError, match="on meta, but the model was planned for"):
        module(meta)


def test_data_dependent_control_flow_is_an_export_error():
    model, inputs = zoo.get("tests_models:data_dependent")
    with pytest.raises(ExportError, match="torch.export cannot trace"):
        PlannedModule(model, inputs)


def test_arena_larger_than_memory_is_a_budget_error(monkeypatch):
    model, inputs = mlp()
    module = PlannedModule(model, inputs)
    monkeypatch.setattr(executor, "available_memory", lambda device: module.arena_bytes - 1)
    with pytest.raises(BudgetError, match="arena needs .* has only"):
        module(*inputs)


def test_failed_arena_allocation_is_a_budget_error():
    with pytest.raises(BudgetError, match="cannot allocate|has only"):
        executor.allocate_arena(1 << 62, torch.device("cpu"))


def test_out_variants_found_from_the_schema():
    aten = torch.ops.aten
    assert find_out_variant(aten.add.Tensor).overload is aten.add.out
    assert find_out_variant(aten.max_pool2d_with_indices.default).out_names == ("out", "indices")
    assert find_out_variant(aten.relu.default).overload is aten.clamp_min.out
    assert find_out_variant(aten.permute.default) is None  # a view
    assert find_out_variant(aten.relu_.default) is None  # in place


def test_copying_out_kernels_are_left_unplanned():
    """convolution.out and batch_norm.out compute a temporary and copy: measured and refused."""
    model, inputs = zoo.get("resnet8_cifar")
    module = PlannedModule(model, inputs)
    reasons = dict(module.unplanned_ops)
    assert "computes into a temporary and copies" in reasons["aten.convolution.default"]
    graph = module.main.graph
    conv = next(op for op in graph.ops if op.target == "aten.convolution.default")
    copied = graph.tensors[conv.outputs[0]].nbytes
    assert module.main.kernel_bytes[conv.node.name] >= copied  # at least the temporary
    assert list(reasons) == ["aten.convolution.default"]  # relu, add, batch norm, addmm planned


def test_generated_code_matches_the_interpreter():
    model, inputs = zoo.get("mobilenet_v2", input_shape=SMALL)
    module = PlannedModule(model, inputs)
    program = module.main
    views = program.allocate_views()
    with torch.no_grad():
        walked = interpret(program.program, inputs, views)
        compiled = compile_program(program.program)(inputs, views)
    assert torch.equal(walked[0], compiled[0])
    assert "def planned_program(inputs, views):" in module.source
    into_arena = [op for op in program.graph.ops
                  if op.node.name in program.planned and op.outputs[0] in program.arena_storages]
    assert module.source.count("out=views[") == len(into_arena) > 0

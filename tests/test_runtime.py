"""PlannedModule: same outputs as eager, no allocations by planned ops, threads, shapes, errors.

Two numerics: `layout="eager"` runs every planned op with eager's kernel on eager's layout, so
outputs are bit-exact. The default layout ("auto") holds 4-D activations in channels_last and
computes convolutions into the arena through oneDNN, which sums in another order: outputs then
match eager within 1e-5 of the output's magnitude (each convolution is checked within 1e-5 at
construction), or, where eager float32 is itself farther than that from float64 arithmetic
(googlenet at 64x64: 1.2e-5), are no farther from float64 than twice eager (`close_to_eager`)."""

import threading

import pytest
import torch
from torch import nn

from memtile import zoo
from memtile.errors import BudgetError, ExportError, InputShapeError, MemtileError
from memtile.lifetimes import load
from memtile.measure import measure
from memtile.numerics import agreement
from memtile.runtime import PlannedModule, convolution, executor
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


def close_to_eager(got, model, inputs) -> bool:
    """Within 1e-5 of eager, or (googlenet: eager float32 is itself 1.2e-5 from float64) rounding
    no worse than eager's own, measured against float64 (memtile.numerics)."""
    return agreement(got, model, inputs).equivalent


def unplanned_convolutions(module) -> list[str]:
    return [why for op, why in module.unplanned_ops if op == "aten.convolution.default"]


@pytest.mark.parametrize("name,shape", MODELS)
def test_eager_layout_outputs_equal_eager_bit_exact(name, shape):
    """layout="eager": every planned op runs the same kernel as eager (out= overloads checked
    bit-identical at construction; relu as clamp_min), unplanned ops (convolutions) run
    eagerly: the outputs are bit-exact."""
    model, inputs = zoo.get(name, input_shape=shape)
    module = PlannedModule(model, inputs, layout="eager")
    assert module.main.planned, "some ops must run from the arena"
    assert module.main.channels_last == set() and module.packed_bytes == 0
    assert 0 < module.arena_bytes <= load(module.main.graph, module.main.order) + 64 * len(
        module.main.problem.buffers)
    for _ in range(2):  # the second call reuses the arena
        assert torch.equal(module(*inputs), eager(model, inputs))


@pytest.mark.parametrize("name,shape", [*MODELS, ("vgg11", SMALL)])
def test_channels_last_plans_convolutions_within_tolerance(name, shape):
    """The default layout computes convolutions into the arena: none is left unplanned (except,
    on some CPUs, ds_cnn_kws's first: a 1-channel input whose oneDNN kernel allocated 7x its
    output on Intel, refused by measurement; on AMD EPYC it allocates nothing and is planned),
    and outputs are close to eager, call after call."""
    model, inputs = zoo.get(name, input_shape=shape)
    module = PlannedModule(model, inputs)
    assert module.main.channels_last
    unplanned = unplanned_convolutions(module)
    assert len(unplanned) <= (1 if name == "ds_cnn_kws" else 0)
    assert all("alloc" in why for why in unplanned), unplanned
    first = module(*inputs)
    assert close_to_eager(first, model, inputs)
    assert torch.equal(module(*inputs), first)  # the arena reused: the same values again


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "googlenet", "densenet121"])
def test_planned_outputs_equal_eager_224(name):
    model, inputs = zoo.get(name)
    assert torch.equal(PlannedModule(model, inputs, layout="eager")(*inputs), eager(model, inputs))
    assert close_to_eager(PlannedModule(model, inputs)(*inputs), model, inputs)


def test_fully_planned_tiny_model_allocates_output_and_scratch_only():
    """autoencoder_ad (MLPerf Tiny) plans every op; a call allocates its output and the batch
    norms' scratch, nothing else. No convolution: "auto" keeps eager's layout (bit-exact)."""
    model, inputs = zoo.get("autoencoder_ad", batch=4)
    module = PlannedModule(model, inputs)
    assert module.unplanned_ops == [] and module.main.channels_last == set()
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
    """layout="eager": allocator events during a planned call are the unplanned ops'
    (convolution), the fresh output, and the small scratch of planned kernels measured at
    construction (batch norm's per-channel scale and shift), each freed within its op: the most
    planned ops add to the arena is under 10%."""
    model, inputs = zoo.get(name, input_shape=SMALL)
    module = PlannedModule(model, inputs, layout="eager")
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


@pytest.mark.parametrize("name", ["resnet18", "vgg11"])
def test_planned_convolutions_allocate_only_scratch_and_peak_is_below_eager(name):
    """Channels_last with packed weights: a planned call allocates the fresh logits, oneDNN's
    fixed workspace (8216 bytes here, at most 16 KiB) per convolution, the first convolution's
    reorder of the NCHW model input (input bytes), batch norm's per-channel scratch, and for
    vgg11 the classifier's adaptive pool (unplanned: its out= kernel copies into an NCHW
    destination) and its restride to NCHW for flatten. That is all (summed exactly), and the
    measured planned peak (arena included) is below the eager peak."""
    model, inputs = zoo.get(name, input_shape=SMALL)
    module = PlannedModule(model, inputs)
    module(*inputs)  # allocate this thread's arena
    program = module.main
    measurement = measure(module, *inputs)
    by_op: dict[str, int] = {}
    for allocation in measurement.allocations:
        by_op[allocation.op] = by_op.get(allocation.op, 0) + allocation.size
    convolutions = [n for n in program.planned if n.startswith("convolution")]
    input_bytes = inputs[0].numel() * 4
    # direct calls (output in its slot) and, for residual adds, in-place calls onto the identity
    in_convolutions = by_op.pop("mkldnn::_convolution_pointwise", 0) \
        + by_op.pop("mkldnn::_convolution_pointwise_", 0)
    assert in_convolutions <= 16 * 1024 * len(convolutions) + input_bytes
    assert in_convolutions + by_op.get("aten::native_batch_norm", 0) \
        + by_op.get("aten::mean", 0) == sum(program.kernel_bytes[n] for n in program.planned)
    by_op.pop("aten::native_batch_norm", None)
    by_op.pop("aten::mean", None)
    logits = 1000 * 4
    pool = 512 * 7 * 7 * 4
    assert by_op == ({"aten::empty_strided": logits} if name == "resnet18" else
                     {"aten::empty_strided": logits + pool, "aten::_adaptive_avg_pool2d": pool})
    assert module.arena_bytes + measurement.peak_bytes <= measure(model, *inputs).peak_bytes


def test_view_reads_keep_eager_layout():
    """vgg11's avgpool output is flattened by a view: it stays NCHW (a view of a channels_last
    buffer is not eager's view), everything before it is channels_last."""
    model, inputs = zoo.get("vgg11", input_shape=SMALL)
    program = PlannedModule(model, inputs).main
    graph = program.graph
    pool = next(op for op in graph.ops if op.target == "aten._adaptive_avg_pool2d.default")
    assert pool.outputs[0] not in program.channels_last
    assert program._strides[pool.outputs[0]] == (512 * 49, 49, 7, 1)
    convs = [op.outputs[0] for op in graph.ops if op.target == "aten.convolution.default"]
    assert len(convs) == 8 and set(convs) <= program.channels_last
    assert "restride to the planned layout" in program.run.source


def test_unsupported_convolutions_fall_back_with_a_reason(monkeypatch):
    """Transposed convolutions, other devices and torch builds without oneDNN run unplanned."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                          nn.ConvTranspose2d(8, 4, 2, stride=2)).eval()
    inputs = (torch.randn(1, 3, 16, 16),)
    module = PlannedModule(model, inputs)
    assert unplanned_convolutions(module) == [
        "transposed convolutions have no oneDNN kernel that writes into a given buffer"]
    assert close_to_eager(module(*inputs), model, inputs)
    node = next(op.node for op in module.main.graph.ops if op.target == "aten.convolution.default")
    assert "on CPU only" in convolution.unsupported(node, torch.device("cuda"))
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    without = PlannedModule(model, inputs)
    assert unplanned_convolutions(without) == [
        "oneDNN (mkldnn) is not available in this torch build: convolutions run unplanned"]
    assert not any(name.startswith("convolution") for name in without.main.planned)
    assert without.main.channels_last == set()  # "auto": nothing to gain, eager's layout
    assert torch.equal(without(*inputs), eager(model, inputs))


def test_bad_layout_is_a_clear_error():
    model, inputs = mlp()
    with pytest.raises(MemtileError, match="layout must be one of"):
        PlannedModule(model, inputs, layout="nhwc")


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
        assert close_to_eager(results[i][0], model, (batches[i],))
        assert all(torch.equal(r, results[i][0]) for r in results[i])


def test_new_shape_raises_by_default():
    model, inputs = zoo.get("resnet8_cifar")
    module = PlannedModule(model, inputs)
    with pytest.raises(InputShapeError, match="on_new_shape='replan'"):
        module(torch.randn(2, 3, 32, 32))


def test_new_shape_replans_and_caches():
    model, inputs = zoo.get("resnet8_cifar")
    module = PlannedModule(model, inputs, on_new_shape="replan")
    bigger = torch.randn(4, 3, 32, 32)
    assert close_to_eager(module(bigger), model, (bigger,))
    assert len(module._programs) == 2
    programs = dict(module._programs)
    assert programs[executor._signature((bigger,))].arena_bytes > module.arena_bytes
    assert close_to_eager(module(*inputs), model, inputs)
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
    """convolution.out (layout="eager") computes a temporary and copies: measured and refused."""
    model, inputs = zoo.get("resnet8_cifar")
    module = PlannedModule(model, inputs, layout="eager")
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
    absorbed = sum(len(f.chain.absorbed) for f in program.fused.values())  # no step of their own
    assert module.source.count("out=views[") == len(into_arena) - absorbed > 0

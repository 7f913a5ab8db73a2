"""The slot allocator, and the ops it lets write into the arena: convolutions without zeroing
their destination, large linear layers through oneDNN."""

import os
import threading

import pytest
import torch
from torch import nn
from torch.profiler import profile

from memtile import zoo
from memtile.measure import measure
from memtile.runtime import PlannedModule, linear, slots
from memtile.runtime.outvariants import relative_error

SMALL = (3, 64, 64)


@pytest.fixture(autouse=True)
def installed():
    """This machine kind has a C++ compiler: the wrapper must build and install."""
    assert slots.load() is None


def test_armed_slot_serves_its_size_on_its_thread_only():
    out = torch.zeros(256)
    seen = {}

    def op():
        other_size = torch.empty(100)
        elsewhere = threading.Thread(target=lambda: seen.update(thread=torch.empty(256)))
        elsewhere.start()
        elsewhere.join()
        result = torch.empty(256).fill_(3.0)
        seen["other_size"] = other_size
        return result

    assert slots.call_into(out, op) is out
    assert torch.equal(out, torch.full((256,), 3.0))  # written in place: the op's result was out
    assert seen["thread"].data_ptr() != out.data_ptr()
    assert seen["other_size"].data_ptr() != out.data_ptr()
    assert torch.empty(256).data_ptr() != out.data_ptr()  # disarmed after the call


def test_a_slot_taken_by_another_allocation_gets_the_result_copied():
    out = torch.zeros(256)
    taken = {}

    def op():
        taken["temporary"] = torch.full((256,), 7.0)  # same size, allocated first: gets the slot
        return torch.arange(256.0)

    assert slots.call_into(out, op) is out
    assert taken["temporary"].data_ptr() == out.data_ptr()
    assert torch.equal(out, torch.arange(256.0))


def test_disarmed_when_the_op_raises():
    out = torch.zeros(256)

    def op():
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        slots.call_into(out, op)
    assert torch.empty(256).data_ptr() != out.data_ptr()


def test_build_without_compiler_and_opt_out_say_why(monkeypatch, tmp_path):
    monkeypatch.setenv("MEMTILE_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-c++-compiler")
    with pytest.raises(OSError, match="no C\\+\\+ compiler"):
        slots._build()
    monkeypatch.setenv("MEMTILE_SLOT_ALLOCATOR", "0")
    assert slots._install() == (None, "disabled by MEMTILE_SLOT_ALLOCATOR=0")


def test_build_is_cached_by_source_and_torch(monkeypatch, tmp_path):
    monkeypatch.setenv("MEMTILE_CACHE", str(tmp_path))
    built = slots._build()
    assert built.parent == tmp_path and built.stat().st_size > 0
    monkeypatch.setenv("CXX", "no-such-c++-compiler")  # cached: no compiler needed again
    assert slots._build() == built


def without_slots(monkeypatch, build):
    """What `build()` makes when the slot allocator is not installed."""
    with monkeypatch.context() as patched:
        patched.setattr(slots, "load", lambda: "not installed (test)")
        return build()


def op_counts(module, inputs) -> dict[str, int]:
    with torch.no_grad(), profile() as prof:
        module(*inputs)
    return {e.key: e.count for e in prof.key_averages()}


def test_convolutions_write_their_slot_without_zeroing_it(monkeypatch):
    """vgg11's 8 convolutions allocate their output in their arena slot: no zeroing pass; the
    fallback zeroes each destination and accumulates into it. Same bits either way."""
    model, inputs = zoo.get("vgg11", input_shape=SMALL)
    direct = PlannedModule(model, inputs)
    zeroed = without_slots(monkeypatch, lambda: PlannedModule(model, inputs))
    assert len([n for n in direct.main.planned if n.startswith("convolution")]) == 8
    counts, fallback = op_counts(direct, inputs), op_counts(zeroed, inputs)
    assert counts["mkldnn::_convolution_pointwise"] == 8 and "aten::zero_" not in counts
    assert fallback["mkldnn::_convolution_pointwise_"] == 8 and fallback["aten::zero_"] == 8
    assert torch.equal(direct(*inputs), zeroed(*inputs))
    with_slots, without = measure(direct, *inputs), measure(zeroed, *inputs)
    assert sum(a.size for a in with_slots.allocations) <= sum(a.size for a in without.allocations)


def wide_mlp(batch: int):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024, bias=False))
    return model.eval(), (torch.randn(batch, 1024),)


def test_large_linear_layers_run_through_onednn_into_the_arena(monkeypatch):
    """From 4 rows and 1M weights, addmm and mm go through oneDNN, written into their slot:
    a call allocates only its output and oneDNN's workspace; outputs within the tolerance."""
    model, inputs = wide_mlp(8)
    module = PlannedModule(model, inputs)
    layers = [name for name, v in module.main.planned.items() if v.overload is linear.INTO]
    assert sorted(layers) == ["addmm", "mm"] and module.unplanned_ops == []
    with torch.no_grad():
        expected = model(*inputs)
    assert relative_error(expected, module(*inputs)) <= linear.TOLERANCE
    measurement = measure(module, *inputs)
    output = 8 * 1024 * 4
    workspace = [a.size for a in measurement.allocations if a.size != output]
    assert len(workspace) <= 2 and all(size <= linear.SCRATCH_BYTES for size in workspace)
    assert counts_addmm(module, inputs) == 0


def counts_addmm(module, inputs) -> int:
    counts = op_counts(module, inputs)
    return counts.get("aten::addmm", 0) + counts.get("aten::mm", 0)


@pytest.mark.parametrize("case", ["two rows", "no slot allocator", "eager layout"])
def test_linear_layers_stay_on_addmm_where_onednn_does_not_pay(monkeypatch, case):
    """At 1-2 rows MKL's addmm is faster; without the slot allocator oneDNN would copy its
    output; layout="eager" keeps bit-exact outputs. Each keeps ATen's out= kernels."""
    model, inputs = wide_mlp(2 if case == "two rows" else 8)
    build = {"eager layout": lambda: PlannedModule(model, inputs, layout="eager")}.get(
        case, lambda: PlannedModule(model, inputs))
    module = without_slots(monkeypatch, build) if case == "no slot allocator" else build()
    assert not any(v.overload is linear.INTO for v in module.main.planned.values())
    assert counts_addmm(module, inputs) == 2
    with torch.no_grad():
        assert torch.equal(module(*inputs), model(*inputs))


def test_build_falls_back_to_a_temporary_folder_when_the_cache_is_unusable(monkeypatch,
                                                                           tmp_path):
    not_a_folder = tmp_path / "cache"
    not_a_folder.write_text("a file where the cache folder would be")
    monkeypatch.delenv("MEMTILE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(not_a_folder))
    monkeypatch.setattr(slots.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    built = slots._build()
    assert built.parent == tmp_path / "tmp" / f"memtile-{os.getuid()}" and built.exists()
    assert list(built.parent.iterdir()) == [built]  # no scratch folder left behind

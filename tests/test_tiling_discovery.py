"""Discovery: tile() lowers the planned peak (never raises it), keeps outputs, honours budgets."""

import copy
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_tiling_fdt import InvertedResidual, randomize_bn
from torch import nn

from memtile import zoo
from memtile.errors import ExportError, MemtileError, UnsupportedOpError
from memtile.measure import measure
from memtile.runtime import PlannedModule
from memtile.tiling import BudgetNotMetError, tile
from memtile.tiling.check import compare, equivalent, equivalent_models
from memtile.tiling.fdt import apply_fdt, fdt_path
from memtile.tiling.macs import count_macs
from memtile.tiling.planned import planned_peak
from memtile.tiling.rewrite import propagate_shapes


def mlp(widths=(100, 1000, 10)) -> nn.Module:
    layers = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1]).eval()


@pytest.fixture(scope="module")
def tiled_mlp():
    """FDT discovery on the dense-widening MLP 100 -> 1000 -> 10 (shared: exports are slow)."""
    torch.manual_seed(0)
    model, x = mlp(), torch.randn(1, 100)
    tiled, report = tile(model, x, methods=("fdt",))
    return model, x, tiled, report


def test_fdt_discovery_halves_the_dense_widening_mlp_with_no_extra_macs(tiled_mlp):
    model, x, tiled, report = tiled_mlp
    assert report.peak_after_bytes <= report.peak_before_bytes / 2
    assert report.macs_after == report.macs_before == count_macs(tiled, [x])
    assert [step.method for step in report.steps] == ["fdt"] * len(report.steps)
    assert planned_peak(tiled, [x]).arena_bytes == report.peak_after_bytes
    error, scale = compare(model, tiled, [x])
    assert equivalent(error, scale) and report.max_abs_error == error


@settings(max_examples=4, deadline=None)
@given(
    widths=st.lists(st.sampled_from([4, 16, 64, 256]), min_size=2, max_size=3),
    residual=st.booleans(), size=st.sampled_from([8, 12]),
    methods=st.sampled_from([("fdt",), ("ffmt",), ("fdt", "ffmt")]),
)
def test_discovery_never_returns_a_higher_planned_peak(widths, residual, size, methods):
    layers: list[nn.Module] = []
    channels = 3
    for width in widths:
        layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        channels = width

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(*layers)
            self.head = nn.Conv2d(channels, 3, 1)

        def forward(self, x):
            y = self.head(self.body(x))
            return y + x if residual else y

    model, x = Net().eval(), torch.randn(1, 3, size, size)
    tiled, report = tile(model, x, max_mac_overhead=0.2, methods=methods)
    before = planned_peak(model, [x]).arena_bytes
    assert report.peak_before_bytes == before
    assert report.peak_after_bytes <= before
    assert planned_peak(tiled, [x]).arena_bytes == report.peak_after_bytes
    assert report.macs_after <= report.macs_before * 1.2
    error, scale = compare(model, tiled, [x])
    assert equivalent(error, scale)
    peaks = [report.peak_before_bytes] + [step.peak_bytes for step in report.steps]
    assert peaks == sorted(peaks, reverse=True)


def test_nothing_to_tile_returns_the_same_peak_and_no_steps():
    model, x = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1)).eval(), torch.randn(1, 3, 16, 16)
    tiled, report = tile(model, x)
    assert report.steps == [] and report.peak_after_bytes == report.peak_before_bytes
    assert equivalent(*compare(model, tiled, [x]))


def test_an_unreachable_budget_raises_with_the_best_found():
    model, x = mlp((10, 100, 5)), torch.randn(1, 10)
    with pytest.raises(BudgetNotMetError, match="budget of 64 B") as caught:
        tile(model, x, budget=64, methods=("fdt",))
    report = caught.value.report
    assert not report.budget_met and report.steps
    assert report.peak_after_bytes < report.peak_before_bytes
    assert planned_peak(caught.value.model, [x]).arena_bytes == report.peak_after_bytes


def test_a_met_budget_stops_the_search_early(tiled_mlp):
    model, x, _, full = tiled_mlp
    budget = full.steps[0].peak_bytes
    _, report = tile(model, x, budget=budget, methods=("fdt",))
    assert report.budget_met and len(report.steps) == 1 and report.peak_after_bytes <= budget


def test_resnet8_ffmt_lowers_planned_measured_and_planned_module_peaks():
    model, inputs = zoo.get("resnet8_cifar", batch=1)
    tiled, report = tile(model, inputs, max_mac_overhead=0.1)
    assert report.peak_after_bytes < report.peak_before_bytes
    assert report.mac_overhead <= 0.1
    assert count_macs(tiled, inputs) - count_macs(model, inputs) <= 0.1 * report.macs_before
    assert equivalent(report.max_abs_error, report.output_scale)
    with torch.no_grad():
        assert measure(tiled, *inputs).peak_bytes < measure(model, *inputs).peak_bytes
        # the executor's conv + batch norm + add + ReLU fusion already merges resnet8's slots
        # down to the tiled arena (128 KiB both, measured): tiling's gain shows without it
        planned, original = (PlannedModule(m, inputs, fuse=False) for m in (tiled, model))
        assert planned.arena_bytes < original.arena_bytes
        assert equivalent(*compare(model, planned, inputs))
        fused_tiled, fused = (PlannedModule(m, inputs) for m in (tiled, model))
        assert fused_tiled.arena_bytes <= fused.arena_bytes
        assert equivalent(*compare(model, fused_tiled, inputs))


@torch.fx.wrap
def _data_dependent(x):
    return x * 2 if x.sum() > 0 else x


class ExportFails(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        return _data_dependent(self.conv(x))


class TraceFails(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x


def test_models_that_cannot_be_exported_or_traced_raise_memtile_errors():
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ExportError, match="cannot trace the model"):
        tile(ExportFails().eval(), x)
    with pytest.raises(UnsupportedOpError, match="control flow"):
        tile(TraceFails().eval(), x)
    with pytest.raises(MemtileError, match="unknown tiling method"):
        tile(mlp(), torch.randn(1, 100), methods=("magic",))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilenet_v1_025_vww", "mobilenet_v2_035_144"])
def test_zoo_models_tile_equivalently_and_lower_the_peak(name):
    """Equivalent by memtile's rule (float32 within 1e-5 relative, else float64 within
    1e-10): on an AMD EPYC, mobilenet_v1_025_vww's tiled float32 output is 1.9e-5 relative
    from eager's, which is float32 rounding (float64 agrees), not a wrong tiling."""
    model, inputs = zoo.get(name, batch=1)
    tiled, report = tile(model, inputs)
    assert report.peak_after_bytes < report.peak_before_bytes
    assert report.mac_overhead <= 0.1
    assert equivalent_models(model, tiled, inputs)


@pytest.mark.slow
def test_mobilenet_v2_224_meets_the_mcunetv2_style_targets():
    """>= 8x lower planned peak without the input, >= 4x with it, <= 15% extra MACs."""
    model, inputs = zoo.get("mobilenet_v2", batch=1)
    tiled, report = tile(model, inputs, max_mac_overhead=0.15)
    assert report.peak_before_without_input_bytes >= 8 * report.peak_after_without_input_bytes
    assert report.peak_before_bytes >= 4 * report.peak_after_bytes
    assert report.mac_overhead <= 0.15
    assert equivalent(*compare(model, tiled, inputs))


@pytest.mark.slow
def test_fdt_alone_halves_mobilenet_v2_035_with_no_extra_macs():
    model, inputs = zoo.get("mobilenet_v2_035_144", batch=1)
    tiled, report = tile(model, inputs, methods=("fdt",))
    assert report.peak_after_bytes <= report.peak_before_bytes / 2
    assert report.macs_after == report.macs_before == count_macs(tiled, inputs)
    assert equivalent(*compare(model, tiled, inputs))

class TwoBlocks(nn.Module):
    """A stem and two identical inverted-residual blocks: the blocks tie at the peak."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(InvertedResidual(8, 6), InvertedResidual(8, 6))
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


def test_fdt_splits_blocks_tied_at_the_peak_together():
    """One block alone leaves the peak where it is (the other ties), so discovery splits both
    in one step, with no extra MACs, to below a quarter of the peak (discovery reached 2.3x
    before, one block at a time, each with its own partial-sum buffer)."""
    torch.manual_seed(0)
    model, x = randomize_bn(TwoBlocks()), torch.randn(1, 3, 16, 16)
    gm = propagate_shapes(torch.fx.symbolic_trace(model), [x])
    first, second = fdt_path(gm, "blocks_0_conv_0"), fdt_path(gm, "blocks_1_conv_0")
    before = planned_peak(model, [x]).arena_bytes
    assert planned_peak(apply_fdt(gm, first, 8), [x]).arena_bytes == before
    tiled, report = tile(model, x, max_mac_overhead=0.1)
    (step,) = report.steps
    assert step.method == "fdt" and step.paths == 2 and step.ops == [*first.nodes, *second.nodes]
    both = apply_fdt(apply_fdt(gm, first, step.partitions), second, step.partitions)
    assert report.peak_after_bytes == planned_peak(both, [x]).arena_bytes <= before / 4
    assert report.macs_after == report.macs_before == count_macs(tiled, [x])
    assert equivalent(*compare(model, tiled, [x]))


def test_fdt_discovery_refines_earlier_splits():
    """Two widening paths: each split only lowers the peak to the other's, so both must be
    split ever finer; replayed re-splits reach input + one channel pair + output."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(4, 64, 1), nn.ReLU(), nn.Conv2d(64, 4, 1),
        nn.Conv2d(4, 48, 1), nn.ReLU(), nn.Conv2d(48, 4, 1),
    ).eval()
    x = torch.randn(1, 4, 16, 16)
    tiled, report = tile(model, x, methods=("fdt",))
    finer = [step for step in report.steps if step.replaces is not None]
    assert finer and all(report.steps[s.replaces - 1].ops == s.ops for s in finer)
    pixel = 16 * 16 * 4
    assert report.peak_after_bytes == (4 + 64 // 32 + 4) * pixel
    assert report.macs_after == report.macs_before
    assert equivalent(*compare(model, tiled, [x]))


def test_auto_plans_each_rewrite_once_across_its_searches(monkeypatch):
    """auto runs three greedy searches from the same model; a rewrite that two of them try
    (the same accepted steps, in order) is captured and planned once; the model returned is
    planned once more, with the full schedule work."""
    from memtile.tiling import discovery

    requested, planned = [], []
    real_request, real_plan = discovery._PlannedPeaks.__call__, discovery.planned_peak

    def request(self, gm, steps):
        requested.append(discovery._recipe(steps))
        return real_request(self, gm, steps)

    monkeypatch.setattr(discovery._PlannedPeaks, "__call__", request)
    monkeypatch.setattr(discovery, "planned_peak",
                        lambda gm, inputs, **kw: planned.append(kw) or real_plan(gm, inputs, **kw))
    model, inputs = zoo.get("resnet8_cifar", batch=1)
    _, report = tile(model, inputs, max_mac_overhead=0.1)
    searched = [kw for kw in planned if "schedule_work" in kw]
    assert report.steps and len(searched) == len(set(requested)) < len(requested)
    assert len(planned) == len(searched) + 1


def test_max_seconds_stops_the_search_with_the_best_found_so_far(tiled_mlp):
    model, x, _, full = tiled_mlp
    assert full.steps and not full.timed_out
    tiled, report = tile(model, x, methods=("fdt",), max_seconds=0)
    assert report.timed_out and report.steps == []
    assert report.peak_after_bytes == report.peak_before_bytes
    assert equivalent(*compare(model, tiled, [x]))


def test_barriers_name_the_op_that_ended_spans_and_paths():
    from memtile.tiling.discovery import barriers

    found = barriers([
        "ffmt over a..b: mean_3 (mean) is an op memtile does not know; bands and tiles take ...",
        "ffmt over c..d: mean (mean) is an op memtile does not know; bands and tiles take ...",
        "fdt through e: FDT path from e ended at add_1 (add): it combines e with another tensor",
        ("fdt through f: FDT path from f ended at g: its output has 2 consumers (branch or "
        "residual), so its channels cannot be split"),
        "ffmt 2x2 over a..b (3 ops): planned peak 10 B (10 B without inputs) is no better",
        "ffmt over a..b: layer 'ffmt0' (FFMTTiles) is an op memtile does not know; ...",
    ])
    assert found == ["ffmt: mean (2)", "fdt: add (1)", ("fdt: its output has 2 consumers (branch "
                     "or residual), so its channels cannot be split (1)")]


def test_outputs_are_run_for_the_model_returned_not_after_every_step(monkeypatch):
    """A search's steps are checked once it ends, on the model it ends at: one run of a tiled
    model checks a search of several steps and gives the report's error, where every accepted
    step was run before (and the model returned once more for the error)."""
    from memtile.tiling import check

    compared = []
    real = check.Reference.compare
    monkeypatch.setattr(check.Reference, "compare",
                        lambda self, tiled: compared.append(tiled) or real(self, tiled))
    torch.manual_seed(0)
    model = nn.Sequential(  # two widening paths: several steps (see refines_earlier_splits)
        nn.Conv2d(4, 64, 1), nn.ReLU(), nn.Conv2d(64, 4, 1),
        nn.Conv2d(4, 48, 1), nn.ReLU(), nn.Conv2d(48, 4, 1),
    ).eval()
    x = torch.randn(1, 4, 16, 16)
    tiled, report = tile(model, x, methods=("fdt",))
    assert len(report.steps) > 2
    assert len(compared) == 1 and compared[0].code == tiled.code  # tiled: a copy of it
    assert equivalent(*compare(model, tiled, [x]))


def test_a_step_whose_outputs_differ_is_rejected_with_the_reason_and_the_next_is_taken(
        tiled_mlp, monkeypatch):
    """The first step of the clean search is made wrong (a weight of its new partitions moved):
    the returned model's check finds it, the candidate is rejected with the reason, and the
    search goes on from before it with the next-best candidate, to a model that matches."""
    from memtile.tiling import discovery

    model, x, _, clean = tiled_mlp
    first = clean.steps[0]
    real_apply = discovery.Candidate.apply
    broken = []

    def apply(self, gm):
        tiled, made = real_apply(self, gm)
        if self.redo is None and (self.partitions, list(self.ops)) == (first.partitions, first.ops):
            old = dict(gm.named_parameters())
            weight = next(p for n, p in tiled.named_parameters() if n not in old)
            with torch.no_grad():
                weight.add_(1.0)
            broken.append(self.describe())
        return tiled, made

    monkeypatch.setattr(discovery.Candidate, "apply", apply)
    tiled, report = tile(model, x, methods=("fdt",))
    assert broken
    assert any(reason.startswith(f"{broken[0]}: outputs differ by") for reason in report.rejected)
    assert any(b.startswith("fdt: outputs differ beyond the tolerance") for b in report.barriers)
    assert all((s.partitions, s.ops, s.replaces) != (first.partitions, first.ops, None)
               for s in report.steps)
    assert report.steps and report.peak_after_bytes < report.peak_before_bytes
    assert equivalent(*compare(model, tiled, [x]))
    assert equivalent(report.max_abs_error, report.output_scale)


def test_a_rewrite_propagates_shapes_through_the_nodes_it_changed_only(monkeypatch):
    """`propagate_shapes(tiled, inputs, before=gm)` gives every node the metadata a full
    propagation gives, running only the nodes an FFMT or FDT rewrite made and their consumers."""
    from torch.fx.passes.shape_prop import ShapeProp

    from memtile.tiling.ffmt import apply_ffmt, cuts, span
    from memtile.trace import trace

    model, inputs = zoo.get("mobilenet_v2_035_144", batch=1)
    gm = propagate_shapes(trace(model), inputs)
    names = [n.name for n in cuts(gm)]
    ffmt = apply_ffmt(gm, span(gm, names[0], names[3]), (2, 2))
    fdt = apply_fdt(gm, fdt_path(gm, "features_5_conv_0_0"), 4)
    real, ran = ShapeProp.run_node, []
    monkeypatch.setattr(ShapeProp, "run_node", lambda self, n: ran.append(n) or real(self, n))
    for tiled in (ffmt, fdt):
        ran.clear()
        incremental = propagate_shapes(copy.deepcopy(tiled), inputs, before=gm)
        count = len(ran)
        full = propagate_shapes(copy.deepcopy(tiled), inputs)
        for a, b in zip(incremental.graph.nodes, full.graph.nodes, strict=True):
            assert a.name == b.name and a.meta.get("tensor_meta") == b.meta.get("tensor_meta")
        made = {n.name for n in tiled.graph.nodes} - {n.name for n in gm.graph.nodes}
        assert len(made) < count < len(made) + 10 < len(tiled.graph.nodes) // 2


def test_the_model_returned_shares_no_tensor_with_the_callers_model():
    """Rewrites share unchanged modules between candidate copies (`copy_graph_module`); the
    model `tile` returns is copied deeply, so updating one model's weights leaves the other."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 64, 1), nn.ReLU(), nn.Conv2d(64, 4, 1),
                          nn.Conv2d(4, 4, 3, padding=1)).eval()
    x = torch.randn(1, 4, 16, 16)
    tiled, report = tile(model, x, methods=("fdt",))
    assert report.steps
    ours = {t.data_ptr() for t in [*model.parameters(), *model.buffers()]}
    assert ours.isdisjoint(t.data_ptr() for t in [*tiled.parameters(), *tiled.buffers()])


def test_batch_norm_shapes_are_propagated_without_running_it(monkeypatch):
    """Eval batch norm gives its input's shape and layout (channels-last in, channels-last out)
    without running on fake tensors (about 10 ms a call): the metadata a real run gives."""
    from torch.fx.passes.shape_prop import ShapeProp

    from memtile.trace import trace

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.BatchNorm2d(8)).eval()
    x = torch.randn(2, 3, 9, 9).to(memory_format=torch.channels_last)
    real = trace(model)
    with torch.no_grad():
        ShapeProp(real).propagate(x)
    ran = []
    monkeypatch.setattr(nn.functional, "batch_norm", lambda t, *a, **k: ran.append(t) or t)
    fake = propagate_shapes(trace(model), (x,))
    assert not ran
    metas = [(n.name, n.meta["tensor_meta"]) for n in fake.graph.nodes if n.op != "output"]
    assert metas == [(n.name, n.meta["tensor_meta"]) for n in real.graph.nodes if n.op != "output"]
    assert fake.graph.find_nodes(op="call_module", target="1")[0].meta["tensor_meta"].stride[1] == 1


def test_fdt_partial_sums_are_propagated_without_their_gemm(tiled_mlp, monkeypatch):
    """FDT's `PartialSum` writes into its accumulator: shape propagation takes the accumulator
    as its result instead of running the out= GEMM on fake tensors; the metadata is a real
    run's."""
    from torch.fx.passes.shape_prop import ShapeProp

    from memtile.tiling.fdt import PartialSum

    _, x, tiled, _ = tiled_mlp
    assert any(isinstance(m, PartialSum) for m in tiled.modules())
    real = copy.deepcopy(tiled)
    with torch.no_grad():
        ShapeProp(real).propagate(x)
    ran = []
    monkeypatch.setattr(PartialSum, "forward", lambda self, total, x: ran.append(x) or total)
    fake = propagate_shapes(copy.deepcopy(tiled), (x,))
    assert not ran
    metas = [(n.name, n.meta["tensor_meta"]) for n in fake.graph.nodes if n.op != "output"]
    assert metas == [(n.name, n.meta["tensor_meta"]) for n in real.graph.nodes if n.op != "output"]


def test_tile_command_saves_the_tiled_program_and_the_report_points_to_it(tiled_mlp, tmp_path,
                                                                          monkeypatch):
    """`memtile tile --out` keeps the tiled program as `tiled.pt2` (tiling's own graph, not
    exported again), which runs as the model does; the report's tile section does not save it
    but says how to get it."""
    from memtile.commands import tile as tile_command

    model, x, tiled, report = tiled_mlp
    monkeypatch.setattr(torch.export, "export", lambda *a, **k: pytest.fail("exported again"))
    files = tile_command._write_program(tmp_path, tiled, (x,), report)
    monkeypatch.undo()
    loaded = torch.export.load(files["program_pt2"]).module()
    with torch.no_grad():  # an inference program: FDT accumulates with out= kernels
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-6)
    assert "memtile tile mlp --out DIR" in tile_command.report_text(
        "mlp", report.as_dict() | {"measured_peak_before_bytes": 1, "measured_peak_after_bytes": 1,
                                   "max_abs_error": 0.0, "output_scale": 1.0}, {})


def test_one_liveness_pass_weighs_every_grid_of_a_span_as_estimate_peak_does():
    """FFMT candidates are weighed for nine grids from one pass (`collapsed_objectives`); each
    objective must be what `estimate_peak` gives with that grid's working bytes."""
    from memtile.tiling.estimate import Collapse, collapsed_objectives, estimate_peak
    from memtile.tiling.ffmt import cuts, span
    from memtile.trace import trace

    model, inputs = zoo.get("mobilenet_v2_035_144", batch=1)
    gm = propagate_shapes(trace(model, inputs), inputs)
    ends = [n.name for n in cuts(gm)]
    extras = [0, 1, 4096, 10**6, 10**8]
    for first, last in [(0, 8), (3, 12), (8, 20)]:
        nodes = frozenset(span(gm, ends[first], ends[last]).nodes)
        expected = [estimate_peak(gm, Collapse(nodes, extra)).objective for extra in extras]
        assert collapsed_objectives(gm, nodes, extras) == expected
        assert len(set(expected)) > 2  # the extra bytes move the peak

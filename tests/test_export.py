"""memtile export: the .pte's planned memory is memtile's plan, and the program computes what
the eager model computes (run through ExecuTorch's runtime)."""

import builtins
import copy
import operator

import pytest
import torch
from torch import nn

from memtile import zoo
from memtile.cli import main
from memtile.errors import PlanVerificationError
from memtile.export import ExecuTorchMissingError, export, require_executorch
from memtile.export.check import fresh_inputs, planned_buffer_sizes
from memtile.export.hook import MemtilePlanner, check_offsets
from memtile.export.program import lower, scheduled_program, to_edge_program

TOLERANCE = 1e-5


def small_net() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """conv-BN-ReLU twice, a 1x1 conv, pooling and a linear layer, BN statistics calibrated."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU6(),
        nn.Conv2d(32, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    )
    zoo.calibrate_norms(net, (3, 32, 32))
    return net.eval(), (torch.randn(1, 3, 32, 32),)


def run_through_runtime(path, model, inputs) -> float:
    """The test's own check: ExecuTorch's runtime on fresh inputs against eager, relative."""
    from executorch.runtime import Runtime

    fresh = fresh_inputs(inputs)
    method = Runtime.get().load_program(path).load_method("forward")
    got = method.execute(list(fresh))[0]
    with torch.no_grad():
        want = model(*fresh)
    assert want.abs().max() > 0.1  # calibrated BatchNorm: outputs of order 1, not ~1e-9
    return ((got - want).abs().max() / want.abs().max()).item()


def assert_memtile_planned(result, path) -> None:
    sizes = planned_buffer_sizes(path)
    assert sizes == [0, result.memtile_arena_bytes]
    assert result.planned_arena_bytes == result.memtile_arena_bytes
    assert result.planned_arena_bytes <= result.executorch_greedy_bytes
    assert result.load_bytes <= result.planned_arena_bytes


def test_edge_program_skips_only_a_redundant_decomposition():
    """memtile's programs are core ATen: `to_edge`'s re-decomposition is skipped, and the edge
    program is op for op what `to_edge` makes (it would not be if ExecuTorch's edge passes
    changed, or if a program still held ops its table decomposes)."""
    from executorch.exir import to_edge

    from memtile.export import program as programs

    model, inputs = small_net()
    program = scheduled_program(model, inputs)[0]
    assert programs._decomposed(program)

    def ops(edge: torch.export.ExportedProgram):
        return [(str(n.target), n.meta["val"].shape if hasattr(n.meta.get("val"), "shape")
                 else None) for n in edge.graph.nodes if n.op == "call_function"]

    assert (ops(programs._edge(copy.deepcopy(program)))
            == ops(to_edge(copy.deepcopy(program)).exported_program()))
    linear = torch.export.export(nn.Sequential(nn.Linear(3, 4), nn.Hardswish()).eval(),
                                 (torch.randn(2, 3),))
    assert not programs._decomposed(linear)  # aten.linear, hardswish: to_edge decomposes them
    assert programs._decomposed(linear.run_decompositions())


def test_greedy_arena_reported_is_what_executorch_default_planning_gives():
    """The hook runs ExecuTorch's greedy on the specs it plans, instead of a second
    `to_executorch`: the number must be the default lowering's arena, read from its program."""
    model, inputs = small_net()
    edge = to_edge_program(scheduled_program(model, inputs)[0])
    planner = MemtilePlanner()
    lower(edge, planner)
    default = lower(edge).executorch_program.execution_plan[0].non_const_buffer_sizes
    assert planner.record.greedy_bytes == sum(default)
    assert planner.record.plan.arena_bytes < planner.record.greedy_bytes


def test_small_net_arena_is_memtiles_and_below_greedy(tmp_path):
    """The hook is used: a model where memtile's plan (in-place pairs) beats ExecuTorch's
    greedy, so the file's arena differs from greedy's; it would equal it if bypassed."""
    model, inputs = small_net()
    result = export(model, inputs, tmp_path / "net.pte")
    assert_memtile_planned(result, tmp_path / "net.pte")
    assert result.planned_arena_bytes < result.executorch_greedy_bytes
    assert result.inplace_pairs > 0 and result.optimal
    assert result.planned_arena_bytes == result.load_bytes  # proven: nothing smaller exists
    assert run_through_runtime(tmp_path / "net.pte", model, inputs) <= TOLERANCE
    assert result.max_rel_diff <= TOLERANCE and not result.tiled and result.steps == []


def test_small_net_tiled(tmp_path):
    model, inputs = small_net()
    plain = export(model, inputs, tmp_path / "plain.pte")
    # a budget lets discovery stop at its first tiling that meets it (keeps the test fast)
    budget = plain.planned_arena_bytes * 3 // 4
    result = export(model, inputs, tmp_path / "tiled.pte", tile=True, budget=budget)
    assert result.tiled and result.steps and result.budget_met
    assert_memtile_planned(result, tmp_path / "tiled.pte")
    assert result.planned_arena_bytes < plain.planned_arena_bytes
    assert run_through_runtime(tmp_path / "tiled.pte", model, inputs) <= TOLERANCE


def test_tiling_kept_only_when_it_lowers_the_arena(tmp_path, monkeypatch):
    """A "tiling" that changes nothing gives no smaller arena: the untiled program is written.
    Both programs are the stitched graphs tiling planned (`PlannedPeak.program`): nothing is
    captured again."""
    from memtile.export import pipeline
    from memtile.tiling.planned import planned_peak
    from memtile.tiling.rewrite import propagate_shapes
    from memtile.tiling.stitch import Stitcher
    from memtile.trace import trace

    def unchanged(m, inputs, *_):
        gm = propagate_shapes(trace(copy.deepcopy(m), inputs), inputs)
        planned = planned_peak(gm, inputs, capture_with=Stitcher())
        return gm, [{"step": 1}], planned, planned

    model, inputs = small_net()
    monkeypatch.setattr(pipeline, "_tiled", unchanged)
    monkeypatch.setattr(pipeline, "scheduled_program", lambda *_: pytest.fail("captured again"))
    result = export(model, inputs, tmp_path / "n.pte", tile=True)
    assert not result.tiled and result.steps == [{"step": 1}]
    assert result.planned_arena_bytes == result.untiled_arena_bytes
    assert_memtile_planned(result, tmp_path / "n.pte")


def test_mobilenet_v2_035_144(tmp_path):
    model, inputs = zoo.get("mobilenet_v2_035_144")
    result = export(model, inputs, tmp_path / "m.pte")
    assert_memtile_planned(result, tmp_path / "m.pte")
    assert result.planned_arena_bytes < result.executorch_greedy_bytes
    assert run_through_runtime(tmp_path / "m.pte", model, inputs) <= TOLERANCE


@pytest.mark.slow
def test_mobilenet_v2_035_144_tiled(tmp_path):
    model, inputs = zoo.get("mobilenet_v2_035_144")
    result = export(model, inputs, tmp_path / "t.pte", tile=True)
    assert result.tiled and result.steps
    assert_memtile_planned(result, tmp_path / "t.pte")
    assert result.planned_arena_bytes < 1244160  # the untiled .pte's arena
    assert run_through_runtime(tmp_path / "t.pte", model, inputs) <= TOLERANCE


class Branches(nn.Module):
    """Two branches off one input; running the one whose big intermediate dies first lowers
    the peak, so memtile's schedule differs from the exported order."""

    def __init__(self):
        super().__init__()
        self.a1, self.a2 = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 64, 1)
        self.b1, self.b2 = nn.Conv2d(4, 64, 1), nn.Conv2d(64, 4, 1)

    def forward(self, x):
        a = self.a2(self.a1(x))  # small, then big: a lives until the end
        b = self.b2(self.b1(x))  # big, then small
        return a.sum(dim=1, keepdim=True) + b


def test_program_follows_memtiles_schedule(tmp_path):
    model, inputs = Branches().eval(), (torch.randn(1, 4, 16, 16),)
    program, ready = scheduled_program(model, inputs)
    assert ready.order != sorted(ready.order)  # the schedule reorders this model
    ops = [n for n in program.graph.nodes
           if n.op == "call_function" and n.target is not operator.getitem]
    assert ops == [ready.graph.ops[i].node for i in ready.order]
    result = export(model, inputs, tmp_path / "b.pte")
    assert_memtile_planned(result, tmp_path / "b.pte")
    assert run_through_runtime(tmp_path / "b.pte", model, inputs) <= TOLERANCE


def test_check_offsets_rejects_overlap():
    """The spec-side check fails on two live storages that share bytes."""
    from executorch.exir.tensor import TensorSpec

    a = TensorSpec.from_tensor(torch.empty(16))
    b = TensorSpec.from_tensor(torch.empty(16))
    a.lifetime, b.lifetime = [0, 3], [3, 5]
    check_offsets([[a], [b]], {0: 0, 1: 64})
    with pytest.raises(PlanVerificationError):
        check_offsets([[a], [b]], {0: 0, 1: 32})
    check_offsets([[a, b]], {0: 0})  # an in-place pair is one storage


def test_planner_refuses_control_flow_submodules():
    planner = MemtilePlanner()
    module = torch.fx.GraphModule(nn.Module(), torch.fx.Graph())
    module.input_mem_buffer_sizes = [0, 128]
    with pytest.raises(Exception, match="control-flow"):
        planner(16, set(), module, None, 0)


def test_missing_executorch_says_how_to_install(monkeypatch, capsys):
    real_import = builtins.__import__

    def no_executorch(name, *args, **kwargs):
        if name == "executorch" or name.startswith("executorch."):
            raise ImportError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_executorch)
    with pytest.raises(ExecuTorchMissingError, match=r"pip install 'memtile\[export\]'"):
        require_executorch()
    assert main(["export", "tests_models:conv_bn_relu", "--out", "unused.pte"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'memtile[export]'" in err[0]


def test_cli_json_keys(tmp_path, capsys):
    import json

    path = tmp_path / "c.pte"
    assert main(["export", "tests_models:conv_bn_relu", "--out", str(path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    for key in ("pte", "bytes", "planned_arena_bytes", "executorch_greedy_bytes", "max_rel_diff",
                "tiled", "steps"):
        assert key in summary
    assert summary["bytes"] == path.stat().st_size
    assert summary["planned_arena_bytes"] == planned_buffer_sizes(path)[1]
    assert summary["max_rel_diff"] <= TOLERANCE


class TwoOutputs(nn.Module):
    """A tuple output: the runtime returns a flat list, which is compared leaf by leaf."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y, y.relu() * 2


def test_a_tuple_output_agrees_output_by_output(tmp_path):
    torch.manual_seed(0)
    model, inputs = TwoOutputs().eval(), (torch.randn(1, 3, 16, 16),)
    result = export(model, inputs, tmp_path / "two.pte")
    assert result.equivalent and result.max_rel_diff <= TOLERANCE


def test_out_that_is_a_folder_is_refused_before_exporting(tmp_path, capsys):
    assert main(["export", "tests_models:conv_bn_relu", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a folder" in err[0]


class SplitAndSlice(nn.Module):
    """res2net's and dpn's patterns: a conv's output split into chunks that are convolved in a
    chain and concatenated (Res2Net), and channel slices of one tensor (DPN's dual path).
    ExecuTorch's edge dialect makes each chunk and slice a copy with its own spec, which the
    ATen graph holds as views: memtile plans ExecuTorch's specs, copies included."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 1)
        self.chain = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1) for _ in range(3))

    def forward(self, x):
        chunks = torch.split(self.conv(x), 4, dim=1)
        out, previous = [], None
        for chunk, conv in zip(chunks[:3], self.chain, strict=True):
            previous = conv(chunk if previous is None else chunk + previous)
            out.append(previous)
        y = torch.cat([*out, chunks[3]], dim=1)
        return y[:, :8].relu() + y[:, 8:]


def test_split_and_slice_copies_are_planned(tmp_path):
    torch.manual_seed(0)
    model, inputs = SplitAndSlice().eval(), (torch.randn(1, 3, 16, 16),)
    program, _ = scheduled_program(model, inputs)
    targets = [str(n.target) for n in to_edge_program(program).exported_program().graph.nodes]
    assert not any("split_with_sizes_copy" in t for t in targets)  # pieces are slices
    assert sum("slice_copy" in t for t in targets) == 4 + 2
    result = export(model, inputs, tmp_path / "s.pte")
    assert_memtile_planned(result, tmp_path / "s.pte")
    assert run_through_runtime(tmp_path / "s.pte", model, inputs) <= TOLERANCE


class SplitPerPiece(nn.Module):
    """A split for every piece read, as torch.export records timm's Res2Net (8 splits of one
    tensor per block): the edge dialect copied every piece of each."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 1)
        self.chain = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1) for _ in range(8))

    def forward(self, x):
        y = self.conv(x)
        return torch.cat([conv(y.split(4, dim=1)[k]) for k, conv in enumerate(self.chain)], 1)


def test_split_pieces_become_slices_and_lower_the_arena(tmp_path, monkeypatch):
    from memtile.export import program as lowering

    torch.manual_seed(0)
    model, inputs = SplitPerPiece().eval(), (torch.randn(1, 3, 16, 16),)
    program, _ = scheduled_program(model, inputs)
    assert lowering.pieces_as_slices(program) == 8
    assert not any(n.target is torch.ops.aten.split_with_sizes.default for n in program.graph.nodes)
    with_pass, without = arenas_with_and_without(lowering, "pieces_as_slices", model, inputs,
                                                 tmp_path, monkeypatch)
    assert with_pass < without


def arenas_with_and_without(lowering, name: str, model, inputs, tmp_path, monkeypatch):
    """The .pte arena with the lowering pass `name` (its file checked and run through the
    runtime), then without it."""
    result = export(model, inputs, tmp_path / "with.pte")
    assert_memtile_planned(result, tmp_path / "with.pte")
    assert run_through_runtime(tmp_path / "with.pte", model, inputs) <= TOLERANCE
    monkeypatch.setattr(lowering, name, lambda program: 0)
    without = export(model, inputs, tmp_path / "without.pte")
    return result.memtile_arena_bytes, without.memtile_arena_bytes


class LateSlice(nn.Module):
    """Two overlapping bands of the input read only at the end, as FFMT's tiles read theirs:
    memtile's schedule makes views as soon as they are ready, and the edge dialect makes these
    copies, held across the large intermediate."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Conv2d(4, 32, 3, padding=1), nn.Conv2d(32, 4, 3, padding=1)

    def forward(self, x):
        top, bottom = x[:, :, :10], x[:, :, 6:]
        y = self.down(self.up(x))
        return torch.cat([y[:, :, :6] + top[:, :, :6], y[:, :, 6:] + bottom], dim=2)


def test_views_are_made_right_before_their_readers(tmp_path, monkeypatch):
    from memtile.export import program as lowering

    torch.manual_seed(0)
    model, inputs = LateSlice().eval(), (torch.randn(1, 4, 16, 16),)
    program, _ = scheduled_program(model, inputs)
    assert lowering.views_before_readers(program) >= 2
    for band in [n for n in program.graph.nodes if getattr(n.target, "is_view", False)]:
        assert all(getattr(n.target, "is_view", False) for n in _before_first_reader(band))
    with_pass, without = arenas_with_and_without(lowering, "views_before_readers", model, inputs,
                                                 tmp_path, monkeypatch)
    assert with_pass < without


def _before_first_reader(node):
    """The nodes between `node` and its first reader in graph order."""
    between = node.next
    while between not in node.users:
        yield between
        between = between.next

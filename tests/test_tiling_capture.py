"""Discovery re-plans its rewrites with a faster capture: the planner must see torch.export's graph."""

import pytest
import torch
from torch import nn

from memtile import capture as capture_module
from memtile import lifetimes, zoo
from memtile.capture import MemGraph, capture, fast_capture
from memtile.tiling import stitch, tile
from memtile.tiling.fdt import apply_fdt, fdt_path
from memtile.tiling.ffmt import apply_ffmt, cuts, span
from memtile.tiling.planned import graph_peak
from memtile.tiling.rewrite import propagate_shapes
from memtile.trace import trace


def memory_picture(g: MemGraph) -> tuple:
    """Everything the planner reads, without node names: ops, tensors, buffer lifetimes."""
    tensors = [(t.shape, t.dtype, t.nbytes, t.category, t.is_view, t.producer, t.consumers)
               for t in g.tensors.values()]
    buffers = sorted((b.size, b.start, b.end) for b in lifetimes.buffers(g))
    return [op.target for op in g.ops], tensors, buffers


@pytest.fixture(scope="module")
def mobilenet():
    model, inputs = zoo.get("mobilenet_v2_035_144", batch=1)
    return propagate_shapes(trace(model), inputs), inputs


def rewritten(gm, inputs, how: str):
    if how == "ffmt":  # the stem and the first blocks in 4x4 tiles, as discovery's first step
        ends = [n.name for n in cuts(gm)]
        return apply_ffmt(gm, span(gm, ends[0], ends[8]), (4, 4))
    if how == "fdt":  # a widening block in 4 channel groups, partial sums GEMM'd in place
        return apply_fdt(gm, fdt_path(gm, "features_2_conv_0_0"), 4)
    return gm


@pytest.mark.parametrize("how", ["untiled", "ffmt", "fdt"])
def test_fast_capture_gives_the_exported_graph_and_planned_arena(mobilenet, how):
    gm, inputs = mobilenet
    model = rewritten(gm, inputs, how)
    exported, fast = capture(model, inputs), fast_capture(model, inputs)
    assert fast.program is None and len(fast.ops) > 100
    assert memory_picture(fast) == memory_picture(exported)
    fast_peak, exported_peak = graph_peak(fast), graph_peak(exported)
    assert fast_peak.objective == exported_peak.objective
    assert fast_peak.macs == exported_peak.macs


@pytest.mark.parametrize("how", ["untiled", "ffmt", "fdt"])
def test_stitched_capture_gives_the_exported_graph(mobilenet, how):
    """Pieces traced one node at a time (the tiled graph's new nodes once, the rest reused from
    the untiled graph) join into the graph torch.export gives for the whole model."""
    gm, inputs = mobilenet
    stitcher = stitch.Stitcher()
    untiled = stitcher(gm, inputs)
    traced = stitcher.traced
    model = propagate_shapes(rewritten(gm, inputs, how), inputs)
    stitched = stitcher(model, inputs)
    assert not stitcher.fallbacks
    assert memory_picture(untiled) == memory_picture(capture(gm, inputs))
    assert memory_picture(stitched) == memory_picture(capture(model, inputs))
    assert graph_peak(stitched).objective == graph_peak(fast_capture(model, inputs)).objective
    made = {n.name for n in model.graph.nodes} - {n.name for n in gm.graph.nodes}
    assert stitcher.traced - traced <= len(made) and (stitcher.traced > traced) == bool(made)


def test_one_span_tiled_twice_is_traced_once(mobilenet):
    """Each search rebuilds its rewrites, so the same FFMT tiles come back as new modules (and
    new GraphModule classes): their pieces must be found again, not traced again (mobilenet_v2
    traced one 4x4 span seven times, 30 of `memtile tile`'s 108 s)."""
    gm, inputs = mobilenet
    stitcher = stitch.Stitcher()
    first = stitcher(propagate_shapes(rewritten(gm, inputs, "ffmt"), inputs), inputs)
    traced = stitcher.traced
    again = stitcher(propagate_shapes(rewritten(gm, inputs, "ffmt"), inputs), inputs)
    assert stitcher.traced == traced and not stitcher.fallbacks
    assert memory_picture(again) == memory_picture(first)


def piece_ops(piece) -> list[tuple]:
    """A piece's ops with their arguments, nodes as positions (constants by name)."""
    holders = [n for n in piece.graph.nodes if n.op == "placeholder"]
    names = {h: f"const {name}" for h, name in zip(holders, piece.constants, strict=False)}
    where = {n: names.get(n, i) for i, n in enumerate(piece.graph.nodes)}
    return [(n.op, str(n.target), repr(torch.fx.map_arg((n.args, n.kwargs), lambda a: where[a])))
            for n in piece.graph.nodes if n.op != "placeholder"]


@pytest.mark.parametrize("grid", [(4, 4), (3, 3), (2, 1)])
def test_ffmt_tiles_traced_once_per_kind_give_the_whole_trace(mobilenet, grid):
    """Tiles with equal band signatures run the same ops at other offsets: tracing one of each
    kind and splicing gives exactly the ops and arguments of tracing every tile."""
    gm, inputs = mobilenet
    ends = [n.name for n in cuts(gm)]
    model = propagate_shapes(apply_ffmt(gm, span(gm, ends[0], ends[8]), grid), inputs)
    node = next(n for n in model.graph.nodes if n.op == "call_module" and "ffmt" in n.target)
    tiles = model.get_submodule(node.target)
    kinds = tiles.tile_kinds()
    assert len(set(kinds)) == {(4, 4): 9, (3, 3): 9, (2, 1): 2}[grid]
    (whole,) = stitch._trace_pieces(model, [node], [frozenset()])
    apart = stitch._trace_tiles(model, node, tiles)
    assert piece_ops(apart) == piece_ops(whole)
    assert sorted(apart.constants) == sorted(whole.constants)
    assert (apart.mutated, apart.aliases, apart.views) == (whole.mutated, whole.aliases,
                                                           whole.views)


def test_stitched_tiles_run_as_the_tiled_model(mobilenet):
    gm, inputs = mobilenet
    ends = [n.name for n in cuts(gm)]
    model = propagate_shapes(apply_ffmt(gm, span(gm, ends[0], ends[8]), (4, 4)), inputs)
    stitcher = stitch.Stitcher()
    program = stitcher(model, inputs).exported_program(inputs)
    assert not stitcher.fallbacks
    x = torch.randn_like(inputs[0])
    torch.testing.assert_close(program.module()(x), model(x), rtol=0, atol=0)


class InPlace(nn.Module):
    """ReLU6(inplace) on a BN output, an identity (eval Dropout) whose result is overwritten
    in place, a read of the overwritten tensor under its older name, a dead node, and a reshape
    of a transposed tensor (a copy, where a contiguous one would be a view)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU6(inplace=True)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(8 * 8 * 8, 5)

    def forward(self, x):
        y = self.bn(self.conv(x))
        z = self.act(y)  # z is y
        dead = x * 2  # noqa: F841 - computes nothing the model returns
        torch.relu_(self.drop(z))  # overwrites y
        w = y + 1
        return self.head(w.transpose(2, 3).reshape(1, -1))


def stitch_small(model: nn.Module) -> tuple[stitch.Stitcher, MemGraph, torch.fx.GraphModule, tuple]:
    """(stitcher, its capture, the traced graph, inputs) of `model` on one 1x3x8x8 input."""
    torch.manual_seed(0)
    inputs = (torch.randn(1, 3, 8, 8),)
    gm = propagate_shapes(trace(model.eval()), inputs)
    stitcher = stitch.Stitcher()
    return stitcher, stitcher(gm, inputs), gm, inputs


def test_stitched_capture_follows_in_place_ops_aliases_and_strides():
    stitcher, stitched, gm, inputs = stitch_small(InPlace())
    assert not stitcher.fallbacks and stitcher.traced == 10  # one per node
    assert memory_picture(stitched) == memory_picture(fast_capture(gm, inputs))
    assert "aten.clone.default" in [op.target for op in stitched.ops]


class Ghost(nn.Module):
    """timm's GhostModule: two convolutions' outputs concatenated, then cut back to the block's
    width with a tensor slice (`getitem` on a tensor, not on a tuple of outputs)."""

    def __init__(self):
        super().__init__()
        self.primary, self.cheap = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 3, padding=1, groups=4)

    def forward(self, x):
        y = self.primary(x)
        out = torch.cat([y, self.cheap(y)], dim=1)
        return out[:, :6, :, :] * 2


def test_a_slice_of_a_tensor_is_a_piece_of_its_own():
    stitcher, stitched, gm, inputs = stitch_small(Ghost())
    assert not stitcher.fallbacks
    assert memory_picture(stitched) == memory_picture(fast_capture(gm, inputs))
    program = stitched.exported_program(inputs)
    torch.testing.assert_close(program.module()(*inputs), gm(*inputs))


class Awkward(nn.Module):
    """A chunk of a tensor that ReLU6 overwrote in place: functionalizing the whole graph
    re-derives the chunk where each part is read, which pieces do not see."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU6(inplace=True)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1)
        self.head = nn.Linear(8 * 8 * 8, 5)

    def forward(self, x):
        y = self.relu(self.conv(x))
        a, b = torch.chunk(y, 2, dim=1)
        z = self.conv2(a)
        z += y
        z = torch.relu_(z) * b.sum()
        return self.head(torch.flatten(z, 1)), y


def test_a_viewed_storage_overwritten_in_place_is_traced_whole():
    stitcher, stitched, gm, inputs = stitch_small(Awkward())
    assert stitcher.fallbacks == ["a storage is both mutated and viewed across nodes"]
    assert memory_picture(stitched) == memory_picture(capture(gm, inputs))
    targets = [op.target for op in stitched.ops]
    assert targets.count("aten.split_with_sizes.default") == 2  # what pieces would miss


def test_a_stitching_bug_costs_a_whole_trace_not_a_crash(monkeypatch):
    """Pieces only save time: an unexpected failure while splicing (a stitcher bug, as the
    tensor getitem was) falls back to the whole trace, and says why."""
    def broken(*args):
        raise TypeError("'_Tensor' object is not subscriptable")

    monkeypatch.setattr(stitch, "_splice", broken)
    stitcher, stitched, gm, inputs = stitch_small(Ghost())
    failure = "stitching failed (TypeError: '_Tensor' object is not subscriptable)"
    assert stitcher.fallbacks == [failure]
    assert memory_picture(stitched) == memory_picture(fast_capture(gm, inputs))


@pytest.mark.parametrize("kernel", [1, 3])
def test_fdt_partial_sums_stitch_to_the_exported_graph(kernel):
    """A 1x1 tail multiplies each partition into the accumulator (`PartialSum`, `addmm` with
    `out=` a view of it); a 3x3 tail adds partial sums in place (`Accumulate`, `add_`)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 32, 1), nn.ReLU(),
                          nn.Conv2d(32, 4, kernel, padding=kernel // 2)).eval()
    inputs = (torch.randn(1, 4, 8, 8),)
    gm = propagate_shapes(trace(model), inputs)
    tiled = propagate_shapes(apply_fdt(gm, fdt_path(gm, "_0"), 4), inputs)
    assert ("accumulate" in tiled.code) == (kernel == 3)
    stitcher = stitch.Stitcher()
    stitched = stitcher(tiled, inputs)
    assert not stitcher.fallbacks
    assert memory_picture(stitched) == memory_picture(capture(tiled, inputs))


def test_discovery_traces_only_the_nodes_a_rewrite_made(monkeypatch):
    """Each candidate used to be traced whole (`fast_capture`: about 3.5 CPU s on mobilenet_v2
    with FFMT tiles); now a trace holds only nodes not traced before."""
    from memtile.tiling import stitch

    traced = []
    real = stitch.trace_functional
    monkeypatch.setattr(stitch, "trace_functional",
                        lambda module, *a, **k: traced.append(module) or real(module, *a, **k))
    monkeypatch.setattr(capture_module, "trace_functional",
                        lambda module, *a, **k: traced.append(module) or real(module, *a, **k))
    model = nn.Sequential(nn.Conv2d(4, 64, 1), nn.ReLU(), nn.Conv2d(64, 4, 1),
                          nn.Conv2d(4, 48, 1), nn.ReLU(), nn.Conv2d(48, 4, 1)).eval()
    _, report = tile(model, torch.randn(1, 4, 16, 16), methods=("fdt",))
    assert report.steps and traced
    assert not any(isinstance(m, capture_module._FlatOutputs) for m in traced)
    original = [n.target for m in traced for n in m.graph.nodes
                if n.op == "call_module" and n.target in {"0", "2", "3", "5"}]
    assert original and len(original) == len(set(original))  # each traced once at most


def test_discovery_exports_nothing(monkeypatch):
    """Every candidate used to be exported again (about 2x fast_capture's CPU time each), then
    the original was; all are stitched from pieces now."""
    calls = []
    real = torch.export.export
    monkeypatch.setattr(torch.export, "export", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 64, 1), torch.nn.ReLU(),
                                torch.nn.Conv2d(64, 4, 1)).eval()
    _, report = tile(model, torch.randn(1, 4, 16, 16), methods=("fdt",))
    assert report.steps and not calls


class TiedAndUnsaved(nn.Module):
    """One convolution's weight used twice and a non-persistent buffer: the placeholders and
    state of a program made from a stitched graph must still line up."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.again = nn.Conv2d(3, 3, 3, padding=1)
        self.again.weight = self.conv.weight
        self.register_buffer("shift", torch.linspace(-1, 1, 3).view(1, 3, 1, 1), persistent=False)

    def forward(self, x):
        return (self.again(self.conv(x).relu()) + self.shift,)


@pytest.mark.parametrize("model", [InPlace(), TiedAndUnsaved()], ids=["in_place", "tied"])
def test_stitched_graph_becomes_the_exported_program_without_a_trace(model, monkeypatch):
    """`StitchedGraph.exported_program` (what `memtile export --tile` lowers) computes what the
    model computes and holds the ops `capture` exports, with nothing traced again."""
    stitcher, stitched, _, inputs = stitch_small(model)
    assert isinstance(stitched, stitch.StitchedGraph) and not stitcher.fallbacks
    monkeypatch.setattr(torch.export, "export", lambda *a, **k: pytest.fail("traced again"))
    program = stitched.exported_program(inputs)
    monkeypatch.undo()
    ops, tensors, buffers = memory_picture(MemGraph(program))
    want_ops, want_tensors, want_buffers = memory_picture(capture(model, inputs))
    assert (ops, buffers) == (want_ops, want_buffers)
    assert ([t for t in tensors if t[3] != "parameter"]  # unused weights are left out
            == [t for t in want_tensors if t[3] != "parameter"])
    with torch.no_grad():
        torch.testing.assert_close(program.module()(*inputs), model(*inputs))

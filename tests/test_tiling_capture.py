"""Discovery re-plans its rewrites with `fast_capture`: the planner must see torch.export's graph."""

import pytest
import torch

from memtile import lifetimes, zoo
from memtile.capture import MemGraph, capture, fast_capture
from memtile.tiling import tile
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


def test_discovery_exports_only_the_original_model(monkeypatch):
    """Every candidate used to be exported again (about 2x fast_capture's CPU time each)."""
    calls = []
    real = torch.export.export
    monkeypatch.setattr(torch.export, "export", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 64, 1), torch.nn.ReLU(),
                                torch.nn.Conv2d(64, 4, 1)).eval()
    _, report = tile(model, torch.randn(1, 4, 16, 16), methods=("fdt",))
    assert report.steps and len(calls) == 1

"""The kernel passes alone (`memtile.runtime.kernels`): selection from the graph, then the check
pass's report, without building a PlannedModule."""

import torch
from torch import nn

from memtile.capture import capture
from memtile.runtime import convolution
from memtile.runtime.kernels import check_kernels, select_kernels
from memtile.runtime.layout import channels_last_strides, channels_last_tensors
from memtile.runtime.outvariants import OutVariant

aten = torch.ops.aten


def conv_net():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 8 * 8, 4)).eval()
    return model, (torch.randn(2, 3, 8, 8),)


def passes(layout: str, replace: dict | None = None):
    """(graph, variants, report) of conv_net under `layout`; `replace` swaps candidates."""
    model, inputs = conv_net()
    graph = capture(model, inputs)
    constants = {spec.arg.name: graph.program.state_dict[spec.target]
                 for spec in graph.program.graph_signature.input_specs if spec.target}
    variants, unplanned = select_kernels(graph, constants, layout, torch.device("cpu"), True)
    variants.update(replace or {})
    channels_last = channels_last_tensors(
        graph, layout, any(convolution.is_into(v) for v in variants.values()))
    order = list(range(len(graph.ops)))
    report = check_kernels(graph, order, variants, {}, constants, channels_last, inputs)
    return graph, variants, unplanned, channels_last, report


def test_selection_depends_on_the_layout_and_skips_views():
    """"auto": the convolution goes through oneDNN into its slot; "eager": ATen's
    convolution.out (bit-exact). Views (flatten) are no candidates and have no reason."""
    graph, auto, unplanned, _, _ = passes("auto")
    _, eager, _, _, _ = passes("eager")
    by_target = {op.target: op.node.name for op in graph.ops}
    conv = by_target["aten.convolution.default"]
    assert convolution.is_into(auto[conv]) and not convolution.is_into(eager[conv])
    view = by_target["aten.view.default"]
    assert view not in auto and view not in unplanned


def test_the_report_keeps_checked_kernels_and_gives_every_tensor_its_strides():
    graph, variants, _, channels_last, report = passes("auto")
    assert set(report.planned) == set(variants) and not report.unplanned
    for op in graph.ops:
        if op.is_view:
            continue
        for name in op.outputs:
            expected = graph.tensors[name].shape
            assert name in report.strides
            if name in channels_last:
                assert report.strides[name] == channels_last_strides(expected)


def test_a_kernel_that_differs_is_refused_with_its_reason():
    """A ReLU 'computed' as clamp_min(x, 1): the check pass measures the difference and leaves
    it unplanned, saying by how much."""
    graph, _, _, _, _ = passes("auto")
    relu = next(op.node.name for op in graph.ops if op.target == "aten.relu.default")
    wrong = OutVariant(aten.clamp_min.out, ("out",), lambda args, kwargs: ((args[0], 1.0), {}))
    _, _, _, _, report = passes("auto", {relu: wrong})
    assert relu not in report.planned
    assert "differs from the functional op" in report.unplanned[relu]


def test_a_kernel_that_writes_nan_is_refused():
    """clamp_min(x, nan) writes NaN everywhere: its error against the finite ReLU is inf, not
    NaN (which compares below any tolerance and was planned)."""
    graph, _, _, _, _ = passes("auto")
    relu = next(op.node.name for op in graph.ops if op.target == "aten.relu.default")
    nan = OutVariant(aten.clamp_min.out, ("out",),
                     lambda args, kwargs: ((args[0], float("nan")), {}))
    _, _, _, _, report = passes("auto", {relu: nan})
    assert relu not in report.planned
    assert "differs from the functional op by inf" in report.unplanned[relu]

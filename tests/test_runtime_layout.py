"""Layout propagation: which planned tensors are channels_last, and calls that stay correct."""

import pytest
import torch
from torch import nn

from memtile import zoo
from memtile.capture import capture
from memtile.runtime import PlannedModule
from memtile.runtime.layout import channels_last_strides, channels_last_tensors


def conv_relu_flatten():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 8 * 8, 10)).eval()
    return model, (torch.randn(2, 3, 8, 8),)


def test_a_view_read_keeps_its_storage_in_eager_layout():
    """flatten reads relu's output through a view: relu stays NCHW, the convolution and batch
    norm before it are channels_last."""
    model, inputs = conv_relu_flatten()
    graph = capture(model, inputs)
    names = {op.target: op.outputs[0] for op in graph.ops}
    conv = names["aten.convolution.default"]
    norm = names["aten._native_batch_norm_legit_no_training.default"]
    assert channels_last_tensors(graph, "channels_last", True) == {conv, norm}
    assert channels_last_tensors(graph, "auto", True) == {conv, norm}
    assert channels_last_tensors(graph, "eager", True) == set()
    assert channels_last_tensors(graph, "auto", False) == set()  # no convolution to plan


@pytest.mark.parametrize("layout", ["auto", "channels_last"])
def test_flatten_after_channels_last_convolution_is_correct(layout):
    """The planned call writes the convolution in channels_last and reads relu's NCHW output
    through flatten. The schedule lets batch norm overwrite the convolution and relu overwrite
    batch norm in place; relu's pair is dropped (its layout differs), the other kept. The
    logits equal eager's up to the convolution's rounding."""
    model, inputs = conv_relu_flatten()
    module = PlannedModule(model, inputs, layout=layout)
    program = module.main
    conv = next(op.outputs[0] for op in program.graph.ops
                if op.target == "aten.convolution.default")
    assert any(name.startswith("convolution") for name in program.planned)
    assert program._strides[conv] == channels_last_strides((2, 8, 8, 8))
    assert program.shared == {"_native_batch_norm_legit_no_training.0": "convolution"}
    with torch.no_grad():
        expected = model(*inputs)
    got = module(*inputs)
    assert float((got - expected).abs().max()) <= 1e-5 * float(expected.abs().max())


def test_four_d_outputs_are_returned_in_the_eager_layout():
    """A model ending in a convolution: its output is the caller's, NCHW as eager returns it.
    The last convolution cannot write NCHW into a given buffer without a temporary the size of
    its output (refused by measurement, though that is under oneDNN's fixed workspace
    allowance on top of the output), so it runs unplanned and its result is restrided."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 4, 3, padding=1)).eval()
    inputs = (torch.randn(2, 3, 64, 64),)
    module = PlannedModule(model, inputs)
    with torch.no_grad():
        expected = model(*inputs)
    got = module(*inputs)
    assert got.is_contiguous() and got.stride() == expected.stride()
    assert float((got - expected).abs().max()) <= 1e-5 * float(expected.abs().max())
    planned = [name for name in module.main.planned if name.startswith("convolution")]
    assert planned == ["convolution"]  # the first; the second makes the output


def test_an_unplanned_convolution_of_an_nchw_input_is_restrided():
    """Without packed weights, resnet8's first convolution (3-channel NCHW model input) allocates
    more than its output at every call, so it is refused by measurement and runs unplanned: it
    returns NCHW, and the executor converts it to the channels_last its planned readers were
    checked with (batch norm's out= kernel computes wrong values from an NCHW input into a
    channels_last out=). The other convolutions are planned (their per-call weight reorder is
    allowed scratch)."""
    model, inputs = zoo.get("resnet8_cifar")
    module = PlannedModule(model, inputs, pack_weights=False)
    assert module.packed_bytes == 0
    convolutions = [op.node.name for op in module.main.graph.ops
                    if op.target == "aten.convolution.default"]
    assert [n for n in convolutions if n in module.main.unplanned] == ["convolution"]
    assert "restride to the planned layout" in module.source
    with torch.no_grad():
        expected = model(*inputs)
    got = module(*inputs)
    assert float((got - expected).abs().max()) <= 1e-5 * float(expected.abs().max())


class GhostConcat(nn.Module):
    """timm ghostnet's module: `cat([primary, cheap])[:, :out]`, a no-op slice that export
    writes as `aten.alias`, read by the next convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.primary = nn.Conv2d(3, 8, 1)
        self.cheap = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.after = nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x):
        a = self.primary(x)
        return self.after(torch.cat([a, self.cheap(a)], 1)[:, :16]).relu()


def test_a_storage_read_through_alias_can_be_channels_last():
    """Before: the cat stayed NCHW, so the convolution reading it ran unplanned, converting its
    input to channels_last in a temporary of the input's size at every call."""
    torch.manual_seed(0)
    model, inputs = GhostConcat().eval(), (torch.randn(1, 3, 16, 16),)
    graph = capture(model, inputs)
    assert "aten.alias.default" in {op.target for op in graph.ops}
    cat = next(op.outputs[0] for op in graph.ops if op.target == "aten.cat.default")
    assert cat in channels_last_tensors(graph, "auto", True)
    planned = PlannedModule(model, inputs)
    assert planned.unplanned_ops == []
    with torch.no_grad():
        want = model(*inputs)
        assert ((planned(*inputs) - want).abs().max() / want.abs().max()) <= 1e-5

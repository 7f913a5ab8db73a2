"""The shared fx trace drops static shape checks (timm's `_assert(x.ndim == 4)`) and nothing else."""

import pytest
import torch
from torch import nn

from memtile.errors import UnsupportedOpError
from memtile.spatial import SpatialGraph
from memtile.trace import trace


class CheckedConv(nn.Module):
    """A conv that asserts its input rank and reads its shape, like timm's norm layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        torch._assert(x.ndim == 4, "expected 4D input")
        y = self.conv(x)
        torch._assert(y.shape[1] == 4, "channels")
        return torch.relu(y)


def _targets(gm) -> list:
    return [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")]


def test_shape_checks_are_removed_and_the_function_is_kept():
    model = CheckedConv().eval()
    gm = trace(model)
    assert torch._assert not in _targets(gm)
    assert getattr not in _targets(gm)
    assert _targets(gm) == [torch.relu]
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


def test_spatial_analysis_sees_through_shape_checks():
    graph = SpatialGraph(CheckedConv().eval())  # before: "getattr ... not a supported spatially local op"
    assert graph.gm is not None


def test_untraceable_model_gets_a_clear_error():
    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(UnsupportedOpError, match="could not trace Branchy"):
        trace(Branchy())


class StrideChecked(nn.Module):
    """Python control flow on the input's size, like smp's `if h % output_stride != 0`, and a
    shape read that reaches an op's argument (an upsample back to the input's size)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.up = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        h, w = x.shape[-2:]
        if h % 2 != 0 or w % 2 != 0:
            raise ValueError("needs even sizes")
        y = self.up(torch.relu(self.down(x)))
        return nn.functional.interpolate(y, size=(h, w)) + x


def test_control_flow_on_shapes_traces_with_example_inputs():
    model = StrideChecked().eval()
    with pytest.raises(UnsupportedOpError, match="could not trace StrideChecked"):
        trace(model)
    x = torch.randn(1, 3, 8, 12)
    gm = trace(model, (x,))
    assert not any(n.op == "get_attr" for n in gm.graph.nodes)  # no module ran twice as constants
    for sample in (x, torch.randn_like(x)):
        torch.testing.assert_close(gm(sample), model(sample), rtol=0, atol=0)


def test_a_module_called_while_a_value_is_computed_is_recorded_once():
    """Values are computed by running each leaf module on fake tensors while fx's patches are on:
    that call must not be traced again (it was, as a dead copy of the encoder fed a constant)."""
    model = StrideChecked().eval()
    gm = trace(model, (torch.randn(1, 3, 8, 8),))
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert calls == ["down", "up"]


@pytest.mark.parametrize("arch", ["FPN", "Linknet", "DeepLabV3Plus"])
def test_segmentation_models_trace_at_their_input_shape(arch):
    from memtile import zoo

    model, inputs = zoo.get(f"smp:{arch}:resnet18")
    with pytest.raises(UnsupportedOpError):
        trace(model)
    gm = trace(model, inputs)
    with torch.no_grad():
        expected, actual = model(*inputs), gm(*inputs)
    assert float((actual - expected).abs().max()) <= 1e-6 * float(expected.abs().max())

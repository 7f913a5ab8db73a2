"""PlannedModule on what used to give a wrong answer or a traceback: weights updated in place
after construction, models with side effects, and graph nodes that return nothing (issue 15,
items 4, 11 and 12)."""

import re

import pytest
import torch
from torch import nn

from memtile import zoo
from memtile.cli import main
from memtile.errors import UnsupportedOpError
from memtile.runtime import PlannedModule
from memtile.runtime.outvariants import relative_error

CONV_TOLERANCE = 1e-5  # the planned convolution's, as in test_runtime


def eager(model, inputs):
    with torch.no_grad():
        return model(*inputs)


@pytest.mark.parametrize("kwargs", [{}, {"fuse": False}])
def test_packed_weights_follow_in_place_updates(kwargs):
    """resnet8_cifar: a convolution weight, a batch norm's running variance and its affine
    weight, each updated in place under no_grad after construction (as an optimizer step or
    load_state_dict does): the packed and folded copies are recomputed before the next call,
    and the outputs are eager's again (they were 0.15 off)."""
    model, inputs = zoo.get("resnet8_cifar")
    module = PlannedModule(model, inputs, **kwargs)
    assert module.packed_bytes > 0  # the test is about packed copies
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        convs[1].weight.mul_(1.5)
        norms[2].running_var.mul_(3.0)
        norms[3].weight.add_(0.5)
    expected = eager(model, inputs)
    assert relative_error(expected, module(*inputs)) <= CONV_TOLERANCE
    assert relative_error(expected, module(*inputs)) <= CONV_TOLERANCE  # refreshed once
    model.load_state_dict(zoo.get("resnet8_cifar")[0].state_dict())
    assert relative_error(eager(model, inputs), module(*inputs)) <= CONV_TOLERANCE


class Casts(nn.Module):
    """`.to(float32)` and `.float()` on float32 tensors: torch.export records them as
    `aten._assert_tensor_metadata` nodes that return nothing and carry no meta['val']."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x.to(torch.float32))).float() * 2


@pytest.mark.parametrize("layout", ["auto", "eager"])
def test_nodes_that_return_nothing_run_unplanned(layout):
    """The executor crashed on them with KeyError 'val' (both layouts); now they run as
    steps, are not listed as unplanned ops (they allocate nothing) and outputs match eager."""
    model, inputs = Casts().eval(), (torch.randn(2, 3, 16, 16),)
    module = PlannedModule(model, inputs, layout=layout)
    asserts = [n for n in module.main.graph.program.graph.nodes
               if str(n.target) == "aten._assert_tensor_metadata.default"]
    assert len(asserts) == 2 and all("val" not in n.meta for n in asserts)
    assert all("assert" not in op for op, _ in module.unplanned_ops)
    assert relative_error(eager(model, inputs), module(*inputs)) <= CONV_TOLERANCE


class InputWriter(nn.Module):
    def forward(self, x):
        x.mul_(2)
        return x + 1


class Counter(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(1))

    def forward(self, x):
        self.calls.add_(1)
        return x * self.calls


def input_writer():
    return InputWriter(), (torch.randn(1, 3, 8, 8),)


def counter():
    return Counter(), (torch.randn(1, 3, 8, 8),)


@pytest.mark.parametrize("model, message", [
    (InputWriter(), "writes into its input 'x' in place"),
    (Counter(), "updates buffer 'calls' in place"),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4)).train(),
     "BatchNorm '1' (and 1 more) is in train mode"),
])
def test_side_effects_are_refused_at_construction(model, message):
    """The executor returns only the model's outputs, so it would drop these writes (and failed
    at the first call with a pytree ValueError): refused, in one line."""
    with pytest.raises(UnsupportedOpError, match=re.escape(message)) as refused:
        PlannedModule(model, (torch.randn(2, 3, 8, 8),))
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("command", [["run", "--iters", "1"], ["report"]])
@pytest.mark.parametrize("factory", ["input_writer", "counter"])
def test_cli_refuses_side_effects_in_one_line(capsys, tmp_path, command, factory):
    """`memtile run` and `report` on them: one error line on stderr (after the report's
    progress lines for the sections that can run: profile and plan), exit 2, no report files."""
    argv = [command[0], f"test_runtime_hardening:{factory}", *command[1:]]
    if command[0] == "report":
        argv += ["--out", str(tmp_path / "report")]
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "✓" not in line]
    assert len(err) == 1 and f"memtile {command[0]}: error:" in err[0] and "in place" in err[0]
    assert not list(tmp_path.glob("report/*"))


def test_relative_error_sees_non_finite_values():
    """NaN or ±Inf where the other side has another value is an infinite error; the same
    non-finite values in the same places leave the finite ones to compare."""
    from memtile.runtime.outvariants import relative_error

    expected = torch.tensor([1.0, 2.0, float("nan"), float("inf")])
    assert relative_error(expected, expected.clone()) == 0.0
    close = torch.tensor([1.0, 2.5, float("nan"), float("inf")])
    assert relative_error(expected, close) == 0.25
    for other in ([1.0, 2.0, 3.0, float("inf")], [1.0, float("nan"), float("nan"), float("inf")],
                  [1.0, 2.0, float("nan"), -float("inf")], [1.0, 2.0, float("nan"), 5.0]):
        assert relative_error(expected, torch.tensor(other)) == float("inf")
        assert relative_error(torch.tensor(other), expected) == float("inf")

"""Property: PlannedModule puts NaN and Inf exactly where eager does (issue 15, item 1).

oneDNN's relu/hardtanh post-ops turned NaN into 0 (or 6) inside fused convolutions, so a NaN in
the input vanished from the planned output while eager kept it. Inputs here are the zoo's
example inputs with NaN, +Inf and -Inf written at random positions (hypothesis, derandomized
in conftest); the non-finite outputs must match eager's position for position, and the finite
ones stay within the convolution tolerance (bit-exact with `layout="eager"`).
"""

from functools import cache

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memtile import zoo
from memtile.runtime import PlannedModule
from memtile.runtime.outvariants import relative_error

CONV_TOLERANCE = 1e-5  # the planned convolution's, as in test_runtime
MODELS = ["resnet8_cifar", "mobilenet_v2_035_144", "ds_cnn_kws"]
LAYOUTS = ["auto", "eager"]
SPECIAL = [float("nan"), float("inf"), -float("inf")]


@cache
def planned(name: str, layout: str) -> tuple:
    """(model, example input, PlannedModule): built once per model and layout."""
    model, (x,) = zoo.get(name)
    return model, x, PlannedModule(model, (x,), layout=layout)


def sprinkled(x: torch.Tensor, positions: list[int], kinds: list[int]) -> torch.Tensor:
    y = x.clone()
    flat = y.view(-1)
    for position, kind in zip(positions, kinds, strict=False):
        flat[position % flat.numel()] = SPECIAL[kind]
    return y


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", MODELS)
@settings(max_examples=8, deadline=None)
@given(positions=st.lists(st.integers(0, 2**31), min_size=1, max_size=40),
       kinds=st.lists(st.integers(0, len(SPECIAL) - 1), min_size=1, max_size=40))
def test_non_finite_outputs_are_where_eager_puts_them(name, layout, positions, kinds):
    model, x, module = planned(name, layout)
    y = sprinkled(x, positions, kinds)
    with torch.no_grad():
        expected = model(y)
    got = module(y)
    assert torch.equal(expected.isnan(), got.isnan())
    assert torch.equal(expected == float("inf"), got == float("inf"))
    assert torch.equal(expected == -float("inf"), got == -float("inf"))
    finite = expected.isfinite()
    tolerance = 0.0 if layout == "eager" else CONV_TOLERANCE
    assert relative_error(expected[finite], got[finite]) <= tolerance


@pytest.mark.parametrize("name", MODELS)
def test_one_nan_reaches_the_output(name):
    """The case the issue measured: one NaN in the input; eager's output has NaN (so the
    property above is not vacuous for this model) and the planned output has it too."""
    model, x, module = planned(name, "auto")
    for position in range(0, x.numel(), max(1, x.numel() // 7)):
        y = sprinkled(x, [position], [0])
        with torch.no_grad():
            expected = model(y)
        assert expected.isnan().any()
        assert torch.equal(expected.isnan(), module(y).isnan())

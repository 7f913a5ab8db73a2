"""Equivalence check of a tiled model against the original: max abs error and output scale.

Every rewrite is checked before it is returned (DESIGN: never return a silently wrong result).
Tiles change the order of float32 sums, so a deep model's tiled output can differ from eager by
more than 1e-5 of its scale while computing the same function; eager float32 is itself that far
from exact arithmetic there. Such a rewrite is checked again with both models in float64, where a
real mistake still shows at full size and rounding does not.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import nn

from memtile.numerics import float64_outputs, relative_difference

RELATIVE_TOLERANCE = 1e-5
FLOAT64_TOLERANCE = 1e-10  # float64 rounding after ~100 layers is ~1e-14


def _flat_outputs(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    return [t for item in value for t in _flat_outputs(item)]


class Reference:
    """A model's outputs on fixed inputs, computed once (in float64 only when needed): discovery
    checks every candidate rewrite against the same original model."""

    def __init__(self, model: nn.Module, inputs: Sequence[torch.Tensor]):
        self.model, self.inputs = model, tuple(inputs)

    @functools.cached_property
    def outputs(self) -> list[torch.Tensor]:
        with torch.no_grad():
            return _flat_outputs(self.model(*self.inputs))

    @functools.cached_property
    def float64(self):
        return float64_outputs(self.model, self.inputs)

    def compare(self, tiled: nn.Module) -> tuple[float, float]:
        """(max abs error, output scale = max |reference output|) over all outputs."""
        with torch.no_grad():
            actual = _flat_outputs(tiled(*self.inputs))
        error = max(float((a - e).abs().max()) for a, e in zip(actual, self.outputs, strict=True))
        return error, max(float(e.abs().max()) for e in self.outputs)

    def check(self, tiled: nn.Module) -> tuple[bool, float, float]:
        """(whether `tiled` matches, its float32 max abs error, the output scale): within
        RELATIVE_TOLERANCE in float32, or else within FLOAT64_TOLERANCE in float64. `tiled` runs
        once in float32, and once more in float64 only when float32 is beyond the tolerance."""
        error, scale = self.compare(tiled)
        if equivalent(error, scale):
            return True, error, scale
        difference = relative_difference(float64_outputs(tiled, self.inputs), self.float64)
        return difference <= FLOAT64_TOLERANCE, error, scale

    def matches(self, tiled: nn.Module) -> bool:
        """Within RELATIVE_TOLERANCE in float32, or else within FLOAT64_TOLERANCE in float64."""
        return self.check(tiled)[0]


def compare(reference: nn.Module, tiled: nn.Module, inputs: Sequence[torch.Tensor]) -> tuple[float, float]:
    """(max abs error, output scale = max |reference output|) over all outputs, run without grad."""
    return Reference(reference, inputs).compare(tiled)


def equivalent(error: float, scale: float) -> bool:
    """Max abs error within RELATIVE_TOLERANCE of the output scale."""
    return error <= RELATIVE_TOLERANCE * max(scale, 1e-30)


def equivalent_models(reference: nn.Module, tiled: nn.Module, inputs: Sequence[torch.Tensor]) -> bool:
    """Within RELATIVE_TOLERANCE in float32, or else within FLOAT64_TOLERANCE in float64."""
    return Reference(reference, inputs).matches(tiled)

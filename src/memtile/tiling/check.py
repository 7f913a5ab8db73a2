"""Equivalence check of a tiled model against the original: max abs error and output scale.

Every rewrite is checked before it is returned (DESIGN: never return a silently wrong result).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

RELATIVE_TOLERANCE = 1e-5


def _flat_outputs(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    return [t for item in value for t in _flat_outputs(item)]


def compare(reference: nn.Module, tiled: nn.Module, inputs: Sequence[torch.Tensor]) -> tuple[float, float]:
    """(max abs error, output scale = max |reference output|) over all outputs, run without grad."""
    with torch.no_grad():
        expected = _flat_outputs(reference(*inputs))
        actual = _flat_outputs(tiled(*inputs))
    error = max(float((a - e).abs().max()) for a, e in zip(actual, expected, strict=True))
    scale = max(float(e.abs().max()) for e in expected)
    return error, scale


def equivalent(error: float, scale: float) -> bool:
    """Max abs error within RELATIVE_TOLERANCE of the output scale."""
    return error <= RELATIVE_TOLERANCE * max(scale, 1e-30)

"""When is a transformed model's output the same as eager's? One rule for export, run and tests.

Outputs are compared by relative difference: max |got - eager| over max |eager|, per tensor, NaN
and Inf required at the same places with the same values. Within TOLERANCE (1e-5) they agree.

A deep float32 network is itself 1e-5 to 1e-4 away from exact arithmetic (googlenet: 1.2e-5 from
float64), so any change of summation order (oneDNN's layouts, tiles, ExecuTorch's portable
kernels) can exceed 1e-5 against eager while computing the same function. Such an output is then
measured against the model in float64: it agrees when it is no farther from float64 than
ROUNDING_FACTOR times eager float32's own distance. A real mistake (a wrong weight, a lost halo)
is orders of magnitude above both, so this forgives rounding and nothing else.

Eager float32 is measured in both of PyTorch's ordinary CPU layouts for images: the model's own
(usually NCHW) and channels_last, whose convolutions sum in another order. Both compute the same
function, and either may be the farther from float64 (timm's vovnet39a at 224²: NCHW 1.0e-5,
channels_last 3.5e-5; memtile's planned executor, channels_last, 2.6e-5), so the rounding
allowed is that of the farther one.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.utils._pytree import tree_flatten, tree_map

TOLERANCE = 1e-5
ROUNDING_FACTOR = 2.0


def relative_difference(got, expected) -> float:
    """Largest |got - expected| over each tensor's largest finite |expected|, for tensors or
    tuples, lists and dicts of them; inf when structures, shapes or non-finite values differ."""
    have, have_spec = tree_flatten(got)
    want, want_spec = tree_flatten(expected)
    if have_spec != want_spec:
        return float("inf")
    worst = 0.0
    for a, b in zip(have, want, strict=True):
        if not isinstance(b, torch.Tensor):
            continue
        if not isinstance(a, torch.Tensor) or a.shape != b.shape:
            return float("inf")
        worst = max(worst, _tensor_difference(a.detach().double(), b.detach().double()))
    return worst


def _tensor_difference(got: torch.Tensor, want: torch.Tensor) -> float:
    finite = torch.isfinite(want)
    if not torch.equal(finite, torch.isfinite(got)):
        return float("inf")
    if not torch.equal(got[~finite].nan_to_num(), want[~finite].nan_to_num()):
        return float("inf")
    if not finite.any():
        return 0.0
    scale = want[finite].abs().max().clamp_min(torch.finfo(torch.float32).tiny)
    return float((got[finite] - want[finite]).abs().max() / scale)


@dataclass(frozen=True)
class Agreement:
    """How far a transformed output is from eager float32 and, when that exceeds TOLERANCE, from
    float64 arithmetic, beside eager float32's own distance from it."""

    vs_eager: float
    vs_float64: float | None = None
    eager_vs_float64: float | None = None
    channels_last_vs_float64: float | None = None  # eager in channels_last; None: no 4-D input

    @property
    def equivalent(self) -> bool:
        if self.vs_eager <= TOLERANCE:
            return True
        if self.vs_float64 is None or self.eager_vs_float64 is None:
            return False
        rounding = max(self.eager_vs_float64, self.channels_last_vs_float64 or 0.0, TOLERANCE / 10)
        return self.vs_float64 <= ROUNDING_FACTOR * rounding

    def as_dict(self) -> dict:
        return {"max_rel_diff": self.vs_eager, "float64_rel_diff": self.vs_float64,
                "eager_float64_rel_diff": self.eager_vs_float64,
                "eager_channels_last_float64_rel_diff": self.channels_last_vs_float64,
                "equivalent": self.equivalent}


def agreement(got, model: torch.nn.Module | Callable, inputs: Sequence[torch.Tensor],
              expected=None) -> Agreement:
    """Compare `got` (the transformed model's output on `inputs`) with `model`'s.

    `expected` is eager's float32 output when the caller has it already. The float64 rerun
    happens only when the float32 difference exceeds TOLERANCE, and only for an `nn.Module`.
    """
    if expected is None:
        with torch.no_grad():
            expected = model(*inputs)
    vs_eager = relative_difference(got, expected)
    if vs_eager <= TOLERANCE or vs_eager == float("inf") or not isinstance(model, torch.nn.Module):
        return Agreement(vs_eager)
    exact = float64_outputs(model, inputs)
    channels_last = channels_last_outputs(model, inputs)
    return Agreement(vs_eager, relative_difference(_widen(got), exact),
                     relative_difference(_widen(expected), exact),
                     None if channels_last is None else relative_difference(_widen(channels_last), exact))


def channels_last_outputs(model: torch.nn.Module, inputs: Sequence[torch.Tensor]):
    """Eager float32 outputs with the model's weights and 4-D inputs in channels_last (a deep
    copy), or None when no input is 4-D (the layout then changes nothing)."""
    if not any(isinstance(x, torch.Tensor) and x.dim() == 4 for x in inputs):
        return None
    wide = tuple(x.contiguous(memory_format=torch.channels_last)
                 if isinstance(x, torch.Tensor) and x.dim() == 4 else x for x in inputs)
    with torch.no_grad():
        return copy.deepcopy(model).to(memory_format=torch.channels_last)(*wide)


def float64_outputs(model: torch.nn.Module, inputs: Sequence[torch.Tensor]):
    """The model's outputs in float64 arithmetic (a deep copy; the model is left as it is)."""
    with torch.no_grad():
        return copy.deepcopy(model).double()(*_widen(tuple(inputs)))


def _widen(value):
    return tree_map(lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t,
                    value)

"""Frozen BatchNorm by construction: eval semantics that no mode switch or trace can undo.

Row bands cannot share batch statistics, so row-centric training runs BatchNorm with its running
statistics. Switching layers to eval mode is not enough: a module that fx traces through (timm's
`BatchNormAct2d`) bakes `training=True` into the traced graph, and `model.train()` switches it
back. Replacing every BatchNorm by `FrozenBatchNorm2d` (sharing its parameters and statistics)
before tracing makes the banded model and ordinary training of the frozen model compute the same
function, whatever mode either is in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from memtile.errors import UnsupportedOpError


class FrozenBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d that always normalizes with its running statistics and never updates them.

    Its parameters stay trainable. It is a leaf of `memtile.trace` (one node per layer).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            False, 0.0, self.eps)


class FrozenBatchNormAct2d(FrozenBatchNorm2d):
    """timm's `BatchNormAct2d` frozen: the norm, then its own dropout and activation modules."""

    def __init__(self, num_features: int, drop: nn.Module, act: nn.Module, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.drop, self.act = drop, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


def freeze(model: nn.Module) -> list[str]:
    """Replace every BatchNorm2d in `model` (in place) by a frozen one; return the replaced
    layers' type names (sorted, once each).

    The replacement shares the original's parameter and buffer tensors, so an optimizer built
    on `model.parameters()` stays valid and the state dict keeps its keys. A norm whose
    activation and dropout are identities becomes a plain `FrozenBatchNorm2d`.
    """
    replaced = set()
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.BatchNorm2d) or isinstance(module, FrozenBatchNorm2d):
            continue
        if not name:
            raise UnsupportedOpError("freeze() replaces the norms inside a model; give it the model")
        if module.running_mean is None or module.running_var is None:
            raise UnsupportedOpError(f"layer {name!r} ({type(module).__name__}) tracks no "
                                     "running statistics, so it cannot be frozen for row bands")
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, _frozen(module))
        replaced.add(type(module).__name__)
    return sorted(replaced)


def _frozen(module: nn.BatchNorm2d) -> FrozenBatchNorm2d:
    drop = getattr(module, "drop", None)
    act = getattr(module, "act", None)
    extra = [m for m in (drop, act) if m is not None and not isinstance(m, nn.Identity)]
    if extra:
        out: FrozenBatchNorm2d = FrozenBatchNormAct2d(
            module.num_features, drop or nn.Identity(), act or nn.Identity(),
            eps=module.eps, affine=False, device="meta")
    else:
        out = FrozenBatchNorm2d(module.num_features, eps=module.eps, affine=False, device="meta")
    # share the original's tensors (affine=False built none; these may be None too)
    out.weight, out.bias = module.weight, module.bias
    out.running_mean, out.running_var = module.running_mean, module.running_var
    out.num_batches_tracked = module.num_batches_tracked
    out.affine = module.affine
    out.momentum = module.momentum
    return out.train(module.training)


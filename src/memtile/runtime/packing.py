"""Packed copies of a model's constants that follow in-place updates of the originals.

A planned convolution reads its weight reordered into oneDNN's format, and a folded batch norm
reads a weight and bias computed from five constants (`convolution`, `fusion`): copies made at
construction. An in-place update of the model's parameters or buffers afterwards (an optimizer
step, `load_state_dict`, `weight.mul_(2)` under no_grad) would leave them stale, a silently
wrong answer. Each copy records its sources' version counters (`Tensor._version`, bumped by
every in-place op); before each call the module compares their sum (counters only grow) and
recomputes the stale copies into the same tensors, so the compiled program, which holds them,
stays valid. Updates through `.data` bypass the version counter and are not seen.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from operator import attrgetter

import torch

_version = attrgetter("_version")


@dataclass(frozen=True)
class Packing:
    """`copies` computed by `compute()` from `sources` (the model's own tensors)."""

    sources: tuple[torch.Tensor, ...]
    compute: Callable[[], tuple[torch.Tensor, ...]]
    copies: tuple[torch.Tensor, ...]

    @classmethod
    def of(cls, sources: tuple[torch.Tensor | None, ...],
           compute: Callable[[], tuple[torch.Tensor, ...]]) -> Packing:
        """Compute the copies now; None sources (an absent bias) are left out."""
        return cls(tuple(s for s in sources if s is not None), compute, compute())


class Packings:
    """All packings of one program; `refresh()` brings the stale ones up to date."""

    def __init__(self, packings: list[Packing]):
        self.packings = packings
        self.versions = [tuple(map(_version, p.sources)) for p in packings]
        self.sources = tuple({id(s): s for p in packings for s in p.sources}.values())
        self.total = sum(map(_version, self.sources))

    def stale(self) -> bool:
        """Whether a source changed in place since the copies were computed (cheap: one sum)."""
        return sum(map(_version, self.sources)) != self.total

    def refresh(self) -> None:
        """Recompute, into the same tensors, every copy whose sources changed."""
        with torch.no_grad():
            for i, packing in enumerate(self.packings):
                versions = tuple(map(_version, packing.sources))
                if versions != self.versions[i]:
                    for copy, fresh in zip(packing.copies, packing.compute(), strict=True):
                        copy.copy_(fresh)
                    self.versions[i] = versions
        self.total = sum(map(_version, self.sources))

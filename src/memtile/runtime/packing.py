"""Packed copies of a model's constants that follow in-place updates of the originals.

A planned convolution reads its weight reordered into oneDNN's format, and a folded batch norm
reads a weight and bias computed from five constants (`convolution`, `fusion`): copies made at
construction. An in-place update of the model's parameters or buffers afterwards (an optimizer
step, `load_state_dict`, `weight.mul_(2)` under no_grad) would leave them stale, a silently
wrong answer. Each copy records its sources' version counters (`Tensor._version`, bumped by
every in-place op); before each call the module compares their sum (counters only grow) and
recomputes the stale copies into the same tensors, so the compiled program, which holds them,
stays valid. Updates through `.data` bypass the version counter and are not seen.

oneDNN picks a convolution weight's blocked format for the intra-op thread count it runs at
(e.g. a 1x1 256 -> 1024 convolution on 14x14 is `Acdb64a` at 2 threads, `Acdb48a` at 1). A weight
packed at one count and used at another is reordered at every call, by oneDNN's generic
`simple:any` reorder (measured 20-27 ms per call for that weight; resnet50 at batch 1 ran 1.9x
slower at 1 thread when built at 2). So the copies are made for the count they were built at,
and `repack(threads)` makes another set for another count (kept: a second copy's memory).
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
    """All packings of one program, packed at `threads` intra-op threads; `repack` makes the
    copies for another count, `refresh()` brings the stale ones up to date in every set."""

    def __init__(self, packings: list[Packing], threads: int):
        self.packings = packings
        self.threads = threads
        self.sets: dict[int, list[tuple[torch.Tensor, ...]]] = {threads: [p.copies for p in packings]}
        self.versions = [tuple(map(_version, p.sources)) for p in packings]
        self.sources = tuple({id(s): s for p in packings for s in p.sources}.values())
        self.total = sum(map(_version, self.sources))

    def repack(self, threads: int) -> dict[int, torch.Tensor]:
        """The copies for `threads` intra-op threads, the caller's count (oneDNN packs for the
        count it runs at): id of each copy of the first set -> its counterpart. Only copies in
        oneDNN's opaque layout differ per count; the others (a folded bias) are shared."""
        if threads not in self.sets:
            with torch.no_grad():
                self.sets[threads] = [
                    tuple(new if new.layout == torch._mkldnn else old
                          for old, new in zip(p.copies, p.compute(), strict=True))
                    for p in self.packings]
        return {id(old): new for first, other in zip(self.sets[self.threads], self.sets[threads],
                                                     strict=True)
                for old, new in zip(first, other, strict=True) if new is not old}

    def repacked_bytes(self) -> int:
        """Bytes of the copies made for other thread counts than the first."""
        first = {id(c) for copies in self.sets[self.threads] for c in copies}
        return sum(c.numel() * c.element_size() for count, sets in self.sets.items()
                   if count != self.threads for copies in sets for c in copies
                   if id(c) not in first)

    def stale(self) -> bool:
        """Whether a source changed in place since the copies were computed (cheap: one sum)."""
        return sum(map(_version, self.sources)) != self.total

    def refresh(self) -> None:
        """Recompute, into the same tensors of every set, each copy whose sources changed
        (`copy_` reorders into each copy's own format)."""
        with torch.no_grad():
            for i, packing in enumerate(self.packings):
                versions = tuple(map(_version, packing.sources))
                if versions != self.versions[i]:
                    fresh = packing.compute()
                    for copies in self.sets.values():
                        for copy, new in zip(copies[i], fresh, strict=True):
                            copy.copy_(new)  # a shared copy (a folded bias) twice: harmless
                    self.versions[i] = versions
        self.total = sum(map(_version, self.sources))

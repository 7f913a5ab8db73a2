"""`memtile.export`: an ExecuTorch program (.pte) whose planned memory is memtile's plan.

The model (optionally tiled first by `memtile.tile`) is captured once, put in memtile's op
order, lowered with ExecuTorch's `to_edge` / `to_executorch`, and ExecuTorch's memory-planning
pass is given memtile's planner as its only algorithm (`hook.MemtilePlanner`): it plans
ExecuTorch's own TensorSpecs, so copies or out-variant buffers that lowering adds are planned
too. The written file is then run by ExecuTorch's runtime against the eager model, and its
planned buffer sizes are read back and must equal memtile's arena.

ExecuTorch is the `export` extra; without it `export` raises ExecuTorchMissingError.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from memtile.errors import MemtileError
from memtile.numerics import TOLERANCE, Agreement

INSTALL = "pip install 'memtile[export]'"


class ExecuTorchMissingError(MemtileError):
    """ExecuTorch (the `export` extra) is not installed."""


def require_executorch() -> None:
    try:
        import executorch.exir
        import executorch.runtime  # noqa: F401
    except ImportError as error:
        raise ExecuTorchMissingError(
            f"memtile export needs ExecuTorch, which is not installed: {INSTALL}") from error


@dataclass
class ExportResult:
    """What `export` wrote and proved; `as_dict` is the CLI's `--json` object."""

    pte: str
    bytes: int
    planned_arena_bytes: int  # read back from the file: execution_plan[0].non_const_buffer_sizes
    memtile_arena_bytes: int  # memtile's plan of ExecuTorch's specs
    executorch_greedy_bytes: int  # the same edge program planned by ExecuTorch's default
    load_bytes: int  # LOAD of ExecuTorch's specs in this order: no plan can be smaller
    optimal: bool
    strategy: str
    alignment: int
    specs: int
    inplace_pairs: int
    max_rel_diff: float  # vs eager float32 on fresh inputs
    tiled: bool  # the .pte holds the tiled program (with --tile: only if its arena is smaller)
    steps: list = field(default_factory=list)  # what tiling found, also when not kept
    budget: int | None = None
    seconds: float = 0.0
    tile_seconds: float = 0.0
    untiled_arena_bytes: int = 0  # memtile's arena of the untiled program, for comparison
    float64_rel_diff: float | None = None  # only measured when max_rel_diff exceeds TOLERANCE
    eager_float64_rel_diff: float | None = None  # eager float32's own distance from float64
    eager_channels_last_float64_rel_diff: float | None = None  # the same in channels_last

    @property
    def agreement(self) -> Agreement:
        return Agreement(self.max_rel_diff, self.float64_rel_diff, self.eager_float64_rel_diff,
                         self.eager_channels_last_float64_rel_diff)

    @property
    def equivalent(self) -> bool:
        return self.agreement.equivalent

    @property
    def budget_met(self) -> bool:
        return self.budget is None or self.planned_arena_bytes <= self.budget

    def as_dict(self) -> dict:
        return {**asdict(self), "equivalent": self.equivalent, "budget_met": self.budget_met}


def export(
    model: torch.nn.Module,
    inputs: tuple[torch.Tensor, ...],
    out: str | Path = "model.pte",
    tile: bool = False,
    budget: int | None = None,
    time_limit: float = 10.0,
    max_mac_overhead: float = 0.1,
    progress: Callable[[str], None] | None = None,
) -> ExportResult:
    """Write `model` as an ExecuTorch program at `out`, planned by memtile (with `tile`, the
    tiled rewrite, down to `budget` bytes if given, when its arena is the smaller), run it through ExecuTorch's runtime against the
    eager model and read its planned arena back. Raises ExecuTorchMissingError without
    ExecuTorch and PlanVerificationError if the file's arena is not memtile's plan."""
    require_executorch()
    from memtile.export.pipeline import run

    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    return run(model, inputs, Path(out), tile, budget, time_limit, max_mac_overhead,
               progress or (lambda _: None))


class _CallableModule(types.ModuleType):
    """Importing the package `memtile.export` sets the attribute `memtile.export` to this module,
    shadowing the function of the same name in the public API; calling the module calls it."""

    def __call__(self, *args, **kwargs) -> ExportResult:
        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["INSTALL", "TOLERANCE", "ExecuTorchMissingError", "ExportResult", "export", "require_executorch"]

"""The export pipeline: (tile) -> capture + schedule -> edge -> memtile-planned .pte -> checks."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from memtile.errors import PlanVerificationError
from memtile.export import ExportResult
from memtile.export.check import compare, planned_buffer_sizes
from memtile.export.hook import MemtilePlanner, PlanningRecord
from memtile.export.program import lower, scheduled_program, to_edge_program
from memtile.tiling.planned import PlannedPeak


@dataclass
class Lowered:
    """One candidate program: its memtile-planned lowering and the hook's record."""

    program: object
    record: PlanningRecord


def run(model: torch.nn.Module, inputs: tuple, out: Path, tile: bool, budget: int | None,
        time_limit: float, max_mac_overhead: float, say: Callable[[str], None]) -> ExportResult:
    """Lower the model (and, with `tile`, its tiled rewrite); write the smaller planned arena
    (the untiled program on a tie or when tiling did not lower it), then check the file."""
    began = time.perf_counter()
    model = model.eval()
    steps, tile_seconds = [], 0.0
    if tile:
        started = time.perf_counter()
        tiled, steps, before, after = _tiled(model, inputs, budget, max_mac_overhead, say)
        tile_seconds = time.perf_counter() - started
        plain = _lower(_program(before, model, inputs, say), time_limit, say)
        candidate = _lower(_program(after, tiled, inputs, say), time_limit, say)
        smaller = candidate.record.plan.arena_bytes < plain.record.plan.arena_bytes
        chosen = candidate if smaller else plain
    else:
        chosen = plain = _lower(_program(None, model, inputs, say), time_limit, say)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(chosen.program.buffer)
    record = chosen.record
    sizes = planned_buffer_sizes(out)
    if sizes != [0, record.plan.arena_bytes]:
        raise PlanVerificationError(
            f"{out}: planned buffer sizes {sizes} are not memtile's arena "
            f"{record.plan.arena_bytes}; the memory-planning hook was not used")
    say("running the .pte with ExecuTorch's runtime")
    agreement = compare(out, model, inputs)
    return ExportResult(
        str(out), out.stat().st_size, sum(sizes), record.plan.arena_bytes, record.greedy_bytes,
        record.load_bytes, record.plan.optimal, record.plan.strategy, record.alignment,
        record.specs, record.inplace_pairs, agreement.vs_eager, chosen is not plain, steps, budget,
        round(time.perf_counter() - began, 2), round(tile_seconds, 2),
        plain.record.plan.arena_bytes, agreement.vs_float64, agreement.eager_vs_float64,
        agreement.channels_last_vs_float64)


def _program(planned: PlannedPeak | None, model: torch.nn.Module, inputs: tuple, say
             ) -> torch.export.ExportedProgram:
    """The scheduled core-ATen program of `model`: the graph tiling planned for it when there is
    one (`PlannedPeak.program`: no trace), else captured and scheduled."""
    program = planned.program(inputs) if planned is not None else None
    if program is None:
        say("capturing and scheduling")
        program = scheduled_program(model, inputs)[0]
    return program


def _lower(program: torch.export.ExportedProgram, time_limit: float, say) -> Lowered:
    """Edge dialect, then the .pte planned by memtile, of a program in memtile's op order."""
    say("lowering to the ExecuTorch edge dialect")
    edge = to_edge_program(program)
    say("planning ExecuTorch's tensor specs with memtile")
    planner = MemtilePlanner(time_limit=time_limit)
    return Lowered(lower(edge, planner), planner.record)


def _tiled(model, inputs, budget, max_mac_overhead, say):
    """`memtile.tile`'s best model (also when a budget is not met: the arena check says so),
    its steps, and the planned peaks of the model before and after tiling."""
    from memtile.tiling import BudgetNotMetError, tile

    say("tiling (FDT/FFMT path discovery)")
    try:
        tiled, report = tile(model, inputs, budget, max_mac_overhead, progress=say)
    except BudgetNotMetError as error:
        tiled, report = error.model, error.report
    return tiled, report.as_dict()["steps"], report.planned_before, report.planned_after

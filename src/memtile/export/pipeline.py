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
from memtile.export.program import lower, scheduled_program, tiled_program, to_edge_program


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
    say("capturing and scheduling")
    plain = _lower(scheduled_program(model, inputs)[0], time_limit, say)
    chosen, steps, tile_seconds = plain, [], 0.0
    if tile:
        started = time.perf_counter()
        tiled, steps, planned = _tiled(model, inputs, budget, max_mac_overhead, say)
        tile_seconds = time.perf_counter() - started
        program = tiled_program(planned, inputs)
        if program is None:
            say("capturing and scheduling the tiled model")
            program = scheduled_program(tiled, inputs)[0]
        candidate = _lower(program, time_limit, say)
        if candidate.record.plan.arena_bytes < plain.record.plan.arena_bytes:
            chosen = candidate
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


def _lower(program: torch.export.ExportedProgram, time_limit: float, say) -> Lowered:
    """Edge dialect, then the .pte planned by memtile, of a program in memtile's op order."""
    say("lowering to the ExecuTorch edge dialect")
    edge = to_edge_program(program)
    say("planning ExecuTorch's tensor specs with memtile")
    planner = MemtilePlanner(time_limit=time_limit)
    return Lowered(lower(edge, planner), planner.record)


def _tiled(model, inputs, budget, max_mac_overhead, say):
    """`memtile.tile`'s best model (also when a budget is not met: the arena check says so),
    its steps and its planned peak."""
    from memtile.tiling import BudgetNotMetError, tile

    say("tiling (FDT/FFMT path discovery)")
    try:
        tiled, report = tile(model, inputs, budget, max_mac_overhead, progress=say)
    except BudgetNotMetError as error:
        tiled, report = error.model, error.report
    return tiled, report.as_dict()["steps"], report.planned_after

"""Planned peak of a (tiled) model: capture, schedule, in-place sharing, plan.

The same pipeline as `memtile plan` (best schedule, elementwise ops overwriting inputs that die
there, best heuristic plan), so an untiled model's planned peak is the one `memtile plan`
reports. One addition: capture lowers to functional ATen, so FFMT's `out[..., tile] = value`
appears as `copy` + `slice_scatter`, each a new full-size tensor; the rewritten model writes in
place, so those share the output buffer. Without that the planner would charge every tile a
second copy of the output. Likewise FDT's `PartialSum` multiplies each partition straight into
the accumulator (`addmm` with `out=` it), which capture shows as an `addmm` making a new tensor
from a view of the accumulator: that result shares the accumulator's buffer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from memtile.capture import INPUT, PARAMETER, MemGraph, apply_order, capture
from memtile.planner import prepare
from memtile.planning import Plan, Problem, live_bytes, solve
from memtile.tiling.stitch import StitchedGraph

# The schedule's search is bounded by work, not seconds, so a planned peak (and the steps that
# discovery picks by it) is the same on any machine under any load; on an idle core these are
# about 2 s and 0.1 s of search.
SCHEDULE_WORK = 4_000_000
CANDIDATE_SCHEDULE_WORK = 200_000  # discovery's candidates; the model it returns gets the full work
_ACCUMULATE = "aten.addmm.default"
_WRITES_INTO = {"aten.slice_scatter.default", _ACCUMULATE}


def inplace_writes(g: MemGraph) -> dict[str, str]:
    """Storage -> storage it is written into: `slice_scatter` results and the `copy` feeding them
    share the scattered-into base when that base dies at the scatter (an in-place slice write);
    an `addmm` result shares the base of its `self` operand (a GEMM accumulating into it) when
    that base dies there and has its size. Data dependencies fix these positions, so any
    schedule keeps them valid."""
    last_use: dict[str, int] = {}
    for tensor in g.tensors.values():
        if tensor.consumers:
            last_use[tensor.base] = max(last_use.get(tensor.base, -1), *tensor.consumers)
    shared: dict[str, str] = {}
    for op in g.ops:
        if op.target not in _WRITES_INTO or len(op.inputs) < 2:
            continue
        base = g.tensors[op.inputs[0]].base
        if last_use.get(base) != op.index or g.tensors[base].category in (INPUT, PARAMETER):
            continue
        if op.target == _ACCUMULATE:
            if g.tensors[base].nbytes == g.tensors[op.outputs[0]].nbytes:
                shared[op.outputs[0]] = base
            continue
        shared[op.outputs[0]] = base
        source = g.tensors[op.inputs[1]]
        producer = g.ops[source.producer] if source.producer is not None else None
        if producer is not None and producer.target == "aten.copy.default" and source.consumers == [op.index]:
            shared[source.name] = base
    return shared


@dataclass
class PlannedPeak:
    """Arena of the best heuristic plan, with and without the model inputs' buffers."""

    arena_bytes: int
    arena_without_input_bytes: int
    input_bytes: int
    macs: int
    problem: Problem
    plan: Plan
    crowding: int  # steps whose live bytes (without inputs) reach their maximum
    graph: MemGraph = field(repr=False, compare=False)  # what was planned, in the op `order`
    order: list[int] = field(repr=False, compare=False)

    def program(self, inputs: Sequence[torch.Tensor]) -> torch.export.ExportedProgram | None:
        """The ExportedProgram of the graph planned, its ops in the order planned: the stitched
        core ATen made a program, with no trace (torch.export of a tiled mobilenet_v2 takes
        about 15 s). None when the graph was traced whole: export the model then."""
        if not isinstance(self.graph, StitchedGraph):
            return None
        program = self.graph.exported_program(inputs)
        apply_order(MemGraph(program), self.order)
        return program

    @property
    def objective(self) -> tuple[int, int, int]:
        """What discovery lowers: the arena, then the arena without inputs, then how many steps
        share the highest LOAD (several blocks at one peak must each be tiled before it drops)."""
        return (self.arena_bytes, self.arena_without_input_bytes, self.crowding)


def planned_peak(model: nn.Module, inputs: Sequence[torch.Tensor],
                 schedule_work: int = SCHEDULE_WORK,
                 capture_with: Callable[[nn.Module, tuple], MemGraph] = capture) -> PlannedPeak:
    """The planned peak of `model`; `capture_with` makes its graph (discovery's rewrites of a
    model that `capture` has already exported once use a faster capture of the same graph)."""
    return graph_peak(capture_with(model, tuple(inputs)), schedule_work)


def graph_peak(g: MemGraph, schedule_work: int = SCHEDULE_WORK) -> PlannedPeak:
    """The planned peak of a captured graph (see `planned_peak`)."""
    prepared = prepare(g, time_limit=None, work=schedule_work, extra_shared=inplace_writes(g))
    problem, plan = prepared.problem, solve(prepared.problem, "best")
    inputs_only = {t.name for t in g.tensors.values() if t.category == INPUT and not t.is_view}
    rest = replace(problem, buffers=[b for b in problem.buffers if b.id not in inputs_only])
    without = solve(rest, "best").arena_bytes if rest.buffers else 0
    return PlannedPeak(plan.arena_bytes, without, g.input_bytes, g.macs(), problem, plan,
                       _crowding(rest), g, prepared.order)


def _crowding(problem: Problem) -> int:
    live = live_bytes(problem.buffers)
    return live.count(max(live))

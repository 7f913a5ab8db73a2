"""The one planning pipeline for a model: capture → schedule → in-place pairs → plan.

`memtile plan`, the planned executor and tiling's peak evaluation all plan a graph the same way,
so a model's planned arena is one number wherever memtile reports it. `prepare` is the one
place a graph's `Problem` is built; callers that plan part of a graph (the executor's arena,
tiling's in-place slice writes) pass what narrows it in. `memtile.plan` is this module's `plan`.
"""

from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch
from torch import nn

from memtile.capture import MemGraph, capture
from memtile.inplace import inplace_pairs
from memtile.lifetimes import buffers
from memtile.planning import Plan, Problem, solve
from memtile.schedule import Schedule, schedule

ALIGNMENT = 64


@dataclass
class PreparedGraph:
    """A captured graph with the op order and in-place pairs chosen for it, as a Problem."""

    graph: MemGraph
    order: list[int]
    shared: dict[str, str]
    problem: Problem
    schedule: Schedule | None
    inplace_count: int


@dataclass
class ModelPlan:
    """A prepared graph and the plan of its problem."""

    prepared: PreparedGraph
    plan: Plan

    @property
    def arena_bytes(self) -> int:
        return self.plan.arena_bytes

    @property
    def problem(self) -> Problem:
        return self.prepared.problem


def prepare(
    graph: MemGraph,
    reorder: bool = True,
    inplace: bool = True,
    time_limit: float | None = 5.0,
    alignment: int = ALIGNMENT,
    capacity: int | None = None,
    extra_shared: dict[str, str] | None = None,
    order: list[int] | None = None,
    keep_pair: Callable[[str, str], bool] | None = None,
    storages: Collection[str] | None = None,
    work: int | None = None,
) -> PreparedGraph:
    """The planning problem of a graph after the best op order (when `reorder`) and in-place
    pairs (when `inplace`). A caller that plans only part of the graph narrows it:

    - `order`: a fixed op order (from `op_order`), instead of scheduling again;
    - `keep_pair(output, source)`: which in-place pairs to keep (the executor drops pairs whose
      kernels cannot write in place);
    - `extra_shared`: storage pairs written in place beyond those (tiling's slice writes, the
      executor's fused chains writing into one slot); they override in-place pairs;
    - `storages`: the buffers to plan, by name (the executor's arena storages); default all.

    The schedule's search stops after `time_limit` seconds and `work` op visits (see
    `schedule`; None: no such bound).
    """
    found = None
    if order is None:
        order, found = op_order(graph, reorder, inplace, time_limit, work)
    pairs = inplace_pairs(graph, order) if inplace else {}
    if keep_pair is not None:
        pairs = {out: source for out, source in pairs.items() if keep_pair(out, source)}
    shared = {**pairs, **(extra_shared or {})}
    found_buffers = buffers(graph, order, shared)
    if storages is not None:
        found_buffers = [b for b in found_buffers if b.id in storages]
    problem = Problem(found_buffers, alignment=alignment, capacity=capacity)
    return PreparedGraph(graph, order, shared, problem, found, len(pairs))


def op_order(graph: MemGraph, reorder: bool = True, inplace: bool = True,
             time_limit: float | None = 5.0, work: int | None = None
             ) -> tuple[list[int], Schedule | None]:
    """The op order `prepare` plans in (the best schedule's when `reorder`, else the exported
    one) and the schedule that found it."""
    found = schedule(graph, time_limit, inplace, work=work) if reorder else None
    return (found.order if found else list(range(graph.num_steps))), found


def plan_graph(graph: MemGraph, strategy: str = "best", time_limit: float = 5.0,
               **options) -> ModelPlan:
    """`prepare` the graph (options as there), then plan it with `memtile.planning.solve`."""
    prepared = prepare(graph, time_limit=time_limit, **options)
    return ModelPlan(prepared, solve(prepared.problem, strategy, time_limit))


def plan(model: nn.Module, inputs: tuple[torch.Tensor, ...], strategy: str = "best",
         time_limit: float = 5.0, **options) -> ModelPlan:
    """Capture `model` on `inputs` and plan every intermediate tensor into one arena.

    Options: `reorder`, `inplace`, `alignment` (see `prepare`). The result's `plan.offsets` maps
    each buffer of `problem` to its offset; `arena_bytes` is the planned arena.
    """
    return plan_graph(capture(model, inputs), strategy, time_limit, **options)

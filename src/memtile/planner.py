"""The one planning pipeline for a model: capture → schedule → in-place pairs → plan.

`memtile plan`, the planned executor and tiling's peak evaluation all plan a graph the same way,
so a model's planned arena is one number wherever memtile reports it. `memtile.plan` is this
module's `plan`.
"""

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
    time_limit: float = 5.0,
    alignment: int = ALIGNMENT,
    capacity: int | None = None,
    extra_shared: dict[str, str] | None = None,
) -> PreparedGraph:
    """The planning problem of a graph after the best op order (when `reorder`) and in-place
    pairs (when `inplace`); `extra_shared` adds storage pairs a rewrite already writes in place
    (tiling's slice writes)."""
    found = schedule(graph, time_limit=time_limit, inplace=inplace) if reorder else None
    order = found.order if found else list(range(graph.num_steps))
    pairs = inplace_pairs(graph, order) if inplace else {}
    shared = {**pairs, **(extra_shared or {})}
    problem = Problem(buffers(graph, order, shared), alignment=alignment, capacity=capacity)
    return PreparedGraph(graph, order, shared, problem, found, len(pairs))


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

"""Static memory planning (MemoMalloc's analysis half): give every buffer an offset in one
arena, as small as possible, and say how good that is. Pure Python: no torch import.

`solve(problem, strategy)` runs one heuristic from STRATEGIES, `best` (all heuristics, smallest
arena), `optimal` (CP-SAT seeded with `best`) or `search` (MiniMalloc-style search). Every plan
that leaves this package has passed `verify`.
"""

from __future__ import annotations

import time

from memtile.errors import MemtileError
from memtile.planning.exact import solve_exact
from memtile.planning.intervals import overlap_lists
from memtile.planning.problem import (
    Buffer,
    BufferId,
    Plan,
    Problem,
    arena_of,
    live_bytes,
    lower_bound,
    naive_bytes,
)
from memtile.planning.search import find_within, minimize
from memtile.planning.strategies import STRATEGIES
from memtile.planning.verify import check_capacity, fits, verify

__all__ = [
    "STRATEGIES",
    "Buffer",
    "Plan",
    "Problem",
    "best_heuristic",
    "check_capacity",
    "fit",
    "fits",
    "live_bytes",
    "lower_bound",
    "naive_bytes",
    "solve",
    "solve_all",
    "verify",
]

SOLVERS = ("best", "optimal", "search")


def _plan(problem: Problem, offsets: dict[BufferId, int], strategy: str, began: float,
          proven: bool = False) -> Plan:
    """Wrap offsets as a verified Plan; optimal when proven or when the arena meets LOAD."""
    arena = arena_of(problem, offsets)
    plan = Plan(offsets, arena, strategy, proven or arena == lower_bound(problem),
                time.perf_counter() - began)
    verify(problem, plan, capacity=False)  # a plan over capacity is reported; `fits` tells
    return plan


def _heuristic_plans(problem: Problem) -> list[Plan]:
    neighbours = overlap_lists(problem)
    plans = []
    for name, strategy in STRATEGIES.items():
        began = time.perf_counter()
        plans.append(_plan(problem, strategy(problem, neighbours), name, began))
    return plans


def best_heuristic(problem: Problem) -> Plan:
    """Every heuristic, keeping the smallest arena (the first listed among equals); the plan
    is named after the heuristic that won."""
    began = time.perf_counter()
    best = min(_heuristic_plans(problem), key=lambda p: p.arena_bytes)
    return _plan(problem, best.offsets, best.strategy, began)


def solve(problem: Problem, strategy: str = "best", time_limit: float = 10.0) -> Plan:
    """Plan `problem` with one strategy: a name in STRATEGIES, or "best", "optimal", "search"."""
    began = time.perf_counter()
    if strategy in STRATEGIES:
        return _plan(problem, STRATEGIES[strategy](problem), strategy, began)
    if strategy == "best":
        return best_heuristic(problem)
    if strategy == "optimal":
        hint = best_heuristic(problem)
        left = max(time_limit - (time.perf_counter() - began), 0.0)
        offsets, proven = solve_exact(problem, hint.offsets, left)
        return _plan(problem, offsets, "optimal", began, proven)
    if strategy == "search":
        hint = best_heuristic(problem)
        left = max(time_limit - (time.perf_counter() - began), 0.0)
        return _plan(problem, minimize(problem, hint.offsets, left), "search", began)
    raise MemtileError(
        f"unknown planning strategy {strategy!r}; choose one of "
        f"{', '.join([*STRATEGIES, *SOLVERS])}"
    )


def solve_all(problem: Problem, time_limit: float = 10.0) -> list[Plan]:
    """Every heuristic, then the exact solver seeded with the best of them."""
    plans = _heuristic_plans(problem)
    began = time.perf_counter()
    best = min(plans, key=lambda p: p.arena_bytes)
    offsets, proven = solve_exact(problem, best.offsets, time_limit)
    return [*plans, _plan(problem, offsets, "optimal", began, proven)]


def fit(problem: Problem, time_limit: float = 60.0) -> Plan | None:
    """A plan within the problem's capacity, from the search (which stops at the first plan it
    finds, unlike `solve(..., "search")`, which goes on shrinking); None if none was found."""
    if problem.capacity is None:
        raise MemtileError("fit needs a problem with a capacity")
    began = time.perf_counter()
    offsets = find_within(problem, problem.capacity, time_limit)
    return None if offsets is None else _plan(problem, offsets, "search", began)

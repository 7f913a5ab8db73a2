"""The MiniMalloc-style search: exact against brute force, and the challenging instances."""

import itertools
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memtile.planning import Buffer, Plan, Problem, fits, lower_bound, solve, verify
from memtile.planning.problem import arena_of, size_unit
from memtile.planning.search import _Instance, _Search, _SkylineSearch, find_within

CHALLENGING = Path(__file__).resolve().parents[2] / "shared" / "data" / "minimalloc-challenging"
CAPACITY = 1048576


def brute_force_optimum(problem: Problem) -> int:
    """The smallest arena over every placement order, each buffer at its lowest free offset
    (an optimal plan, packed downwards in offset order, is one of these)."""
    bs, best = problem.buffers, None
    sizes = [problem.aligned_size(b) for b in bs]
    for order in itertools.permutations(range(len(bs))):
        offsets: dict[int, int] = {}
        for i in order:
            cursor = 0
            for low, high in sorted(
                (offsets[j], offsets[j] + sizes[j]) for j in offsets if bs[j].overlaps(bs[i])
            ):
                if low - cursor >= sizes[i]:
                    break
                cursor = max(cursor, high)
            offsets[i] = cursor
        arena = max((offsets[i] + sizes[i] for i in offsets), default=0)
        best = arena if best is None else min(best, arena)
    return best


@st.composite
def small_problems(draw):
    n = draw(st.integers(1, 6))
    buffers = []
    for i in range(n):
        start = draw(st.integers(0, 6))
        buffers.append(Buffer(i, draw(st.integers(0, 9)), start, start + draw(st.integers(1, 4))))
    return Problem(buffers, alignment=draw(st.sampled_from([1, 2])))


def _checked(problem: Problem, offsets: dict) -> int:
    arena = arena_of(problem, offsets)
    verify(problem, Plan(offsets, arena, "search", False, 0.0), capacity=False)
    return arena


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_problems())
def test_search_finds_the_optimum_and_proves_nothing_smaller_fits(problem):
    optimum = brute_force_optimum(problem)
    found = find_within(problem, optimum, time_limit=10.0)
    assert found is not None and _checked(problem, found) <= optimum
    if optimum > 0:
        assert find_within(problem, optimum - 1, time_limit=10.0) is None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_problems(), st.sampled_from(["WAT", "TAW", "ZT"]))
def test_both_search_kinds_alone_are_exact(problem, order):
    """Each search of the portfolio, run to the end on its own, finds a plan at the optimum
    and proves that one unit less is impossible: no pruning rule loses a packing."""
    optimum = brute_force_optimum(problem)
    unit = size_unit(problem)
    sized = [i for i, b in enumerate(problem.buffers) if b.size]
    instance = _Instance(problem, sized, unit)
    for kind in (_Search, _SkylineSearch):
        checks = [(optimum, True), (optimum - unit, False)] if optimum else [(0, True)]
        for capacity, feasible in checks:
            search = kind(instance, capacity // unit, order, 10**9,
                          time.perf_counter() + 10)
            with pytest.raises(StopIteration) as done:
                next(search.run())
            assert done.value.value is feasible, (kind.__name__, capacity)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_problems())
def test_search_strategy_is_never_worse_than_the_best_heuristic(problem):
    plan = solve(problem, "search", time_limit=2.0)
    verify(problem, plan)
    assert lower_bound(problem) <= plan.arena_bytes <= solve(problem, "best").arena_bytes
    assert plan.arena_bytes == brute_force_optimum(problem)


def test_subproblem_ranks_take_t_over_the_unplaced_bytes():
    """MiniMalloc reranks each partition on what is left: T is the largest section total of
    the bytes still unplaced, so a subproblem's order can differ from the static one."""
    # 0 and 1 live alone early on; 2 and 3 later, 3 next to the large 4
    problem = Problem([Buffer(0, 6, 0, 2), Buffer(1, 5, 0, 2), Buffer(2, 4, 2, 4),
                       Buffer(3, 3, 2, 4), Buffer(4, 9, 3, 4)], alignment=1)
    instance = _Instance(problem, list(range(5)), 1)
    static = instance.ranks("TZ")
    assert sorted(range(5), key=static.__getitem__) == [4, 2, 3, 0, 1]  # T 16 (Z 9, 4, 3), 11
    totals = [sum(instance.size[k] for k in members if k not in (2, 4))
              for members in instance.members]  # 2 and 4 placed: 3 is alone in its sections
    fresh = instance.ranks("TZ", [0, 1, 3], totals)
    assert sorted([0, 1, 3], key=fresh.__getitem__) == [0, 1, 3]  # T: 11, 11, 3
    assert static[3] < static[0]  # statically 3 came first


def test_search_refuses_a_capacity_below_load():
    problem = Problem([Buffer(0, 5, 0, 2), Buffer(1, 5, 1, 3)], alignment=1)
    assert find_within(problem, 9, time_limit=1.0) is None
    assert _checked(problem, find_within(problem, 10, time_limit=1.0)) == 10


def _challenging(name: str) -> Problem:
    path = CHALLENGING / f"{name}.{CAPACITY}.csv"
    if not path.exists():
        pytest.skip(f"{path} is not here")
    return Problem.from_csv(path, capacity=CAPACITY)


def _assert_within_capacity(name: str, time_limit: float) -> None:
    problem = _challenging(name)
    assert solve(problem, "best").arena_bytes > CAPACITY  # the heuristics do not fit
    found = find_within(problem, CAPACITY, time_limit=time_limit)
    assert found is not None, f"no plan within {CAPACITY} bytes for {name} in {time_limit} s"
    plan = Plan(found, arena_of(problem, found), "search", False, 0.0)
    verify(problem, plan)  # capacity included
    assert plan.arena_bytes <= CAPACITY


@pytest.mark.parametrize("name", ["F", "I", "K"])
def test_search_fits_challenging_instances_within_capacity(name):
    _assert_within_capacity(name, time_limit=25.0)


def test_search_strategy_meets_the_capacity_of_a_challenging_instance():
    problem = _challenging("F")
    plan = solve(problem, "search", time_limit=25.0)
    verify(problem, plan)  # capacity included
    assert fits(problem, plan) and plan.strategy == "search"
    assert plan.arena_bytes == lower_bound(problem) == CAPACITY and plan.optimal


@pytest.mark.slow
@pytest.mark.parametrize("name", list("ABCDEFGHIJK"))
def test_search_fits_every_challenging_instance(name):
    _assert_within_capacity(name, time_limit=120.0)

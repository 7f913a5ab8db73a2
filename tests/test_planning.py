"""The planning core: model, LOAD, heuristics, exact solver, verifier, CSV/JSON, errors."""

import random
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memtile.errors import BudgetError, MemtileError, PlanVerificationError, ProblemFormatError
from memtile.planning import (
    STRATEGIES,
    Buffer,
    Plan,
    Problem,
    check_capacity,
    fits,
    lower_bound,
    naive_bytes,
    solve,
    solve_all,
    verify,
)
from memtile.planning.io import read_csv_offsets

HEURISTICS = list(STRATEGIES)


@st.composite
def problems(draw, max_buffers=20):
    """Random problems: sizes (zero included) and half-open lifetimes on a short timeline."""
    n = draw(st.integers(1, max_buffers))
    buffers = []
    for i in range(n):
        start = draw(st.integers(0, 15))
        buffers.append(Buffer(i, draw(st.integers(0, 300)), start, start + draw(st.integers(1, 8))))
    return Problem(buffers, alignment=draw(st.sampled_from([1, 8, 64])))


# greedy by size places 0 and 2 at the bottom and then stacks 4 and 1 to 7 bytes; the optimum
# puts 0 on 4 and 2 on 1 and meets LOAD = 6 (step 2: buffers 0 and 4)
GREEDY_TRAP = Problem(
    [Buffer(0, 4, 2, 3), Buffer(1, 1, 3, 6), Buffer(2, 4, 5, 7), Buffer(3, 2, 1, 2),
     Buffer(4, 2, 1, 5)],
    alignment=1,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_every_heuristic_plan_verifies_and_lies_between_load_and_naive(problem):
    load, naive = lower_bound(problem), naive_bytes(problem)
    for name in HEURISTICS:
        plan = solve(problem, name)
        verify(problem, plan)
        assert plan.strategy == name
        assert load <= plan.arena_bytes <= naive
        assert all(offset % problem.alignment == 0 for offset in plan.offsets.values())
    assert solve(problem, "naive").arena_bytes == naive


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(max_buffers=10))
def test_exact_is_at_most_every_heuristic_and_at_least_load(problem):
    plans = solve_all(problem, time_limit=5.0)
    assert [p.strategy for p in plans] == [*HEURISTICS, "optimal"]
    exact = plans[-1]
    verify(problem, exact)
    assert lower_bound(problem) <= exact.arena_bytes <= min(p.arena_bytes for p in plans[:-1])
    assert exact.optimal  # ten buffers are proven within seconds
    assert solve(problem, "best").arena_bytes == min(p.arena_bytes for p in plans[:-1])


def test_load_counts_half_open_lifetimes_and_aligned_sizes():
    chain = Problem([Buffer("a", 100, 0, 2), Buffer("b", 30, 2, 4), Buffer("c", 50, 1, 3)])
    assert lower_bound(chain) == 128 + 64  # a+c at step 1 (sizes rounded up to 64)
    assert naive_bytes(chain) == 128 + 64 + 64
    assert lower_bound(Problem([], alignment=8)) == 0


def test_greedy_by_size_is_not_optimal_where_the_exact_solver_is():
    assert lower_bound(GREEDY_TRAP) == 6
    assert solve(GREEDY_TRAP, "greedy_by_size").arena_bytes == 7
    exact = solve(GREEDY_TRAP, "optimal")
    assert (exact.arena_bytes, exact.optimal) == (6, True)
    assert solve(GREEDY_TRAP, "search").arena_bytes == 6


def test_best_keeps_the_smallest_heuristic_and_names_it():
    plan = solve(GREEDY_TRAP, "best")
    arenas = {name: solve(GREEDY_TRAP, name).arena_bytes for name in HEURISTICS}
    assert plan.arena_bytes == min(arenas.values())
    assert arenas[plan.strategy] == plan.arena_bytes
    assert plan.optimal == (plan.arena_bytes == 6)


def test_a_thousand_buffers_plan_well_under_a_second_each():
    rng = random.Random(0)
    buffers = []
    for i in range(1000):
        start = rng.randrange(2000)
        buffers.append(Buffer(i, rng.randrange(1, 1 << 20), start, start + rng.randrange(1, 60)))
    problem = Problem(buffers)
    began = time.perf_counter()
    plan = solve(problem, "best")
    elapsed = time.perf_counter() - began
    assert elapsed < 2.0, f"all heuristics on 1,000 buffers took {elapsed:.2f} s"
    assert lower_bound(problem) <= plan.arena_bytes < naive_bytes(problem)


def _plan(offsets, arena):
    return Plan(offsets, arena, "hand", False, 0.0)


def test_verify_names_the_two_overlapping_buffers():
    problem = Problem([Buffer("conv1", 64, 0, 3), Buffer("relu1", 64, 2, 4)])
    with pytest.raises(PlanVerificationError, match="'conv1' and 'relu1'"):
        verify(problem, _plan({"conv1": 0, "relu1": 0}, 128))
    verify(problem, _plan({"conv1": 0, "relu1": 64}, 128))
    # not live together: the same bytes may be reused
    verify(Problem([Buffer("a", 64, 0, 2), Buffer("b", 64, 2, 4)]), _plan({"a": 0, "b": 0}, 64))


def test_verify_catches_misalignment_capacity_arena_and_missing_offsets():
    problem = Problem([Buffer("a", 100, 0, 1), Buffer("b", 10, 0, 1)], capacity=160)
    with pytest.raises(PlanVerificationError, match="'b'.*not aligned to 64"):
        verify(problem, _plan({"a": 0, "b": 100}, 192))
    with pytest.raises(PlanVerificationError, match="'b'.*capacity of 160"):
        verify(problem, _plan({"a": 0, "b": 192}, 256))
    verify(problem, _plan({"a": 0, "b": 192}, 256), capacity=False)
    with pytest.raises(PlanVerificationError, match="'b'.*beyond the plan's arena"):
        verify(problem, _plan({"a": 0, "b": 128}, 128))
    with pytest.raises(PlanVerificationError, match="no offset for buffer 'b'"):
        verify(problem, _plan({"a": 0}, 128))


def test_capacity_below_load_is_a_budget_error_and_fits_tells():
    problem = Problem([Buffer(0, 64, 0, 2), Buffer(1, 64, 1, 3)], capacity=100)
    with pytest.raises(BudgetError, match="below the lower bound LOAD"):
        check_capacity(problem)
    plan = solve(problem)  # still planned, for reporting
    assert plan.arena_bytes == 128 and not fits(problem, plan)
    problem.capacity = 128
    check_capacity(problem)
    assert fits(problem, solve(problem))


def test_csv_round_trip_with_and_without_offsets(tmp_path):
    problem = Problem(
        [Buffer(0, 1024, 0, 4), Buffer(1, 512, 2, 6), Buffer("act", 256, 5, 9)], alignment=1
    )
    plan = solve(problem, "best")
    problem.to_csv(tmp_path / "p.csv")
    problem.to_csv(tmp_path / "s.csv", plan)
    assert (tmp_path / "p.csv").read_text().splitlines()[:2] == ["id,lower,upper,size", "0,0,4,1024"]
    for name in ("p.csv", "s.csv"):
        again = Problem.from_csv(tmp_path / name)
        assert again.buffers == problem.buffers
    assert read_csv_offsets(tmp_path / "p.csv") is None
    assert read_csv_offsets(tmp_path / "s.csv") == plan.offsets


def test_plan_json_lists_every_buffer_with_its_offset():
    plan = solve(GREEDY_TRAP, "optimal")
    data = plan.to_json(GREEDY_TRAP)
    assert {"arena_bytes", "alignment", "strategy", "optimal", "buffers"} <= set(data)
    assert (data["arena_bytes"], data["alignment"], data["optimal"]) == (6, 1, True)
    assert [(b["id"], b["offset"]) for b in data["buffers"]] == [
        (b.id, plan.offsets[b.id]) for b in GREEDY_TRAP.buffers
    ]
    assert data["buffers"][0] == {"id": 0, "size": 4, "start": 2, "end": 3,
                                  "offset": plan.offsets[0]}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("id,lower,size\n0,0,4\n", "lacks column"),
        ("", "lacks column"),
        ("id,lower,upper,size\n", "no buffers"),
        ("id,lower,upper,size\n0,0,x,4\n", "line 2: column 'upper' must be an integer"),
        ("id,lower,upper,size\n0,0,3,-4\n", "line 2: .*negative size"),
        ("id,lower,upper,size\n0,3,3,4\n", "line 2: .*empty"),
        ("id,lower,upper,size\n0,5,3,4\n", "line 2: .*end > start"),
        ("id,lower,upper,size\n0,0,3,4\n0,1,2,4\n", "appears twice"),
        ("id,lower,upper,size\n0,0,3,4,9\n", "more fields"),
    ],
)
def test_malformed_csv_is_a_problem_format_error(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ProblemFormatError, match=message):
        Problem.from_csv(path)


def test_missing_csv_file_is_a_problem_format_error(tmp_path):
    with pytest.raises(ProblemFormatError, match="cannot read"):
        Problem.from_csv(tmp_path / "nope.csv")


def test_bad_buffers_and_problems_are_refused():
    with pytest.raises(ProblemFormatError, match="negative size"):
        Buffer("a", -1, 0, 1)
    with pytest.raises(ProblemFormatError, match="end > start"):
        Buffer("a", 1, 4, 4)
    with pytest.raises(ProblemFormatError, match="integer"):
        Buffer("a", 1.5, 0, 1)
    with pytest.raises(ProblemFormatError, match="alignment"):
        Problem([], alignment=0)
    with pytest.raises(MemtileError, match="unknown planning strategy 'fastest'"):
        solve(GREEDY_TRAP, "fastest")


def test_problem_from_a_recorded_trace():
    trace = SimpleNamespace(allocations=[
        SimpleNamespace(id="conv1.out", size=100, start=0, end=2),
        SimpleNamespace(id="tmp#1", size=40, start=1, end=2),
        SimpleNamespace(id="relu1.out", size=100, start=2, end=3),
    ])
    problem = Problem.from_measurement(trace)
    assert [(b.id, b.size, b.start, b.end) for b in problem.buffers] == [
        ("conv1.out", 100, 0, 2), ("tmp#1", 40, 1, 2), ("relu1.out", 100, 2, 3)
    ]
    assert lower_bound(problem) == 128 + 64
    plan = solve(problem, "optimal")
    assert plan.arena_bytes == 192 and plan.optimal


def test_planning_does_not_import_torch():
    code = "import sys, memtile.planning; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "False"


def test_live_bytes_is_the_profile_load_is_the_maximum_of():
    from memtile.planning import live_bytes

    buffers = [Buffer("a", 10, 0, 2), Buffer("b", 5, 1, 3), Buffer("c", 7, 3, 4)]
    assert live_bytes(buffers) == [10, 15, 5, 7, 0]
    assert max(live_bytes(buffers)) == lower_bound(Problem(buffers, alignment=1))
    assert live_bytes([]) == [0]

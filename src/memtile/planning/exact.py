"""Exact planning with OR-Tools CP-SAT: offsets as variables, NoOverlap2D over (time, bytes).

Only time-connected groups whose heuristic arena is above LOAD are handed to the solver (the
others cannot raise the arena); offsets are counted in units of the gcd of the aligned sizes,
which loses nothing (every buffer can drop onto 0 or onto another buffer) and shrinks domains.
"""

from __future__ import annotations

import time

from memtile.planning.intervals import components
from memtile.planning.problem import BufferId, Problem, lower_bound, size_unit

# CP-SAT's integers are 64-bit and its sums of them must not overflow: a group whose arena (in
# size units) is beyond this keeps the heuristic plan, unproven.
CP_SAT_LIMIT = 2**60


def solve_exact(
    problem: Problem, hint: dict[BufferId, int], time_limit: float = 10.0, workers: int = 2
) -> tuple[dict[BufferId, int], bool]:
    """Improve `hint` (a valid plan) with CP-SAT; returns the offsets and whether they are
    proven optimal."""
    from ortools.sat.python import cp_model

    deadline = time.perf_counter() + time_limit
    bs = problem.buffers
    sizes = [problem.aligned_size(b) for b in bs]
    unit = size_unit(problem)
    floor = -(-lower_bound(problem) // unit)  # no arena can be below LOAD
    offsets = dict(hint)
    needy = [
        group for group in components(problem)
        if max(hint[bs[i].id] + sizes[i] for i in group) > floor * unit
    ]
    proven = True
    for k, group in enumerate(needy):
        left = max(deadline - time.perf_counter(), 0.0) / (len(needy) - k)
        group = [i for i in group if sizes[i]]
        top = max(hint[bs[i].id] + sizes[i] for i in group) // unit
        if top > CP_SAT_LIMIT:
            proven = False
            continue
        model = cp_model.CpModel()
        arena = model.new_int_var(floor, top, "arena")
        steps, spaces, xs = [], [], {}
        for i in group:
            b, size = bs[i], sizes[i] // unit
            x = model.new_int_var(0, top - size, f"x{i}")
            xs[i] = x
            steps.append(model.new_fixed_size_interval_var(b.start, b.end - b.start, f"t{i}"))
            spaces.append(model.new_fixed_size_interval_var(x, size, f"m{i}"))
            model.add(x + size <= arena)
            if hint[b.id] % unit == 0:
                model.add_hint(x, hint[b.id] // unit)
        model.add_hint(arena, top)
        model.add_no_overlap_2d(steps, spaces)
        model.minimize(arena)
        solver = cp_model.CpSolver()
        solver.parameters.max_time_in_seconds = max(left, 0.01)
        solver.parameters.num_workers = workers
        status = solver.solve(model)
        if status in (cp_model.OPTIMAL, cp_model.FEASIBLE) and solver.value(arena) < top:
            for i, x in xs.items():
                offsets[bs[i].id] = solver.value(x) * unit
        proven = proven and status == cp_model.OPTIMAL
    return offsets, proven

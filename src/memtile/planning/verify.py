"""The verifier every plan passes through, and capacity checks.

Independent of how a plan was made: it re-checks the memory model from the offsets alone.
"""

from __future__ import annotations

from memtile.errors import BudgetError, PlanVerificationError
from memtile.planning.problem import Plan, Problem, lower_bound
from memtile.units import format_bytes


def verify(problem: Problem, plan: Plan, *, capacity: bool = True) -> None:
    """Raise PlanVerificationError on a missing or misaligned offset, two live buffers that
    share bytes, a buffer beyond `plan.arena_bytes`, or (with `capacity`) beyond the problem's
    capacity. The message names the buffers involved."""
    offsets = plan.offsets
    ends: list[tuple[int, int, int, int]] = []  # (start, end, offset, index) per sized buffer
    for i, b in enumerate(problem.buffers):
        if b.id not in offsets:
            raise PlanVerificationError(f"plan {plan.strategy!r} has no offset for buffer {b.id!r}")
        offset = offsets[b.id]
        if not isinstance(offset, int) or offset < 0:
            raise PlanVerificationError(
                f"buffer {b.id!r} has offset {offset!r}; offsets are integers >= 0"
            )
        if offset % problem.alignment:
            raise PlanVerificationError(
                f"buffer {b.id!r} at offset {offset} is not aligned to {problem.alignment} bytes"
            )
        top = offset + b.size
        if top > plan.arena_bytes:
            raise PlanVerificationError(
                f"buffer {b.id!r} ends at byte {top}, beyond the plan's arena of "
                f"{plan.arena_bytes} bytes"
            )
        if capacity and problem.capacity is not None and top > problem.capacity:
            raise PlanVerificationError(
                f"buffer {b.id!r} ends at byte {top}, beyond the capacity of "
                f"{problem.capacity} bytes ({format_bytes(problem.capacity)})"
            )
        if b.size:
            ends.append((b.start, b.end, offset, i))
    _check_overlaps(problem, offsets, ends)


def _check_overlaps(
    problem: Problem, offsets: dict, spans: list[tuple[int, int, int, int]]
) -> None:
    """Sweep over time: each buffer is compared with those still live when it starts."""
    spans.sort()
    live: list[tuple[int, int, int, int]] = []
    for span in spans:
        start, _, offset, i = span
        live = [s for s in live if s[1] > start]
        size = problem.buffers[i].size
        for _, _, other_offset, j in live:
            if offset < other_offset + problem.buffers[j].size and other_offset < offset + size:
                a, b = problem.buffers[j], problem.buffers[i]
                raise PlanVerificationError(
                    f"buffers {a.id!r} and {b.id!r} are both live at step "
                    f"{max(a.start, b.start)} and share bytes: {a.id!r} at "
                    f"[{offsets[a.id]}, {offsets[a.id] + a.size}), {b.id!r} at "
                    f"[{offsets[b.id]}, {offsets[b.id] + b.size})"
                )
        live.append(span)


def fits(problem: Problem, plan: Plan) -> bool:
    """True when the plan's arena is within the problem's capacity (or there is none)."""
    return problem.capacity is None or plan.arena_bytes <= problem.capacity


def check_capacity(problem: Problem) -> None:
    """Raise BudgetError when the capacity is below LOAD, so that no plan can fit."""
    if problem.capacity is None:
        return
    load = lower_bound(problem)
    if problem.capacity < load:
        raise BudgetError(
            f"capacity {format_bytes(problem.capacity)} ({problem.capacity} bytes) is below the "
            f"lower bound LOAD = {format_bytes(load)} ({load} bytes): at some step the live "
            "buffers alone need more; raise the capacity or shrink the buffers"
        )

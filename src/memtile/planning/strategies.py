"""Heuristic placement strategies: fast (O(n log n) to O(n^2)) and usually at or near LOAD.

Each takes a Problem and returns {buffer id: offset}; sizes are rounded up to the alignment, so
offsets (sums of aligned sizes) stay aligned. `neighbours` (overlap lists) may be passed in when
several strategies run on one problem, to compute them once.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable

from memtile.planning.intervals import by_start, overlap_lists
from memtile.planning.problem import BufferId, Problem

Offsets = dict[BufferId, int]
Neighbours = list[list[int]] | None


def _place(problem: Problem, order: list[int], neighbours: Neighbours, best_fit: bool) -> Offsets:
    """Place buffers in `order`, each in a gap among the already placed buffers it overlaps in
    time: the smallest gap that holds it (best fit) or the lowest (first fit), else on top."""
    bs = problem.buffers
    sizes = [problem.aligned_size(b) for b in bs]
    neighbours = neighbours if neighbours is not None else overlap_lists(problem)
    offsets: list[int | None] = [None] * len(bs)
    for i in order:
        size = sizes[i]
        taken = sorted(
            (offsets[j], offsets[j] + sizes[j])
            for j in neighbours[i]
            if offsets[j] is not None and sizes[j]
        )
        chosen, chosen_gap, cursor = None, None, 0
        for low, high in taken:
            gap = low - cursor
            if gap >= size and (chosen_gap is None or gap < chosen_gap):
                chosen, chosen_gap = cursor, gap
                if not best_fit:
                    break
            cursor = max(cursor, high)
        offsets[i] = cursor if chosen is None else chosen
    return {b.id: offsets[i] for i, b in enumerate(bs)}


def naive(problem: Problem, neighbours: Neighbours = None) -> Offsets:
    """No reuse: every buffer after the previous one (the arena is the sum of sizes)."""
    offsets, cursor = {}, 0
    for b in problem.buffers:
        offsets[b.id] = cursor
        cursor += problem.aligned_size(b)
    return offsets


def greedy_by_size(problem: Problem, neighbours: Neighbours = None) -> Offsets:
    """Largest first, each into the best-fitting gap (Pisarchyk & Lee; MemoMalloc's default)."""
    bs = problem.buffers
    order = sorted(range(len(bs)), key=lambda i: (-bs[i].size, bs[i].start, i))
    return _place(problem, order, neighbours, best_fit=True)


def greedy_by_breadth(problem: Problem, neighbours: Neighbours = None) -> Offsets:
    """Steps with the most live bytes first; within a step, largest buffer first."""
    bs = problem.buffers
    starts = sorted({b.start for b in bs})  # the live total peaks at some start step
    index = {t: k for k, t in enumerate(starts)}
    delta = [0] * (len(starts) + 1)
    for b in bs:
        size = problem.aligned_size(b)
        delta[index[b.start]] += size
        end = bisect_left(starts, b.end)
        delta[end] -= size
    breadth, live = [], 0
    for d in delta[:-1]:
        live += d
        breadth.append(live)
    key = {}
    for i, b in enumerate(bs):
        first, last = index[b.start], bisect_left(starts, b.end)
        peak = max(breadth[first:last])
        key[i] = (-peak, breadth.index(peak, first, last), -b.size, i)
    order = sorted(range(len(bs)), key=key.__getitem__)
    return _place(problem, order, neighbours, best_fit=True)


def greedy_by_lifetime(problem: Problem, neighbours: Neighbours = None) -> Offsets:
    """Longest-lived first (they constrain the most others), each into the best-fitting gap."""
    bs = problem.buffers
    order = sorted(range(len(bs)), key=lambda i: (-(bs[i].end - bs[i].start), -bs[i].size, i))
    return _place(problem, order, neighbours, best_fit=True)


def first_fit(problem: Problem, neighbours: Neighbours = None) -> Offsets:
    """In start order, each at the lowest gap that holds it: what an online allocator does."""
    return _place(problem, by_start(problem), neighbours, best_fit=False)


STRATEGIES: dict[str, Callable[..., Offsets]] = {
    "naive": naive,
    "greedy_by_size": greedy_by_size,
    "greedy_by_breadth": greedy_by_breadth,
    "greedy_by_lifetime": greedy_by_lifetime,
    "first_fit": first_fit,
}

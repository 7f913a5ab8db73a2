"""Which buffers are live together: overlap lists and time-connected components.

Shared by the heuristics, the exact solver and the search, which all work on buffer indices.
"""

from __future__ import annotations

from memtile.planning.problem import Problem


def by_start(problem: Problem) -> list[int]:
    """Buffer indices ordered by start step (then end, then index)."""
    bs = problem.buffers
    return sorted(range(len(bs)), key=lambda i: (bs[i].start, bs[i].end, i))


def overlap_lists(problem: Problem) -> list[list[int]]:
    """For each buffer, the indices of the buffers whose lifetimes share a step with it."""
    bs = problem.buffers
    neighbours: list[list[int]] = [[] for _ in bs]
    live: list[int] = []
    for i in by_start(problem):
        start = bs[i].start
        live = [j for j in live if bs[j].end > start]
        for j in live:
            neighbours[i].append(j)
            neighbours[j].append(i)
        live.append(i)
    return neighbours


def components(problem: Problem) -> list[list[int]]:
    """Groups of buffers connected through shared steps; groups never share a step, so each
    can be planned on its own and the arena is the largest group's."""
    bs = problem.buffers
    groups: list[list[int]] = []
    reach = None
    for i in by_start(problem):
        if reach is None or bs[i].start >= reach:
            groups.append([])
            reach = bs[i].end
        groups[-1].append(i)
        reach = max(reach, bs[i].end)
    return groups

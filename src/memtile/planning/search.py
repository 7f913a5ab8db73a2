"""A search for plans within a capacity, for instances where heuristics and CP-SAT fall short.

The first ideas are MiniMalloc's (Moffitt, ASPLOS 2023); the code is ours:

- *Sections*: the set of buffers live on each stretch of time between two events; two
  buffers conflict iff they share a section.
- *Canonical solutions*: buffers are placed bottom-up, each at the lowest offset its placed
  neighbours allow, in non-decreasing (offset, rank) order, so each packing is generated once.
- *Dominance*: a buffer is never placed at or above the lowest top any unplaced buffer could
  reach, since that one would fit beneath it.
- *Spatial inference*: in every section, the unplaced buffers must still stack on top of the
  section's floor (and of the offset placed next) within the capacity; else the branch is cut.
- *Hatless pruning*: a buffer with no unplaced neighbour constrains nobody, so if the branch
  with it placed fails, other choices at that node fail too.
- *Decomposition*: when no unplaced buffer spans the boundary between two sections, the two
  sides are independent and are solved one after the other, never re-exploring a solved side;
  each side's buffers are ranked afresh, with T (largest section total) over the bytes still
  unplaced, as MiniMalloc does per partition (with static ranks, instance I of the challenging
  set was not solved in 300 s; with these, in seconds).

Ours on top:

- *Memo*: states (buffers left, their lowest offsets, ...) whose subtree failed are
  remembered by hash, and not explored again when another path reaches them.
- *Skyline branching* (`_SkylineSearch`): the same packings, enumerated by a binary choice on
  one buffer at the lowest free offset, picked from the fullest section (see the class).
- *Portfolio*: both searches under several rank orders take turns, each resuming where it
  paused, since search times are heavy-tailed.
"""

from __future__ import annotations

import sys
import time
from bisect import bisect_right
from collections.abc import Callable, Generator

from memtile.planning.intervals import overlap_lists
from memtile.planning.problem import BufferId, Problem, arena_of, lower_bound, size_unit

# Static rank orders, keys sorted descending: W lifetime width, A area, T largest section
# total, Z size, O number of conflicts, L start, U end. MiniMalloc's three come first.
_ORDERS = ("WAT", "TAW", "TWA", "TOW", "ZWT", "OWT", "WZT", "TZW", "AT", "OTW", "UWT", "LWT")
_SLICE = 500  # nodes a search runs before the next one takes its turn


class _Abort(Exception):
    """The node budget or the deadline ran out."""


class _Instance:
    """Static data of a problem in size units: sizes, sections, conflicts."""

    def __init__(self, problem: Problem, indices: list[int], unit: int) -> None:
        bs = problem.buffers
        self.n = n = len(indices)
        self.size = [problem.aligned_size(bs[i]) // unit for i in indices]
        events = sorted(
            [(bs[i].end, 0, k) for k, i in enumerate(indices)]
            + [(bs[i].start, 1, k) for k, i in enumerate(indices)]
        )  # at equal steps ends come first: intervals are half-open
        self.lo, self.hi = [0] * n, [0] * n
        sections: list[list[int]] = []  # the live set on each stretch between events
        live: set[int] = set()
        now = None
        for t, is_start, k in events:
            if t != now:
                if live:
                    sections.append(sorted(live))
                now = t
            if is_start:
                live.add(k)
                self.lo[k] = len(sections)
            else:
                live.discard(k)
                self.hi[k] = len(sections)
        self.members = sections
        sub = Problem([bs[i] for i in indices], alignment=1)
        self.neighbours = overlap_lists(sub)
        totals = [sum(self.size[k] for k in members) for members in sections]
        width = [bs[i].end - bs[i].start for i in indices]
        self.keys = {
            "W": width,
            "A": [w * s for w, s in zip(width, self.size, strict=True)],
            "T": [max(totals[self.lo[k]:self.hi[k]]) for k in range(n)],
            "Z": self.size,
            "L": [bs[i].start for i in indices],
            "U": [bs[i].end for i in indices],
            "O": [len(m) for m in self.neighbours],
        }

    def ranks(
        self, order: str, among: list[int] | None = None, totals: list[int] | None = None
    ) -> list[int]:
        """Rank of each buffer of `among` (default: all; the others get 0) under an order:
        lower rank is tried first among equals. With `totals`, the unplaced bytes of each
        section in a subproblem, T is taken over those, as MiniMalloc reorders a partition."""
        among = list(range(self.n)) if among is None else among
        keys = dict(self.keys)
        if totals is not None:
            keys["T"] = largest = list(keys["T"])
            for k in among:
                largest[k] = max(totals[self.lo[k]:self.hi[k]])
        columns = [keys[c] for c in order]
        ordered = sorted(among, key=lambda k: tuple(-key[k] for key in columns) + (k,))
        rank = [0] * self.n
        for r, k in enumerate(ordered):
            rank[k] = r
        return rank


class _Search:
    """MiniMalloc's canonical depth-first search under one rank order, a capacity, a node
    budget and a deadline; also the shared state and moves of `_SkylineSearch`."""

    def __init__(
        self, inst: _Instance, capacity: int, order: str, nodes: int, deadline: float
    ) -> None:
        self.inst, self.capacity, self.order = inst, capacity, order
        self.rank = [0] * inst.n  # set for each (sub)problem by `_start`
        self.nodes_left, self.deadline = nodes, deadline
        self.big = capacity + 1  # `low` of a placed buffer: it no longer counts in any floor
        # the lowest offset the placed neighbours allow each unplaced buffer
        self.low = [0] * inst.n
        self.total = [sum(inst.size[k] for k in m) for m in inst.members]  # unplaced bytes
        self.cuts = [0] * max(len(inst.members) - 1, 0)  # unplaced buffers spanning s | s+1
        for k in range(inst.n):
            for s in range(inst.lo[k], inst.hi[k] - 1):
                self.cuts[s] += 1
        self.solution = [-1] * inst.n
        self.failed: dict[int, tuple[int, int]] = {}  # state hash -> `previous` it failed from

    def run(self) -> Generator[None, None, bool]:
        """The whole search as a generator: it pauses (yields) whenever its node budget is
        spent, so that several searches can take turns without starting over."""
        return (yield from self._start(list(range(self.inst.n)), 0, len(self.inst.members)))

    def _start(self, unplaced: list[int], first: int, last: int) -> Generator[None, None, bool]:
        """Search for a placement of `unplaced` (sections [first, last)) from scratch, with
        the buffers ranked afresh on what is left unplaced (T changes as buffers are placed)."""
        rank = self.rank
        saved = [rank[k] for k in unplaced]
        fresh = self.inst.ranks(self.order, unplaced, self.total)
        for k in unplaced:
            rank[k] = fresh[k]
        try:
            return (yield from self._solve(unplaced, first, last))
        finally:
            for k, r in zip(unplaced, saved, strict=True):
                rank[k] = r

    def _solve(self, unplaced: list[int], first: int, last: int) -> Generator[None, None, bool]:
        return (yield from self._dfs(unplaced, first, last, (-1, -1)))

    def _tick(self) -> Generator[None, None, None]:
        """Count a node; pause when the budget is spent, stop at the deadline."""
        self.nodes_left -= 1
        if self.nodes_left < 0:
            yield
        elif self.nodes_left & 127 == 0 and time.perf_counter() > self.deadline:
            raise _Abort

    def _dfs(
        self, unplaced: list[int], first: int, last: int, previous: tuple[int, int]
    ) -> Generator[None, None, bool]:
        """Place the `unplaced` buffers, whose sections are [first, last); `previous` is the
        (offset, rank) of the last placement, which canonical order may not go below."""
        if not unplaced:
            return True
        yield from self._tick()
        size, low, rank = self.inst.size, self.low, self.rank
        # the outcome depends only on which buffers are left, where they may go, their ranks
        # and `previous`
        state = hash((first, last, tuple(unplaced), tuple(map(low.__getitem__, unplaced)),
                      tuple(map(rank.__getitem__, unplaced))))
        failed_from = self.failed.get(state)
        if failed_from is not None and previous >= failed_from:
            return False  # explored before, from a `previous` that allowed at least as much
        lowest_top = min(low[k] + size[k] for k in unplaced)
        candidates = sorted(
            (low[k], rank[k], k)
            for k in unplaced
            if low[k] < lowest_top and (low[k], rank[k]) > previous
        )
        # every unplaced buffer will sit at or above the offset placed next, so a section's
        # unplaced bytes stacked on that offset must stay within the capacity
        ceiling = self.capacity - max(self.total[first:last])
        for offset, r, k in candidates:
            if offset > ceiling:
                break  # candidates are sorted by offset: the rest fail this too
            hat, raised, span = self._place(k, offset)
            found = self._feasible(span) and (
                yield from self._descend(
                    unplaced, first, last, k,
                    lambda rest, r=r, offset=offset: self._dfs(rest, first, last, (offset, r)),
                )
            )
            self._unplace(k, offset, raised)
            if found:
                return True
            if not hat:
                break
        self.failed[state] = previous if failed_from is None else min(previous, failed_from)
        return False

    def _place(self, k: int, offset: int) -> tuple[bool, list[tuple[int, int]], range]:
        """Place k and raise its unplaced neighbours' lowest offsets to its top. Returns
        whether k has an unplaced neighbour (a hat), what was raised, and the sections whose
        floor or total changed."""
        inst, low, big = self.inst, self.low, self.big
        top = offset + inst.size[k]
        low[k] = big
        self.solution[k] = offset
        lo, hi = inst.lo, inst.hi
        first, last, hat, raised = lo[k], hi[k], False, []
        for j in inst.neighbours[k]:
            value = low[j]
            if value != big:
                hat = True
                if value < top:
                    raised.append((j, value))
                    low[j] = top
                    if lo[j] < first:  # noqa: PLR1730 (a call costs more here)
                        first = lo[j]
                    if hi[j] > last:  # noqa: PLR1730
                        last = hi[j]
        size, total = inst.size[k], self.total
        for s in range(inst.lo[k], inst.hi[k]):
            total[s] -= size
        return hat, raised, range(first, last)

    def _unplace(self, k: int, offset: int, raised: list[tuple[int, int]]) -> None:
        inst, low = self.inst, self.low
        for j, value in raised:
            low[j] = value
        low[k] = offset
        size, total = inst.size[k], self.total
        for s in range(inst.lo[k], inst.hi[k]):
            total[s] += size

    def _feasible(self, span: range) -> bool:
        """Spatial inference: in every section whose floor or total changed, the unplaced
        buffers must still stack between the floor (their lowest `low`) and the capacity."""
        capacity, total, members = self.capacity, self.total, self.inst.members
        get = self.low.__getitem__
        for s in span:
            if total[s] and min(map(get, members[s])) + total[s] > capacity:
                return False
        return True

    def _descend(
        self, unplaced: list[int], first: int, last: int, k: int,
        go_on: Callable[[list[int]], Generator[None, None, bool]],
    ) -> Generator[None, None, bool]:
        """Go on with the rest after placing k (`go_on`); but where k was the last unplaced
        buffer spanning a section boundary, solve the now independent sides one after the
        other, each from scratch."""
        inst, cuts = self.inst, self.cuts
        rest = [j for j in unplaced if j != k]
        bounds = [first]
        for s in range(inst.lo[k], inst.hi[k] - 1):
            cuts[s] -= 1
            if cuts[s] == 0:
                bounds.append(s + 1)
        try:
            if len(bounds) == 1:
                return (yield from go_on(rest))
            bounds.append(last)
            groups: list[list[int]] = [[] for _ in bounds]
            for j in rest:
                groups[bisect_right(bounds, inst.lo[j]) - 1].append(j)
            for g, group in enumerate(groups[:-1]):
                if group and not (yield from self._start(group, bounds[g], bounds[g + 1])):
                    return False
            return True
        finally:
            for s in range(inst.lo[k], inst.hi[k] - 1):
                cuts[s] += 1


class _SkylineSearch(_Search):
    """The same packings, branched differently: at the lowest offset P where an unplaced
    buffer can go, take one buffer that can sit at P and either place it there or declare
    it *stuck* (it will sit higher, on a neighbour placed later). The buffer is chosen
    dynamically from the section with the most unplaced bytes, so that the tightest part of
    the timeline is packed first; the rank order only breaks ties."""

    def __init__(
        self, inst: _Instance, capacity: int, order: str, nodes: int, deadline: float
    ) -> None:
        super().__init__(inst, capacity, order, nodes, deadline)
        self.stuck = [False] * inst.n  # declined at its current `low`; waits to be raised
        self.dead: set[int] = set()  # hashes of states with no completion

    def _solve(self, unplaced: list[int], first: int, last: int) -> Generator[None, None, bool]:
        return (yield from self._dfs(unplaced, first, last))

    def _dfs(self, unplaced: list[int], first: int, last: int) -> Generator[None, None, bool]:
        if not unplaced:
            return True
        yield from self._tick()
        inst, low, stuck, total = self.inst, self.low, self.stuck, self.total
        free = [j for j in unplaced if not stuck[j]]
        if not free:
            return False  # every buffer waits for a neighbour to be placed first
        lowest = min(map(low.__getitem__, free))
        if lowest + max(total[first:last]) > self.capacity:
            return False  # everything left sits at or above `lowest`
        size = inst.size
        if any(stuck[j] and low[j] + size[j] <= lowest for j in unplaced):
            return False  # dominated: that stuck buffer's spot below is still free
        state = hash((first, last, tuple(unplaced), tuple(map(low.__getitem__, unplaced)),
                      tuple(map(stuck.__getitem__, unplaced))))
        if state in self.dead:
            return False
        lo, hi, rank = inst.lo, inst.hi, self.rank
        k = min(
            (j for j in free if low[j] == lowest),
            key=lambda j: (-max(total[lo[j]:hi[j]]), rank[j]),
        )
        hat, raised, span = self._place(k, lowest)
        freed = [j for j, _ in raised if stuck[j]]  # raised: they may sit on k now
        for j in freed:
            stuck[j] = False
        found = self._feasible(span) and (
            yield from self._descend(
                unplaced, first, last, k, lambda rest: self._dfs(rest, first, last)
            )
        )
        for j in freed:
            stuck[j] = True
        self._unplace(k, lowest, raised)
        if found:
            return True
        if hat:  # without an unplaced neighbour, k can only be better off at `lowest`
            stuck[k] = True
            found = yield from self._dfs(unplaced, first, last)
            stuck[k] = False
            if found:
                return True
        self.dead.add(state)
        return False


def _solve_instance(inst: _Instance, capacity: int, time_limit: float) -> list[int] | None:
    """Offsets (in units) within `capacity`, or None if none was found in time (or none
    exists). The searches take turns, a slice of nodes each, each resuming where it paused:
    search times are heavy-tailed, and one search often finishes far sooner than the others,
    so more join as time goes on."""
    deadline = time.perf_counter() + time_limit
    if inst.n == 0:
        return []
    if max(inst.keys["T"]) > capacity:
        return None  # LOAD itself is above the capacity
    searches = [
        kind(inst, capacity, order, 0, deadline)
        for order in _ORDERS
        for kind in (_SkylineSearch, _Search)
    ]
    runs = [search.run() for search in searches]
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 20 * inst.n + 1000))  # a frame or two per decision
    turn = 0
    try:
        while time.perf_counter() < deadline:
            # both searches under MiniMalloc's three orders start; one more joins every third
            joined = min(len(searches), 6 + turn // 3)
            turn += 1
            for search, run in zip(searches[:joined], runs[:joined], strict=True):
                search.nodes_left = _SLICE
                try:
                    next(run)
                except StopIteration as done:
                    return search.solution if done.value else None  # None: proven infeasible
    except _Abort:
        return None
    finally:
        sys.setrecursionlimit(limit)
        for run in runs:
            run.close()
    return None


def find_within(
    problem: Problem, capacity: int, time_limit: float = 60.0
) -> dict[BufferId, int] | None:
    """A plan whose arena is at most `capacity` bytes, or None if none was found in time."""
    unit = size_unit(problem)
    sized = [i for i, b in enumerate(problem.buffers) if b.size]
    inst = _Instance(problem, sized, unit)
    found = _solve_instance(inst, capacity // unit, time_limit)
    if found is None:
        return None
    offsets = {b.id: 0 for b in problem.buffers}
    for k, i in enumerate(sized):
        offsets[problem.buffers[i].id] = found[k] * unit
    return offsets


def minimize(
    problem: Problem, start: dict[BufferId, int], time_limit: float = 10.0
) -> dict[BufferId, int]:
    """Shrink the arena of the valid plan `start`: first within the problem's capacity if it
    is above it, then LOAD itself, then by bisection between what failed and what was found;
    each probe is a capacity-bounded search with a share of the time left."""
    deadline = time.perf_counter() + time_limit
    unit = size_unit(problem)
    best, arena = start, arena_of(problem, start)
    low = -(-lower_bound(problem) // unit) * unit  # smallest arena not yet ruled out
    probes = [(low, 0.25)]  # (target arena, share of the time left)
    if problem.capacity is not None and low <= problem.capacity < arena:
        probes.insert(0, (problem.capacity // unit * unit, 0.75))
    while low < arena and time.perf_counter() < deadline:
        target, share = probes.pop(0) if probes else ((low + arena - unit) // 2 // unit * unit, 0.5)
        if target >= arena:
            continue
        found = find_within(problem, target, (deadline - time.perf_counter()) * share)
        if found is None:
            low = target + unit
        else:
            best, arena = found, arena_of(problem, found)
    return best

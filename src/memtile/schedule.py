"""Execution order: the op order that lowers LOAD on graphs with branches (inception, densenet).

LOAD depends on the order: a branch that makes a large tensor and then shrinks it should run to
its end before another branch starts. The search:

- *Segments*: an op that is an ancestor or a descendant of every other op (a block's input or
  its concat) is passed through by every order, and the live bytes there do not depend on the
  order; the ops between two such cut ops are scheduled on their own, and the peak is the
  largest segment peak.
- *Dynamic programming* over the sets of executed ops of a segment: the live bytes depend only
  on the set, so per set only the smallest peak so far matters. Sets are expanded in order of
  size; when a size has more than `width` sets, the `width` best (peak, live) are kept, and the
  result is a beam-search heuristic instead of the optimum.
- *Free ops first*: an op that adds no bytes while it runs (a view; an in-place op whose input
  dies there) is run as soon as it is ready; an exchange argument shows this loses nothing.
- *Never worse*: each segment keeps the exported order when that is not beaten, and the whole
  order is checked against the exported one with `lifetimes.load`.
- *Bounded*: by seconds, or by work (op visits: each state expanded and each op run from it
  visits the segment's ops once). A work bound gives the same order on any machine under any
  load, which tiling needs: it compares candidates by their planned peaks.

Ops that read only parameters (a weight's permute) belong to no segment: they run right
before their first reader.
"""

import time
from dataclasses import dataclass

from memtile import collector
from memtile.capture import INPUT, OUTPUT, PARAMETER, MemGraph
from memtile.inplace import inplace_pairs, overwritable
from memtile.lifetimes import load


@dataclass
class Schedule:
    """An execution order, its LOAD and the exported order's (same in-place rule), whether
    the order is proven best (every segment solved exactly within the bounds), and per
    segment of several ops its peak in the exported order and in this one: where the global
    peak lies elsewhere (a network's stem), lowering a block's peak does not lower LOAD."""

    order: list[int]
    load: int
    exported_load: int
    exact: bool
    seconds: float
    segment_peaks: list[tuple[int, int]]


class _Effects:
    """What running one op does to the live bytes, independent of the order.

    Sets of ops are bitmasks over op indices. A storage is live from its producer until every
    op reading it (through any view) has run; graph outputs stay live.
    """

    def __init__(self, graph: MemGraph, constant: set[int], inplace: bool):
        storage_of: dict[str, str] = {}
        self.size: dict[str, int] = {}
        made_by_constant = {o for i in constant for o in graph.ops[i].outputs}
        for name, tensor in graph.tensors.items():
            base = graph.tensors[tensor.base]
            if base.category != PARAMETER and base.nbytes and base.name not in made_by_constant:
                storage_of[name] = base.name
                self.size[base.name] = base.nbytes
        self.kept = {s for s in self.size if graph.tensors[s].category == OUTPUT}
        self.readers = dict.fromkeys(self.size, 0)
        self.made_by: dict[str, int] = {}
        for op in graph.ops:
            for name in op.outputs:
                self.made_by[name] = op.index
            for name in op.inputs:
                if name in storage_of:
                    self.readers[storage_of[name]] |= 1 << op.index
        self.preds = [0] * graph.num_steps
        self.succs = [0] * graph.num_steps
        self.alloc = [0] * graph.num_steps
        self.touched: list[list[str]] = [[] for _ in graph.ops]
        self.reuse: list[list[str]] = [[] for _ in graph.ops]
        for op in graph.ops:
            for name in op.inputs:
                producer = self.made_by.get(name)
                if producer is not None and producer not in constant:
                    self.preds[op.index] |= 1 << producer
                    self.succs[producer] |= 1 << op.index
            made = [o for o in op.outputs if storage_of.get(o) == o]
            self.alloc[op.index] = sum(self.size[o] for o in made)
            read = [storage_of[name] for name in op.inputs if name in storage_of]
            self.touched[op.index] = list(dict.fromkeys(read + made))
            if inplace:
                self.reuse[op.index] = [t for t in overwritable(graph, op) if t in self.size]
        self.initial_live = sum(
            size for s, size in self.size.items()
            if graph.tensors[s].category == INPUT and self.readers[s]
        )
        # ops that can add no bytes (`step`'s first value 0): nothing allocated, or an input
        # of the allocation's size to overwrite; `_run` tries only these as free ops
        self.maybe_free = sum(
            1 << op.index for op in graph.ops
            if any(self.size[t] == self.alloc[op.index] for t in self.reuse[op.index])
            or not self.alloc[op.index]
        )

    def step(self, done: int, op: int) -> tuple[int, int]:
        """(bytes the op adds while it runs, change of the live bytes once it has run)."""
        after = done | 1 << op
        reused = next((self.size[t] for t in self.reuse[op] if not self.readers[t] & ~after), 0)
        freed = sum(
            self.size[s] for s in self.touched[op]
            if s not in self.kept and not self.readers[s] & ~after
        )
        return self.alloc[op] - reused, self.alloc[op] - freed


class _Budget:
    """What a search may still spend: seconds (`time_limit`) and/or op visits (`work`)."""

    def __init__(self, time_limit: float | None, work: int | None):
        self.deadline = None if time_limit is None else time.perf_counter() + time_limit
        self.work = work

    def spend(self, visits: int) -> bool:
        """Count `visits` op visits; False once a bound is passed."""
        if self.work is not None:
            self.work -= visits
            if self.work < 0:
                return False
        return self.deadline is None or time.perf_counter() <= self.deadline


@dataclass
class _State:
    peak: int
    live: int
    path: tuple | None  # (op, previous path): the ops run since the segment began
    ready: int  # the segment's ops not run whose predecessors have all run (a bitmask)


def _ready(effects: _Effects, done: int, members: int) -> int:
    """The ops of `members` (a bitmask) not in `done` whose predecessors all are."""
    return sum(1 << v for v in _bits(members & ~done) if not effects.preds[v] & ~done)


def _ready_after(effects: _Effects, ready: int, done: int, op: int, members: int) -> int:
    """`ready` once `op` (now in `done`) has run: only its successors can become ready, so
    this costs its out-degree where `_ready` costs the segment's size."""
    ready &= ~(1 << op)
    for v in _bits(effects.succs[op] & members):
        if not effects.preds[v] & ~done:
            ready |= 1 << v
    return ready


def _run(effects: _Effects, done: int, state: _State, op: int, members: int
         ) -> tuple[int, _State]:
    """Run `op`, then every ready op that adds no bytes (see the module docstring), in passes
    over the ops ready when each pass begins."""
    extra, delta = effects.step(done, op)
    peak, live, path = max(state.peak, state.live + extra), state.live + delta, (op, state.path)
    done |= 1 << op
    ready = _ready_after(effects, state.ready, done, op, members)
    progress = True
    while progress:
        progress = False
        for v in _bits(ready & effects.maybe_free):
            extra, delta = effects.step(done, v)
            if extra == 0:
                live, path, done, progress = live + delta, (v, path), done | 1 << v, True
                ready = _ready_after(effects, ready, done, v, members)
    return done, _State(peak, live, path, ready)


def _search(
    effects: _Effects, ops: list[int], done: int, live: int, width: int, budget: _Budget
) -> tuple[list[int], int, bool] | None:
    """Lowest-peak order of `ops` from the executed set `done`: (order, peak, exact), or None
    when the budget runs out."""
    members = sum(1 << v for v in ops)
    goal = done | members
    start = _State(0, live, None, _ready(effects, done, members))
    buckets: dict[int, dict[int, _State]] = {0: {done: start}}
    exact = True
    while buckets:
        count = min(buckets)
        states = buckets.pop(count)
        if len(states) > width:
            exact = False
            kept = sorted(states.items(), key=lambda item: (item[1].peak, item[1].live))[:width]
            states = dict(kept)
        for now, state in states.items():
            if now == goal:
                return _unwind(state.path), state.peak, exact
            ready = _bits(state.ready)
            if not budget.spend(len(ops) * (1 + len(ready))):  # a bucket can take seconds
                return None
            for op in ready:
                after, new = _run(effects, now, state, op, members)
                bucket = buckets.setdefault((after & ~done).bit_count(), {})
                old = bucket.get(after)
                if old is None or new.peak < old.peak:
                    bucket[after] = new
    raise AssertionError("the segment's ops do not form a DAG")


def _unwind(path: tuple | None) -> list[int]:
    order = []
    while path is not None:
        op, path = path
        order.append(op)
    return order[::-1]


def _replay(effects: _Effects, ops: list[int], done: int, live: int) -> tuple[int, int, int]:
    """(peak, executed set, live bytes) after running `ops` in the given order."""
    peak = 0
    for op in ops:
        extra, delta = effects.step(done, op)
        peak, live, done = max(peak, live + extra), live + delta, done | 1 << op
    return peak, done, live


def _constant_ops(graph: MemGraph) -> set[int]:
    """Ops whose inputs are all parameters or made by such ops (no data flows into them)."""
    constant: set[int] = set()
    made_by_constant: set[str] = set()
    for op in graph.ops:
        if all(graph.tensors[n].category == PARAMETER or n in made_by_constant for n in op.inputs):
            constant.add(op.index)
            made_by_constant.update(op.outputs)
    return constant


def _segments(effects: _Effects, ops: list[int]) -> list[list[int]]:
    """Split `ops` (exported order) at cut ops: those comparable with every other op."""
    ancestors = {}
    for v in ops:
        mask = effects.preds[v]
        for p in _bits(effects.preds[v]):
            mask |= ancestors[p]
        ancestors[v] = mask
    descendants = dict.fromkeys(ops, 0)
    for v in reversed(ops):
        for p in _bits(effects.preds[v]):
            descendants[p] |= descendants[v] | 1 << v
    segments, current = [], []
    for v in ops:
        if ancestors[v].bit_count() + descendants[v].bit_count() + 1 == len(ops):
            segments += [current, [v]] if current else [[v]]
            current = []
        else:
            current.append(v)
    return [s for s in [*segments, current] if s]


def _bits(mask: int) -> list[int]:
    found = []
    while mask:
        low = mask & -mask
        found.append(low.bit_length() - 1)
        mask ^= low
    return found


def _with_constants(graph: MemGraph, order: list[int], constant: set[int]) -> list[int]:
    """Put each constant op right before its first reader (constants with no reader last)."""
    made_by = {o: op.index for op in graph.ops for o in op.outputs}
    placed: set[int] = set()
    result: list[int] = []

    def place(v: int) -> None:
        for name in graph.ops[v].inputs:
            producer = made_by.get(name)
            if producer in constant and producer not in placed:
                place(producer)
        placed.add(v)
        result.append(v)

    for v in order:
        place(v)
    for v in sorted(constant - placed):
        place(v)
    return result


def schedule(
    graph: MemGraph, time_limit: float | None = 5.0, inplace: bool = False, width: int = 1000,
    work: int | None = None,
) -> Schedule:
    """The lowest-LOAD order found within `time_limit` seconds and `work` op visits (None: no
    such bound); LOAD counts in-place sharing (`inplace_pairs`) when `inplace` is set. Never
    worse than the exported order."""
    began = time.perf_counter()
    budget = _Budget(time_limit, work)
    constant = _constant_ops(graph)
    effects = _Effects(graph, constant, inplace)
    ops = [op.index for op in graph.ops if op.index not in constant]
    done, live, exact = 0, effects.initial_live, not any(effects.alloc[v] for v in constant)
    segments = _segments(effects, ops)
    starts, exported_peaks = [], []  # per segment, in the exported order: (executed set, live
    for segment in segments:  # bytes) where it starts, and its peak
        starts.append((done, live))
        peak, done, live = _replay(effects, segment, done, live)
        exported_peaks.append(peak)
    found: dict[int, tuple[list[int], int, bool] | None] = {}
    # the search's states survive by the hundred thousand and trigger full collections (a 0.5 s
    # search took 0.90 s in the test suite's process); they hold no cycles
    with collector.paused():
        for index in sorted(range(len(segments)), key=lambda i: len(segments[i])):
            # smallest first: one segment too large to finish in time (FFMT tiles) then costs
            # only itself its search, not every segment after it
            if len(segments[index]) > 1:
                found[index] = _search(effects, segments[index], *starts[index], width, budget)
    order, peaks = [], []
    for index, segment in enumerate(segments):
        best, exported_peak = found.get(index), exported_peaks[index]
        order += best[0] if best is not None and best[1] < exported_peak else segment
        if len(segment) > 1:
            peaks.append((exported_peak, min(exported_peak, best[1] if best else exported_peak)))
        exact = exact and (len(segment) == 1 or (best is not None and best[2]))
    order = _with_constants(graph, order, constant)
    exported = list(range(graph.num_steps))
    load = _load(graph, order, inplace)
    exported_load = _load(graph, exported, inplace)
    if load > exported_load:  # the model above missed something; trust the exported order
        order, load, exact, peaks = exported, exported_load, False, [(p, p) for p, _ in peaks]
    return Schedule(order, load, exported_load, exact, time.perf_counter() - began, peaks)


def _load(graph: MemGraph, order: list[int], inplace: bool) -> int:
    return load(graph, order, inplace_pairs(graph, order) if inplace else None)


def is_topological(graph: MemGraph, order: list[int]) -> bool:
    """True when `order` runs every op once and after the ops that make its inputs."""
    if sorted(order) != list(range(graph.num_steps)):
        return False
    made_by = {o: op.index for op in graph.ops for o in op.outputs}
    position = {op: step for step, op in enumerate(order)}
    return all(
        position[made_by[name]] < position[op.index]
        for op in graph.ops for name in op.inputs if name in made_by
    )

"""Path discovery: find the buffers that make the peak and the tiling that lowers it most.

Greedy, as in the FDT paper: estimate the peak, take the largest buffers live there, and for the
node producing each try FDT (the channel path through it, N = 2..32) and FFMT (spans between
cuts around it that start and end at smaller buffers, strips and grids). Candidates are ranked
by the fast estimate (ties: no recompute, shorter path, fewer partitions); the best few are
applied, re-captured and re-planned, and the first that lowers the planned peak within the MAC
budget is kept. Repeat until nothing improves or the budget is met.

Outputs are checked against the original's once a search ends, on the model it ends at (the
chain of its steps), and only for the search whose model is returned: running a tiled model
costs more than planning it, and candidates almost always match. When that model differs, its
steps' models are checked in order, the first step that differs is rejected with the reason,
and the search goes on from the step before as if that candidate had failed when it was tried.

The objective is the planned peak, then the planned peak without the input buffers (once the
peak sits where the input is still live, as at a tiled stem, later widening blocks are still
worth tiling: deployments often keep the input elsewhere, and MCUNetV2 reports peaks without
it), then the number of steps at that peak, so that blocks which tie at the peak are tiled one
after another.

Two kinds of candidate look past one block: FDT over every block that ties at a peak at once (one
block alone would leave the peak where it is, so the greedy step would prefer a recomputing FFMT
span over all of them), and a finer split (more partitions, a finer grid) of an earlier step whose
buffers make the peak now, rebuilt by replaying the accepted steps from there.
"""

from __future__ import annotations

import itertools
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace

import torch
from torch import fx, nn

from memtile.errors import BudgetError, MemtileError
from memtile.spatial import SpatialGraph
from memtile.tiling.check import Reference
from memtile.tiling.estimate import Collapse, collapsed_objectives, estimate_peak, is_elementwise
from memtile.tiling.fdt import FDTPath, apply_fdt, fdt_paths_through, multiplies_into
from memtile.tiling.ffmt import FFMTPath, FFMTTiles, apply_ffmt, cuts, extract, span
from memtile.tiling.planned import (
    CANDIDATE_SCHEDULE_WORK,
    SCHEDULE_WORK,
    PlannedPeak,
    planned_peak,
)
from memtile.tiling.rewrite import independent_copy, nbytes, node_named, propagate_shapes, shape
from memtile.tiling.stitch import Stitcher
from memtile.trace import trace

PARTITIONS = (2, 3, 4, 6, 8, 12, 16, 24, 32)
GRIDS = ((2, 1), (4, 1), (8, 1), (16, 1), (2, 2), (3, 3), (4, 4), (6, 6), (8, 8))
TARGETS = 4  # largest buffers at the peak considered per round
TRIES = 3  # candidates applied and re-planned per round
SPAN_NEAREST = 2  # nearest cuts per side of a target tried as span ends
MAX_STEPS = 16
MAX_THINNING = 3  # consecutive steps that only lower the number of steps at a tied peak


@dataclass
class Candidate:
    method: str  # "fdt" or "ffmt"
    paths: tuple[FDTPath | FFMTPath, ...]  # disjoint paths split the same way
    partitions: int
    grid: tuple[int, int] | None
    estimated: tuple[int, int, int]  # estimated objective (see PlannedPeak.objective)
    extra_macs: int
    target: str
    redo: int | None = None  # index of the accepted step this one re-splits

    @property
    def ops(self) -> tuple[str, ...]:
        return tuple(name for path in self.paths for name in path.nodes)

    def key(self) -> tuple:
        return (*self.estimated, self.extra_macs > 0, len(self.ops), self.partitions)

    def apply(self, gm: fx.GraphModule) -> tuple[fx.GraphModule, tuple[frozenset[str], ...]]:
        """The rewritten copy of `gm` and, per path, the names of the nodes it made."""
        made = []
        for path in self.paths:
            names = {n.name for n in gm.graph.nodes}
            gm = (apply_fdt(gm, path, self.partitions) if self.method == "fdt"
                  else apply_ffmt(gm, path, self.grid))
            made.append(frozenset(n.name for n in gm.graph.nodes) - names)
        return gm, tuple(made)

    def describe(self) -> str:
        split = f"{self.grid[0]}x{self.grid[1]}" if self.grid else str(self.partitions)
        where = f"{self.ops[0]}..{self.ops[-1]} ({len(self.ops)} ops"
        where += f" in {len(self.paths)} paths)" if len(self.paths) > 1 else ")"
        redo = " (finer split of an earlier step)" if self.redo is not None else ""
        return f"{self.method} {split} over {where}{redo}"


@dataclass
class _Applied:
    """An accepted candidate, the graph it was applied to and the node names it made."""

    candidate: Candidate
    before: fx.GraphModule
    made: tuple[frozenset[str], ...]  # per path
    number: int  # 1-based number of the report step that set this split


@dataclass
class TileStep:
    """One accepted rewrite: the buffer it targeted, where, how, and the planned peak after it."""

    target: str
    target_bytes: int
    method: str
    partitions: int
    grid: list[int] | None
    ops: list[str]
    peak_bytes: int
    macs: int
    replaces: int | None = None  # 1-based number of the earlier step this one re-splits
    paths: int = 1  # disjoint paths split alike in this step (blocks tied at a peak)


@dataclass
class TileReport:
    """Planned peaks (arena of the best heuristic plan) before and after, and every step."""

    peak_before_bytes: int
    peak_after_bytes: int
    peak_before_without_input_bytes: int
    peak_after_without_input_bytes: int
    input_bytes: int
    macs_before: int
    macs_after: int
    max_abs_error: float
    output_scale: float
    budget: int | None
    max_mac_overhead: float
    methods: list[str]
    steps: list[TileStep] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    barriers: list[str] = field(default_factory=list)  # what ended spans and paths, by op
    max_seconds: float | None = None
    timed_out: bool = False
    planned_before: PlannedPeak | None = field(default=None, repr=False, compare=False)
    planned_after: PlannedPeak | None = field(default=None, repr=False, compare=False)
    # the model as traced before any rewrite (what the caller measures "before" on)
    original: fx.GraphModule | None = field(default=None, repr=False, compare=False)

    @property
    def mac_overhead(self) -> float:
        return self.macs_after / self.macs_before - 1 if self.macs_before else 0.0

    @property
    def budget_met(self) -> bool:
        return self.budget is None or self.peak_after_bytes <= self.budget

    def as_dict(self) -> dict:
        """The JSON-ready fields (the plans themselves stay out)."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.compare}
        data["steps"] = [asdict(step) for step in self.steps]
        data["mac_overhead"] = self.mac_overhead
        data["budget_met"] = self.budget_met
        return data


class BudgetNotMetError(BudgetError):
    """No tiling found meets the budget; carries the best model and report found."""

    def __init__(self, message: str, model: fx.GraphModule, report: TileReport):
        super().__init__(message)
        self.model = model
        self.report = report


def _fdt_extra(gm: fx.GraphModule, path: FDTPath, partitions: int) -> int:
    """Working bytes of one FDT partition beyond the path's input and output (see Collapse)."""
    inner = [node_named(gm, n) for n in path.nodes[:-1]]
    # full-width bytes live while each inner op runs; elementwise ops work in place
    working = [nbytes(inner[0])] + [
        nbytes(b) if is_elementwise(gm, b) else nbytes(a) + nbytes(b)
        for a, b in itertools.pairwise(inner)
    ]
    tail = node_named(gm, path.tail)
    partial = 0 if multiplies_into(gm, tail) else nbytes(tail)
    share = -(-path.width // partitions) / path.width
    return int(max(max(working) * share, nbytes(inner[-1]) * share + partial))


def _fdt_candidates(gm: fx.GraphModule, paths: Sequence[FDTPath], target: str,
                    fewest: int = 1) -> list[Candidate]:
    """FDT over all of `paths` at once, for every partition count above `fewest`."""
    found = []
    for n in (p for p in PARTITIONS if fewest < p <= min(path.width for path in paths)):
        collapses = [Collapse(frozenset(path.nodes), _fdt_extra(gm, path, n)) for path in paths]
        estimate = estimate_peak(gm, *collapses)
        found.append(Candidate("fdt", tuple(paths), n, None, estimate.objective, 0, target))
    return found


def _tied_fdt_paths(gm: fx.GraphModule, names: frozenset[str]) -> list[FDTPath]:
    """Disjoint FDT paths through any of the storages `names` (the blocks tied at a peak)."""
    paths: list[FDTPath] = []
    used: set[str] = set()
    for name in sorted(names):
        for path in fdt_paths_through(gm, name):
            if used.isdisjoint(path.nodes):
                paths.append(path)
                used.update(path.nodes)
    return paths


def _span_ends(gm: fx.GraphModule, target: str) -> tuple[list[fx.Node], list[fx.Node]]:
    """Cuts before and after `target` whose buffers are not larger than it: per side, the nearest
    few and the smallest at each spatial size (so spans of every depth are tried)."""
    order = [n for n in gm.graph.nodes if n.op not in ("get_attr", "output")]
    position = {n: i for i, n in enumerate(order)}
    node = node_named(gm, target)
    eligible = [c for c in cuts(gm) if shape(c) is not None and len(shape(c)) == 4
               and nbytes(c) <= nbytes(node) and c is not node]

    def choose(side: list[fx.Node]) -> list[fx.Node]:
        nearest = sorted(side, key=lambda c: abs(position[c] - position[node]))[:SPAN_NEAREST]
        smallest: dict[tuple[int, int], fx.Node] = {}
        for cut in sorted(side, key=lambda c: (nbytes(c), abs(position[c] - position[node]))):
            smallest.setdefault(tuple(shape(cut)[-2:]), cut)
        return list(dict.fromkeys([*nearest, *smallest.values()]))

    return (choose([c for c in eligible if position[c] < position[node]]),
            choose([c for c in eligible if position[c] > position[node]]))


class _SpanCosts:
    """(working bytes of one tile, conv MACs of all tiles) of an FFMT span split by a grid, each
    worked out once per `tile` call: every round re-weighs mostly the same spans (mobilenet_v2:
    1,800 weighings of about 4 ms, a few hundred distinct). A span is named by its input shape
    and, per node, op, target, arguments and module object: rewrites copy a graph but share the
    modules it calls (`copy_graph_module`), so one name cannot stand for two computations."""

    def __init__(self) -> None:
        self._spans: dict[tuple, tuple[fx.GraphModule, SpatialGraph] | MemtileError] = {}
        self._costs: dict[tuple, tuple[int, int]] = {}

    def __call__(self, gm: fx.GraphModule, path: FFMTPath
                 ) -> Callable[[tuple[int, int]], tuple[int, int]]:
        """The costs of `path` by grid; raises the MemtileError that makes `path` no span
        (every time it is asked)."""
        nodes = {n.name: n for n in gm.graph.nodes}
        name = _span_name(gm, path, nodes)
        if name not in self._spans:
            try:
                trunk = extract(gm, path)
                self._spans[name] = trunk, SpatialGraph(trunk, layouts=True)
            except MemtileError as error:
                self._spans[name] = error
        found = self._spans[name]
        if isinstance(found, MemtileError):
            raise found
        trunk, analysed = found
        source, end = shape(nodes[path.source]), shape(nodes[path.nodes[-1]])

        def split_by(grid: tuple[int, int]) -> tuple[int, int]:
            if (name, grid) not in self._costs:
                self._costs[name, grid] = FFMTTiles(trunk, source, end, grid, analysed).costs
            return self._costs[name, grid]

        return split_by


def _span_name(gm: fx.GraphModule, path: FFMTPath, nodes: dict[str, fx.Node]) -> tuple:
    """What names a span in `_SpanCosts` (`nodes`: `gm`'s nodes by name)."""
    return (tuple(shape(nodes[path.source]) or ()), tuple(
        (n.name, n.op, n.target, gm.get_submodule(n.target) if n.op == "call_module" else None,
         repr(fx.map_arg((n.args, n.kwargs), lambda a: a.name)))
        for n in (nodes[name] for name in path.nodes)))


def _ffmt_candidates(gm: fx.GraphModule, target: str, reasons: list[str],
                     costs: _SpanCosts) -> list[Candidate]:
    found = []
    starts, ends = _span_ends(gm, target)
    for start in starts:
        for end in ends:
            path = span(gm, start.name, end.name)
            out = shape(end)
            try:
                split_by = costs(gm, path)
                whole = split_by((1, 1))[1]
                grids = [g for g in GRIDS if g[0] <= out[-2] and g[1] <= out[-1]]
                split = [split_by(grid) for grid in grids]
                estimated = collapsed_objectives(gm, frozenset(path.nodes),
                                                 [tile_bytes for tile_bytes, _ in split])
                found += [Candidate("ffmt", (path,), grid[0] * grid[1], grid, objective,
                                    macs - whole, target)
                          for grid, (_, macs), objective in zip(grids, split, estimated,
                                                                strict=True)]
            except MemtileError as error:
                reasons.append(f"ffmt over {start.name}..{end.name}: {error}")
    return found


def _candidates(gm: fx.GraphModule, methods: Sequence[str], mac_room: int,
                reasons: list[str], applied: Sequence[_Applied], costs: _SpanCosts,
                ) -> list[Candidate]:
    estimate = estimate_peak(gm)
    producers: list[str] = []
    for live in (estimate.live, estimate.live_without_input):
        made = [name for name, _ in live if node_named(gm, name).op != "placeholder"]
        producers += [name for name in made[:TARGETS] if name not in producers]
    found: list[Candidate] = []
    for target in producers:
        if "fdt" in methods:
            found += [c for path in fdt_paths_through(gm, target, reasons)
                      for c in _fdt_candidates(gm, [path], target)]
        if "ffmt" in methods:
            found += _ffmt_candidates(gm, target, reasons, costs)
        found += _finer_candidates(gm, target, applied, costs)
    tied = _tied_fdt_paths(gm, estimate.at_peaks) if "fdt" in methods else []
    if len(tied) > 1:
        found += _fdt_candidates(gm, tied, tied[0].head)
    better = {(c.method, c.paths, c.partitions, c.grid, c.redo): c for c in found
              if c.estimated < estimate.objective and c.extra_macs <= mac_room}
    return sorted(better.values(), key=Candidate.key)


def _finer_candidates(gm: fx.GraphModule, target: str, applied: Sequence[_Applied],
                      costs: _SpanCosts) -> list[Candidate]:
    """Finer splits of the accepted step that made `target`: more FDT partitions, or a grid
    with more FFMT tiles. Estimated on `gm` with the step's nodes collapsed to one step."""
    step = next((i for i, a in enumerate(applied) if any(target in m for m in a.made)), None)
    if step is None:
        return []
    done, before = applied[step].candidate, applied[step].before
    present = frozenset(n.name for n in gm.graph.nodes)
    regions = [made & present for made in applied[step].made]
    if not all(regions):  # a later step rewrote part of it
        return []
    if done.method == "fdt":
        found = []
        for c in _fdt_candidates(before, done.paths, target, fewest=done.partitions):
            collapses = [Collapse(region, _fdt_extra(before, path, c.partitions))
                         for region, path in zip(regions, done.paths, strict=True)]
            found.append(replace(c, estimated=estimate_peak(gm, *collapses).objective,
                                 target=target, redo=step))
        return found
    region, path = regions[0], done.paths[0]
    end = shape(node_named(before, path.nodes[-1]))
    split_by = costs(before, path)
    now = split_by(done.grid)[1]
    grids = [grid for grid in GRIDS
             if done.grid[0] <= grid[0] <= end[-2] and done.grid[1] <= grid[1] <= end[-1]
             and grid != done.grid]
    if not grids:
        return []
    split = [split_by(grid) for grid in grids]
    estimated = collapsed_objectives(gm, region, [tile_bytes for tile_bytes, _ in split])
    return [Candidate("ffmt", (path,), grid[0] * grid[1], grid, objective, macs - now, target,
                      step)
            for grid, (_, macs), objective in zip(grids, split, estimated, strict=True)]


def tile(
    model: nn.Module,
    inputs: Sequence[torch.Tensor] | torch.Tensor,
    budget: int | None = None,
    max_mac_overhead: float = 0.1,
    methods: Sequence[str] = ("fdt", "ffmt"),
    progress: Callable[[str], None] | None = None,
    max_seconds: float | None = None,
) -> tuple[fx.GraphModule, TileReport]:
    """Rewrite `model` with FDT/FFMT so that its planned peak drops, with the same outputs.

    Returns the tiled GraphModule and a TileReport. Never returns a model whose planned peak is
    higher than the input's. With a `budget` that no tiling found meets, raises
    BudgetNotMetError carrying the best model and report. `max_seconds` bounds the search: past
    it no new step is tried and the best found so far is returned (`timed_out` in the report).
    """
    deadline = None if max_seconds is None else time.monotonic() + max_seconds
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    unknown = set(methods) - {"fdt", "ffmt"}
    if unknown or not methods:
        raise MemtileError(f"unknown tiling method(s) {sorted(unknown)}; use fdt and/or ffmt")
    model = model.eval()
    say = progress or (lambda _: None)
    original = propagate_shapes(trace(model, inputs), inputs)
    peaks = _PlannedPeaks(inputs)
    before = peaks(original, [])
    say(f"planned peak before: {before.arena_bytes} B")
    mac_limit = int(before.macs * (1 + max_mac_overhead))
    rejected: list[str] = []
    reference = Reference(model, inputs)  # the caller's model, as the report's error is
    setting = _Setting(_Checks(reference), peaks, budget, mac_limit, rejected, say, deadline)
    found: list[_Search] = []
    for first in _starts(tuple(methods)):
        say(f"search starting with {'+'.join(first)}")
        search = _Search([(original, before, [])], [],
                         tuple(dict.fromkeys([first, tuple(methods)])))
        search.run(setting)
        found.append(search)
        if budget is not None and search.now.arena_bytes <= budget:
            while not search.verify(setting):
                pass
            if search.now.arena_bytes <= budget:
                break
        if _past(deadline):
            break
    while True:  # the model returned is checked; a step that fails is dropped and searched again
        best = min(found, key=lambda f: (f.now.objective[:2], f.now.macs, len(f.steps)))
        if best.verify(setting):
            break
    current, now = independent_copy(best.current), peaks.final(best.current, best.history[-1][2])
    steps = best.history[-1][2]  # the check of the model returned gave its error
    _, error, scale = setting.checks(current, steps) if steps else (True, *reference.compare(current))
    report = TileReport(
        before.arena_bytes, now.arena_bytes, before.arena_without_input_bytes,
        now.arena_without_input_bytes, before.input_bytes, before.macs, now.macs, error, scale,
        budget, max_mac_overhead, list(methods), best.steps, list(dict.fromkeys(rejected)),
        barriers(rejected), max_seconds, _past(deadline), before, now, original,
    )
    if not report.budget_met:
        raise BudgetNotMetError(
            f"no tiling found meets the budget of {budget} B; the best planned peak is "
            f"{now.arena_bytes} B (from {before.arena_bytes} B). Raise the budget or "
            "--max-mac-overhead", current, report,
        )
    return current, report


class _PlannedPeaks:
    """`planned_peak` of each distinct rewrite once per `tile` call: the greedy searches of auto
    start from the same model and often try the same rewrites (mobilenet_v2: 5 of 30 re-plans
    repeated, each a capture and a schedule of seconds). A rewrite is named by its recipe, the
    accepted steps applied to the original in order: `_rebuild` makes the same graph from the
    same recipe (a graph's code alone is not enough: an FFMT grid lives in its module). Every
    graph, the original included, is captured by one `Stitcher`, which traces only the nodes
    not seen before (the rest of a graph is spliced from pieces traced before): the original's
    pieces cost one trace of its nodes, a third of torch.export's two whole-model traces, and
    are the pieces every rewrite reuses. Only the original gets the full schedule work;
    rewrites are scheduled with CANDIDATE_SCHEDULE_WORK (once a graph holds FFMT tiles, the
    schedule's search spends all its work on the tiles' segment and keeps their exported
    order); `final` plans the chosen one with the full work."""

    def __init__(self, inputs: tuple[torch.Tensor, ...]):
        self.inputs = inputs
        self.stitch = Stitcher()
        self._found: dict[tuple, PlannedPeak] = {}

    def __call__(self, gm: fx.GraphModule, steps: Sequence[_Applied]) -> PlannedPeak:
        recipe = _recipe(steps)
        if recipe not in self._found:
            work = CANDIDATE_SCHEDULE_WORK if recipe else SCHEDULE_WORK
            self._found[recipe] = planned_peak(gm, self.inputs, schedule_work=work,
                                               capture_with=self.stitch)
        return self._found[recipe]

    def final(self, gm: fx.GraphModule, steps: Sequence[_Applied]) -> PlannedPeak:
        """The planned peak of the model `tile` returns, scheduled with the full work (as
        `planned_peak` does) where candidates had the short one."""
        return planned_peak(gm, self.inputs, capture_with=self.stitch) if steps else self(gm, steps)


def _recipe(steps: Sequence[_Applied]) -> tuple:
    """What `_rebuild` applies to the original, in order: it names the graph it makes."""
    return tuple((a.candidate.method, a.candidate.paths, a.candidate.partitions,
                  a.candidate.grid) for a in steps)


def _starts(methods: tuple[str, ...]) -> list[tuple[str, ...]]:
    """Greedy searches to run: with all methods, and with each one alone first (then all), so
    that auto is never worse than a single method, whose greedy path can differ."""
    return [methods, *((m,) for m in methods)] if len(methods) > 1 else [methods]


@dataclass
class _Setting:
    """What every greedy search of one `tile` call shares."""

    checks: _Checks
    peaks: _PlannedPeaks
    budget: int | None
    mac_limit: int
    rejected: list[str]
    say: Callable[[str], None]
    deadline: float | None
    span_costs: _SpanCosts = field(default_factory=_SpanCosts)


class _Checks:
    """Output checks of rewrites against the original model, each rewrite (named by its recipe,
    as in `_PlannedPeaks`) run once; `banned`: the recipes whose outputs differ, which `_try`
    rejects from then on."""

    def __init__(self, reference: Reference):
        self.reference = reference
        self._done: dict[tuple, tuple[bool, float, float]] = {}
        self.banned: set[tuple] = set()
        self.runs = 0  # rewrites run and compared

    def __call__(self, gm: fx.GraphModule, steps: Sequence[_Applied]) -> tuple[bool, float, float]:
        """(matches, float32 max abs error, output scale); the original always matches."""
        recipe = _recipe(steps)
        if not recipe:
            return True, 0.0, 0.0
        if recipe not in self._done:
            self.runs += 1
            self._done[recipe] = self.reference.check(gm)
        return self._done[recipe]


@dataclass
class _Search:
    """One greedy search: (graph, planned peak, accepted steps) after every step, the report's
    steps, the phases (methods) it runs in order, and per step the candidate accepted and the
    index of the phase that accepted it."""

    history: list[tuple[fx.GraphModule, PlannedPeak, list[_Applied]]]
    steps: list[TileStep]
    phases: tuple[tuple[str, ...], ...] = ()
    chosen: list[Candidate] = field(default_factory=list)
    made_in: list[int] = field(default_factory=list)

    @property
    def current(self) -> fx.GraphModule:
        return self.history[-1][0]

    @property
    def now(self) -> PlannedPeak:
        return self.history[-1][1]

    def run(self, setting: _Setting, phase: int = 0) -> None:
        """The phases from `phase` on, then `trim`."""
        for index in range(phase, len(self.phases)):
            self._greedy(index, setting)
        self.trim()

    def _greedy(self, phase: int, setting: _Setting) -> None:
        """Greedy steps until nothing improves, the budget is met, too many only thin or the
        deadline has passed."""
        methods, budget, deadline = self.phases[phase], setting.budget, setting.deadline
        while (len(self.steps) < MAX_STEPS and _thinning(self.history) < MAX_THINNING
               and not (budget is not None and self.now.arena_bytes <= budget)
               and not _past(deadline)):
            current, now, applied = self.history[-1]
            candidates = _candidates(current, methods, setting.mac_limit - now.macs,
                                     setting.rejected, applied, setting.span_costs)
            for candidate in candidates[:TRIES]:
                if _past(deadline):
                    return
                accepted = _try(candidate, current, applied, len(self.steps) + 1, setting, now)
                if accepted is not None:
                    self.steps.append(_step(candidate, current, accepted[1], applied))
                    self.history.append(accepted)
                    self.chosen.append(candidate)
                    self.made_in.append(phase)
                    setting.say(f"{candidate.describe()}: planned peak {accepted[1].arena_bytes} B")
                    break
            else:
                return

    def verify(self, setting: _Setting) -> bool:
        """Check the outputs of the model this search ends at against the original's. If they
        differ, find its first step whose model differs (its steps are checked in order), reject
        that step's candidate with the reason, drop the step and those after it, and search on
        from there as if the candidate had failed when it was tried (`_try` then rejects it);
        False then, and the new end wants checking again."""
        checks = setting.checks
        end, _, steps = self.history[-1]
        if checks(end, steps)[0]:
            return True
        for index, (gm, _, applied) in enumerate(self.history[1:], 1):
            matches, error, scale = checks(gm, applied)
            if not matches:
                break
        candidate = self.chosen[index - 1]
        setting.rejected.append(
            f"{candidate.describe()}: outputs differ by {error:.3g} (scale {scale:.3g})")
        checks.banned.add(_recipe(applied))
        phase = self.made_in[index - 1]
        del self.history[index:], self.steps[index - 1:], self.chosen[index - 1:]
        del self.made_in[index - 1:]
        self.run(setting, phase)
        return False

    def trim(self) -> None:
        """Drop steps that only thinned a tied peak and never led to a lower one."""
        peak = self.now.objective[:2]
        keep = next(i for i, (_, p, _) in enumerate(self.history) if p.objective[:2] == peak)
        del self.history[keep + 1:], self.steps[keep:], self.chosen[keep:], self.made_in[keep:]


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() > deadline


_OWN_MODULES = ("FFMTTiles", "PartialSum", "Accumulate")
_NAMED_OP = re.compile(r"[\w'.]+ \(([\w.]+)\)")


def barriers(rejected: Sequence[str]) -> list[str]:
    """The ops (or shapes) that ended FFMT spans and FDT paths, most frequent first, e.g.
    "ffmt: mean (12)": why a model does not tile further, in a few words."""
    counts: Counter[str] = Counter()
    for reason in rejected:
        method, _, why = reason.partition(" ")
        if (method not in ("ffmt", "fdt") or "exceed the limit" in why or "is no better" in why
                or any(f"({own})" in why for own in _OWN_MODULES)):
            continue  # not a barrier: the budget, the plan, or an earlier step's own rewrite
        why = why.partition(": ")[2]
        named = _NAMED_OP.search(why)
        if "outputs differ" in why:
            label = "outputs differ beyond the tolerance"
        else:
            label = named.group(1) if named else why.split(";")[0].rsplit(": ", 1)[-1][:90]
        counts[f"{method}: {label}"] += 1
    return [f"{label} ({count})" for label, count in counts.most_common(5)]


def _thinning(history: list[tuple[fx.GraphModule, PlannedPeak, list[_Applied]]]) -> int:
    """How many of the last steps left both peaks where they were."""
    peaks = [planned.objective[:2] for _, planned, _ in history]
    return len(peaks) - 1 - peaks.index(peaks[-1])


def _rebuild(candidate: Candidate, number: int, current: fx.GraphModule,
             applied: list[_Applied], inputs: tuple[torch.Tensor, ...],
             ) -> tuple[fx.GraphModule, list[_Applied]]:
    """Apply a candidate (report step `number`); one that re-splits an accepted step replays
    the accepted steps after it."""
    start = len(applied) if candidate.redo is None else candidate.redo
    gm = current if candidate.redo is None else applied[start].before
    done = list(applied[:start])
    for step, step_number in [(candidate, number),
                              *((a.candidate, a.number) for a in applied[start + 1:])]:
        tiled, made = step.apply(gm)
        done.append(_Applied(step, gm, made, step_number))
        gm = propagate_shapes(tiled, inputs, before=gm)  # runs only what the step changed
    return gm, done


def _try(candidate: Candidate, current: fx.GraphModule, applied: list[_Applied], number: int,
         setting: _Setting, now: PlannedPeak,
         ) -> tuple[fx.GraphModule, PlannedPeak, list[_Applied]] | None:
    """Apply and re-plan one candidate; None (with the reason recorded) if it fails. Outputs
    are not run here: a search's steps are checked when it ends (`_Search.verify`), as the
    chain that makes the model returned; a rewrite found there to differ is rejected here."""
    peaks, mac_limit, rejected = setting.peaks, setting.mac_limit, setting.rejected
    try:
        tiled, done = _rebuild(candidate, number, current, applied, peaks.inputs)
    except (MemtileError, KeyError) as error:  # KeyError: a replayed step's node is gone
        rejected.append(f"{candidate.describe()}: {error}")
        return None
    if _recipe(done) in setting.checks.banned:  # its outputs differ (recorded when found)
        return None
    planned = peaks(tiled, done)
    if planned.macs > mac_limit:
        rejected.append(f"{candidate.describe()}: {planned.macs} MACs exceed the limit {mac_limit}")
        return None
    if planned.objective >= now.objective:
        rejected.append(f"{candidate.describe()}: planned peak {planned.arena_bytes} B "
                        f"({planned.arena_without_input_bytes} B without inputs) is no better")
        return None
    return tiled, planned, done


def _step(candidate: Candidate, before: fx.GraphModule, planned: PlannedPeak,
          applied: list[_Applied]) -> TileStep:
    target = candidate.target
    replaces = applied[candidate.redo].number if candidate.redo is not None else None
    return TileStep(target, nbytes(node_named(before, target)), candidate.method, candidate.partitions,
                    list(candidate.grid) if candidate.grid else None, list(candidate.ops),
                    planned.arena_bytes, planned.macs, replaces, len(candidate.paths))

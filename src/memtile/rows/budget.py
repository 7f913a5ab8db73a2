"""Budget mode: choose strategy and band counts from a per-row memory estimate, then measure.

The budget is what one training step of the trunk may allocate above what is held before it:
the trunk output and its gradient, the parameter gradients, the activations of one band and,
for 2PS, the stored boundary rows (those of the bands not yet run backward). The estimate counts,
per band, every node's rows in that band (autograd keeps about one tensor per node). Kinds of
configuration: strategy, checkpointing inside bands or not, and (2PS) a taper of the backward
bands. For each, the fewest bands (at most the trunk output height) whose estimate fits, or
for a kind where none fits, its smallest estimate if within `MEASURE_ANYWAY` of the budget.
These are run under `memtile.measure` fastest first by estimated work; one that misses is
retried with more bands, in order of speed with the rest, until a measured peak fits; if none
does, `BudgetError` says what was measured.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.shape_prop import ShapeProp

from memtile.errors import BudgetError
from memtile.rows.engine import (
    Engine,
    Plan,
    RowFunction,
    checkpoint_segments,
    in_place,
    max_bands,
    read_later,
)
from memtile.rows.module import RowCentric
from memtile.spatial import SpatialGraph
from memtile.units import format_bytes

MAX_MEASURED = 12  # configurations budget mode measures at most
MEASURE_ANYWAY = 1.5  # measure the best guess when the estimate misses by less than this factor
TAPERS = {"2ps": (0.0, 3.0), "overl": (0.0,)}  # backward band tapers tried (see Engine)


@dataclass(frozen=True)
class Choice:
    """A configuration, its estimated step peak and its cost (see `estimate`)."""

    strategy: str
    forward_rows: int
    backward_rows: int
    estimate_bytes: int
    work: int
    checkpoint: bool = False
    taper: float = 0.0
    measured_bytes: int | None = None

    def cost(self, least_work: int) -> tuple[float, int]:
        """Sort key for speed: work to 2%, then fewer bands (each has a fixed overhead)."""
        return (round(self.work / max(least_work, 1) / 0.02), self.forward_rows + self.backward_rows)


@dataclass(frozen=True)
class RowBytes:
    """Bytes of one row (whole batch, all channels, full width) of every node's output.

    `held` counts in-place ops as 0 (they reuse their input's storage, so autograd holds no new
    tensor for them); `real` is the size of the rows themselves (what copying them costs).
    """

    real: dict[fx.Node, int]
    held: dict[fx.Node, int]


def row_bytes(graph: SpatialGraph, x: torch.Tensor) -> RowBytes:
    """Row sizes of every node, from a fake-tensor shape pass (no real compute)."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    ShapeProp(graph.gm, fake_mode=mode).propagate(mode.from_tensor(x))
    out = {}
    for node in [graph.input, *graph.order]:
        meta = node.meta["tensor_meta"]
        n, c, _, w = meta.shape
        out[node] = n * c * w * meta.dtype.itemsize
    held = {v: 0 if in_place(graph.gm, v) else b for v, b in out.items()}
    return RowBytes(out, held)


def _rows(rows: tuple[int, int]) -> int:
    return max(rows[1] - rows[0], 0)


def _without_aliases(graph: SpatialGraph, per_row: dict[fx.Node, int]) -> dict[fx.Node, int]:
    """`per_row` with nodes that return their input (a batch norm folded into its convolution)
    counted as holding nothing."""
    return {v: 0 if graph.aliases(v) else b for v, b in per_row.items()}


def _held(engine: Engine, per_row: RowBytes) -> list[int]:
    """Bytes a backward band keeps for its backward: every node's rows in the band (2PS joins
    kept and new rows in one buffer); with checkpointing, the values that cross segments plus
    the largest segment, recomputed."""
    held = _without_aliases(engine.backward_graph, per_row.held)
    segments = checkpoint_segments(engine.graph.order)
    crossing = [v for seg, later in zip(segments, read_later(engine.graph, segments), strict=True)
                for v in seg if v in later]
    out = []
    for band in engine.backward_plan.bands:
        rows = {v: held[v] * _rows(r) for v, r in band.value.items()}
        if not engine.checkpoint:
            out.append(sum(rows.values()))
            continue
        crossed = sum(per_row.real[v] * _rows(band.value[v]) for v in crossing)
        out.append(crossed + max(sum(rows[v] for v in seg) for seg in segments))
    return out


def _computed(plan: Plan, per_row: dict[fx.Node, int]) -> int:
    return sum(per_row[v] * _rows(r) for band in plan.bands for v, r in band.new.items())


def estimate(engine: Engine, sizes: RowBytes, param_bytes: int, largest_param: int,
             input_grad: bool) -> Choice:
    """Estimated peak of one trunk step (forward + backward) and its work.

    Work counts computed rows like time: the no-grad forward once, a backward band three
    times (recompute with grad, then about twice that for its backward), once more with
    checkpointing.
    """
    per_row = sizes.held
    graph, fwd, bwd = engine.graph, engine.forward_plan, engine.backward_plan
    full = {v: sizes.real[v] * engine.sizes[v][0] for v in per_row}
    # no_grad forward: a node's output and its inputs are live together
    fwd_held = _without_aliases(engine.forward_graph, per_row)
    fwd_peak = max(fwd_held[v] * _rows(b.value[v])
                   + sum(fwd_held[a] * _rows(b.value[a]) for a in graph.ops[v].inputs)
                   for b in fwd.bands for v in graph.order)
    # backward band: the stores not yet used up, what the band keeps, and two gradients of
    # its largest node in flight
    grads_in_flight = 2 * max(per_row[v] * _rows(b.value[v]) for b in bwd.bands
                              for v in graph.order)
    count = len(bwd.bands)
    alive = engine.kept.alive(sizes.real, count)
    bwd_peak = max(a + h for a, h in zip(alive, _held(engine, sizes), strict=True)) + grads_in_flight
    peak = (2 * full[graph.output] + param_bytes + largest_param
            + (full[graph.input] if input_grad else 0)
            + max(engine.kept.bytes(sizes.real) + fwd_peak, bwd_peak))
    recompute = 4 if engine.checkpoint else 3
    return Choice(engine.strategy, len(fwd.bands), count, peak,
                  _computed(fwd, per_row) + recompute * _computed(bwd, per_row),
                  engine.checkpoint, engine.taper)


def _cap(module: RowCentric, x: torch.Tensor) -> int:
    """Most bands worth trying: the trunk output height. Bands thinner than one output row
    only add per-band overhead (2PS: boundary rows stored per band; OverL: halo recompute)."""
    return module.graph.output_size(tuple(x.shape[-2:]))[0]


def _counts(height: int) -> list[int]:
    """Band counts worth trying: 1, 2, 3, 4, 6, 8, 12, ... up to the output height."""
    counts, k = {height}, 1
    while k < height:
        counts.update({k, k * 3 // 2} if k > 1 else {1})
        k *= 2
    return sorted(c for c in counts if 1 <= c <= height)


def candidates(module: RowCentric, x: torch.Tensor, budget: int) -> list[Choice]:
    """For each kind (strategy, checkpoint on/off, taper), the fewest backward then forward
    bands whose estimate fits; all of them, fastest first. Bands stop at the trunk output
    height (`_cap`).

    The estimate is rough (it can miss either way), so the smallest-estimate configuration of
    every kind with no fitting estimate follows, for measurement. When nothing fits, only those
    come back if the smallest estimate is within `MEASURE_ANYWAY` of the budget; further off,
    BudgetError.
    """
    per_row = row_bytes(module.graph, x)
    param_bytes, largest_param = _parameter_bytes(
        [p for p in module.trunk.parameters() if p.requires_grad])
    graph, size = module.graph, tuple(x.shape[-2:])
    counts = _counts(_cap(module, x))

    def guess(kind: tuple[str, bool, float], fwd: int, bwd: int) -> Choice:
        strategy, checkpoint, taper = kind
        return estimate(Engine(graph, size, strategy, fwd, bwd, checkpoint, taper), per_row,
                        param_bytes, largest_param, x.requires_grad)

    fits, best = [], {}
    kinds = [(s, c, t) for s in module.strategies for c in module.checkpoints for t in TAPERS[s]]
    for kind in kinds:
        for bwd in counts:
            choice = next((c for f in counts if f <= bwd
                           if (c := guess(kind, f, bwd)).estimate_bytes <= budget), None)
            if choice is not None:
                fits.append(choice)
                break
            choice = guess(kind, bwd, bwd)
            if kind not in best or choice.estimate_bytes < best[kind].estimate_bytes:
                best[kind] = choice
    # kinds with no fitting estimate: their smallest, to measure after the others if near
    rest = sorted((c for k, c in best.items() if not any(_kind(f) == k for f in fits)),
                  key=lambda c: c.estimate_bytes)
    if not fits:
        smallest = rest[0]
        if smallest.estimate_bytes > MEASURE_ANYWAY * budget:
            raise BudgetError(
                f"budget {format_bytes(budget)} is below the smallest estimated trunk step, "
                f"{format_bytes(smallest.estimate_bytes)} ({smallest.strategy}, "
                f"{smallest.backward_rows} backward bands"
                f"{', checkpointed' if smallest.checkpoint else ''}); raise the budget or "
                "lower the batch or resolution"
            )
    rest = [c for c in rest if c.estimate_bytes <= MEASURE_ANYWAY * budget]
    if not fits:
        return rest
    least = min(c.work for c in fits)
    return sorted(fits, key=lambda c: c.cost(least)) + rest


def least_bytes_bands(graph: SpatialGraph, x: torch.Tensor, params: list[torch.Tensor],
                      count: int | None = None) -> tuple[int, int]:
    """The 2PS band count (forward and backward alike, at least 2) of least estimated step peak,
    and that estimate; of counts within 2% of it, the fewest (each band costs time). With
    `count`, that count and its estimate. Estimates fall, then rise as
    more nodes keep rows between thinner bands, so the search stops two counts past the least.
    At most as many bands as the node with fewest rows has (smp Linknet at 256²: 8, where the
    estimate's least was 192 bands of one or two rows, 8% below 8 bands, at 30x the time of
    ordinary training): thinner bands give the deepest nodes a row only every few bands and
    pay every op's fixed cost per band. The estimate tracked measured peaks within 1-6% on smp
    Unet (BENCHMARKS.md, "Whole-network 2PS": resnet18 at 1024², resnet34 at 4544²)."""
    per_row = row_bytes(graph, x)
    param_bytes, largest = _parameter_bytes(params)
    size = tuple(x.shape[-2:])
    fewest_rows = min(rows for rows, _ in graph.sizes(size).values())
    counts = [count] if count else [
        c for c in _counts(min(max_bands(graph, size, "2ps"), max(2, fewest_rows))) if c >= 2]
    found: dict[int, int] = {}
    for bands in counts:
        engine = Engine(graph, size, "2ps", bands, bands, False)
        found[bands] = estimate(engine, per_row, param_bytes, largest,
                                x.requires_grad).estimate_bytes
        least = min(found.values())
        if sum(value > least for value in list(found.values())[-2:]) == 2:
            break
    least = min(found.values())
    best = min(bands for bands, value in found.items() if value <= 1.02 * least)
    return best, found[best]


def _parameter_bytes(params: list[torch.Tensor]) -> tuple[int, int]:
    """(all of `params`, the largest one) in bytes: the gradients a step allocates, and the
    largest gradient in flight."""
    sizes = [p.numel() * p.element_size() for p in params]
    return sum(sizes), max(sizes, default=0)


def _kind(choice: Choice) -> tuple[str, bool, float]:
    return (choice.strategy, choice.checkpoint, choice.taper)


def measure_step(module: RowCentric, x: torch.Tensor, choice: Choice) -> int:
    """Measured peak bytes of one trunk forward + backward with `choice` (no .grad is touched)."""
    engine = Engine(module.graph, tuple(x.shape[-2:]), choice.strategy, choice.forward_rows,
                    choice.backward_rows, choice.checkpoint, choice.taper)
    params = [p for p in module.trunk.parameters() if p.requires_grad]
    return _step_peak(lambda x: RowFunction.apply(engine, x, *params), x, params)


def ordinary_step_bytes(trunk: nn.Module, x: torch.Tensor) -> int:
    """Measured peak of one ordinary forward + backward of `trunk`: what budgets compare with."""
    return _step_peak(trunk, x, [p for p in trunk.parameters() if p.requires_grad])


def _step_peak(forward, x: torch.Tensor, params: list[torch.Tensor]) -> int:
    from memtile.measure import measure

    x = x.detach().requires_grad_(x.requires_grad)

    def step() -> None:
        with torch.enable_grad():
            y = forward(x)
            wrt = [*params, *([x] if x.requires_grad else [])]
            torch.autograd.grad(y, wrt, torch.ones_like(y))

    return measure(step).peak_bytes


def _more(bands: int) -> int:
    return max(bands + 1, bands * 3 // 2)


def _fewer_forward_bands(module: RowCentric, x: torch.Tensor, choice: Choice,
                         left: int) -> Choice:
    """`choice` with the fewest forward bands (at most `left` more measured) that still fits.

    Retries raise forward and backward bands together, and a kind whose estimate never fits
    comes with as many forward bands as backward ones; but the forward pass runs under
    no_grad and holds little, and fewer, larger bands are faster (resnet50 2x512², 12/12).
    """
    for rows in [f for f in _counts(choice.forward_rows) if f < choice.forward_rows][:left]:
        trial = replace(choice, forward_rows=rows)
        trial = replace(trial, measured_bytes=measure_step(module, x, trial))
        if trial.measured_bytes <= module.budget:
            return trial
    return choice


def configure(module: RowCentric, x: torch.Tensor) -> Choice:
    """Pick and verify a configuration for `module.budget`; set it on the module.

    Measures the fastest untried configuration first, whether or not its estimate fits (the
    estimate only admits candidates: it overstates some kinds, e.g. 2PS without checkpointing
    on resnet50 2x512², 306 MiB estimated for 239 MiB measured, and would let a slower
    checkpointed kind win); one that misses comes back with more bands, so a fast kind with
    more bands is measured before a slower kind (checkpointing) is. The one that fits then
    gets the fewest forward bands that still fit (`_fewer_forward_bands`).
    """
    budget = module.budget
    options = candidates(module, x, budget)
    least, cap = min(o.work for o in options), _cap(module, x)
    queue = [(o.cost(least), o) for o in options]
    tried: list[Choice] = []
    while queue and len(tried) < MAX_MEASURED:
        queue.sort(key=lambda entry: entry[0])
        _, option = queue.pop(0)
        tried.append(replace(option, measured_bytes=measure_step(module, x, option)))
        if tried[-1].measured_bytes <= budget:
            break
        if min(option.forward_rows, option.backward_rows) < cap:
            more = replace(option, forward_rows=min(cap, _more(option.forward_rows)),
                           backward_rows=min(cap, _more(option.backward_rows)))
            queue.append((more.cost(least), more))
    choice = min(tried, key=lambda c: (c.measured_bytes > budget, c.measured_bytes))
    if choice.measured_bytes > budget:
        raise BudgetError(
            f"budget {format_bytes(budget)}: the best configuration found ({choice.strategy}, "
            f"{choice.forward_rows} forward / {choice.backward_rows} backward bands"
            f"{', checkpointed' if choice.checkpoint else ''}) measured "
            f"{format_bytes(choice.measured_bytes)} per trunk step; raise the budget or lower "
            "the batch or resolution"
        )
    choice = _fewer_forward_bands(module, x, choice, MAX_MEASURED - len(tried))
    module.strategy, module.rows = choice.strategy, choice.backward_rows
    module.forward_rows, module.backward_rows = choice.forward_rows, choice.backward_rows
    module.checkpoint, module.taper = choice.checkpoint, choice.taper
    module.choice = choice
    return choice

"""Budget mode: choose strategy and band counts from a per-row memory estimate, then measure.

The budget is what one training step of the trunk may allocate above what is held before it:
the trunk output and its gradient, the parameter gradients, the activations of one band and,
for 2PS, the stored boundary rows. The estimate counts, per band, every node's rows in that band
(autograd keeps about one tensor per node). The cheapest configuration whose estimate fits is
then run once under `memtile.measure`, and given more backward bands until the measured peak
fits; if even that fails, `BudgetError` says what was measured.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, replace

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.shape_prop import ShapeProp

from memtile.errors import BudgetError
from memtile.rows.engine import Engine, Plan, RowFunction, max_bands
from memtile.rows.module import RowCentric
from memtile.units import format_bytes

MEASURED_RETRIES = 3
MEASURE_ANYWAY = 1.5  # measure the best guess when the estimate misses by less than this factor


@dataclass(frozen=True)
class Choice:
    """A configuration, its estimated step peak and its work (elements computed, all bands)."""

    strategy: str
    forward_rows: int
    backward_rows: int
    estimate_bytes: int
    work: int
    measured_bytes: int | None = None


@dataclass(frozen=True)
class RowBytes:
    """Bytes of one row (whole batch, all channels, full width) of every node's output.

    `held` counts in-place ops as 0 (they reuse their input's storage, so autograd holds no new
    tensor for them); `real` is the size of the rows themselves (what copying them costs).
    """

    real: dict[fx.Node, int]
    held: dict[fx.Node, int]


def row_bytes(module: RowCentric, x: torch.Tensor) -> RowBytes:
    """Row sizes of every node, from a fake-tensor shape pass (no real compute)."""
    graph = module.graph
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    ShapeProp(graph.gm, fake_mode=mode).propagate(mode.from_tensor(x))
    out = {}
    for node in [graph.input, *graph.order]:
        meta = node.meta["tensor_meta"]
        n, c, _, w = meta.shape
        out[node] = n * c * w * meta.dtype.itemsize
    held = {v: 0 if _in_place(graph.gm, v) else b for v, b in out.items()}
    return RowBytes(out, held)


def _in_place(gm: fx.GraphModule, node: fx.Node) -> bool:
    """An op that writes into its input (ReLU(inplace=True), +=, relu_) owns no new storage."""
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(node.target), "inplace", False))
    if node.op == "call_method":
        return node.target.endswith("_")
    return node.target in (operator.iadd, operator.imul)


def _rows(rows: tuple[int, int]) -> int:
    return max(rows[1] - rows[0], 0)


def _held(plan: Plan, per_row: dict[fx.Node, int]) -> list[int]:
    """Bytes of every node's rows in each band: what a band with grad keeps for backward.

    A 2PS node that joins kept rows to its new rows holds both parts and their concatenation.
    """
    return [sum(per_row[v] * (_rows(r) + (_rows(band.new[v]) if r[0] < band.new.get(v, r)[0]
                                          else 0))
                for v, r in band.value.items()) for band in plan.bands]


def _computed(plan: Plan, per_row: dict[fx.Node, int]) -> int:
    return sum(per_row[v] * _rows(r) for band in plan.bands for v, r in band.new.items())


def estimate(engine: Engine, sizes: RowBytes, param_bytes: int, largest_param: int,
             input_grad: bool) -> Choice:
    """Estimated peak of one trunk step (forward + backward) and its work, for an engine."""
    per_row = sizes.held
    graph, fwd, bwd = engine.graph, engine.forward_plan, engine.backward_plan
    full = {v: sizes.real[v] * engine.sizes[v][0] for v in per_row}
    # no_grad forward: a node's output and its inputs are live together
    fwd_peak = max(per_row[v] * _rows(b.value[v])
                   + sum(per_row[a] * _rows(b.value[a]) for a in graph.ops[v].inputs)
                   for b in fwd.bands for v in graph.order)
    # backward band: everything the band keeps, plus two gradients of its largest node in flight
    grads_in_flight = 2 * max(per_row[v] * _rows(b.value[v]) for b in bwd.bands
                              for v in graph.order)
    bwd_peak = max(_held(bwd, per_row)) + grads_in_flight
    stores = engine.kept.bytes(sizes.real)
    peak = (2 * full[graph.output] + param_bytes + largest_param + stores
            + (full[graph.input] if input_grad else 0) + max(fwd_peak, bwd_peak))
    return Choice(engine.strategy, len(fwd.bands), len(bwd.bands), peak,
                  _computed(fwd, per_row) + _computed(bwd, per_row))


def _cap(module: RowCentric, x: torch.Tensor, strategy: str) -> int:
    """Most bands worth trying: every output row (OverL); 2PS bands of at least 4 input rows."""
    size = tuple(x.shape[-2:])
    if strategy == "2ps":
        return max(module.graph.output_size(size)[0], size[0] // 4)
    return max_bands(module.graph, size, strategy)


def _counts(height: int) -> list[int]:
    """Band counts worth trying: 1, 2, 3, 4, 6, 8, 12, ... up to the output height."""
    counts, k = {height}, 1
    while k < height:
        counts.update({k, k * 3 // 2} if k > 1 else {1})
        k *= 2
    return sorted(c for c in counts if 1 <= c <= height)


def candidates(module: RowCentric, x: torch.Tensor, budget: int) -> list[Choice]:
    """For each strategy, the fewest backward then forward bands whose estimate fits, by work.

    The estimate errs high (it counts every node a band computes as held), so when nothing fits
    but the smallest estimate is within `MEASURE_ANYWAY` of the budget, the smallest-estimate
    configuration of each strategy is returned for measurement; further off, BudgetError.
    """
    per_row = row_bytes(module, x)
    params = [p for p in module.trunk.parameters() if p.requires_grad]
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    largest_param = max((p.numel() * p.element_size() for p in params), default=0)
    graph, size = module.graph, tuple(x.shape[-2:])
    fits, smallest, best = [], None, {}
    for strategy in module.strategies:
        counts = _counts(_cap(module, x, strategy))
        for bwd in counts:
            fwd = next((f for f in counts if f <= bwd and estimate(
                Engine(graph, size, strategy, f, bwd, module.checkpoint), per_row,
                param_bytes, largest_param, x.requires_grad).estimate_bytes <= budget), None)
            choice = estimate(Engine(graph, size, strategy, fwd or bwd, bwd, module.checkpoint),
                              per_row, param_bytes, largest_param, x.requires_grad)
            if smallest is None or choice.estimate_bytes < smallest.estimate_bytes:
                smallest = choice
            if strategy not in best or choice.estimate_bytes < best[strategy].estimate_bytes:
                best[strategy] = choice
            if fwd is not None:
                fits.append(choice)
                break
    if not fits and smallest.estimate_bytes <= MEASURE_ANYWAY * budget:
        return sorted(best.values(), key=lambda c: c.estimate_bytes)
    if not fits:
        raise BudgetError(
            f"budget {format_bytes(budget)} is below the smallest estimated trunk step, "
            f"{format_bytes(smallest.estimate_bytes)} ({smallest.strategy}, "
            f"{smallest.backward_rows} backward bands); raise the budget or lower the batch "
            "or resolution"
        )
    return sorted(fits, key=lambda c: c.work)


def measure_step(module: RowCentric, x: torch.Tensor, choice: Choice) -> int:
    """Measured peak bytes of one trunk forward + backward with `choice` (no .grad is touched)."""
    from memtile.measure import measure

    engine = Engine(module.graph, tuple(x.shape[-2:]), choice.strategy, choice.forward_rows,
                    choice.backward_rows, module.checkpoint)
    params = [p for p in module.trunk.parameters() if p.requires_grad]
    x = x.detach().requires_grad_(x.requires_grad)

    def step() -> None:
        with torch.enable_grad():
            y = RowFunction.apply(engine, x, *params)
            wrt = [*params, *([x] if x.requires_grad else [])]
            torch.autograd.grad(y, wrt, torch.ones_like(y))

    return measure(step).peak_bytes


def _more(bands: int) -> int:
    return max(bands + 1, bands * 3 // 2)


def configure(module: RowCentric, x: torch.Tensor) -> Choice:
    """Pick and verify a configuration for `module.budget`; set it on the module."""
    budget = module.budget
    tried: list[Choice] = []
    options = candidates(module, x, budget)
    for _ in range(MEASURED_RETRIES + 1):
        for option in options:  # cheapest work first
            tried.append(replace(option, measured_bytes=measure_step(module, x, option)))
            if tried[-1].measured_bytes <= budget:
                break
        if tried[-1].measured_bytes <= budget:
            break
        options = [replace(o, forward_rows=min(cap, _more(o.forward_rows)),
                           backward_rows=min(cap, _more(o.backward_rows)))
                   for o in options if o.backward_rows < (cap := _cap(module, x, o.strategy))]
        if not options:
            break
    choice = min(tried, key=lambda c: (c.measured_bytes > budget, c.measured_bytes))
    if choice.measured_bytes > budget:
        raise BudgetError(
            f"budget {format_bytes(budget)}: the best configuration found ({choice.strategy}, "
            f"{choice.forward_rows} forward / {choice.backward_rows} backward bands) measured "
            f"{format_bytes(choice.measured_bytes)} per trunk step; raise the budget or lower "
            "the batch or resolution"
        )
    module.strategy, module.rows = choice.strategy, choice.backward_rows
    module.forward_rows, module.backward_rows = choice.forward_rows, choice.backward_rows
    module.choice = choice
    return choice

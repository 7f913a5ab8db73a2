"""`memtile train MODEL --loss ce|bce|mse`: a whole encoder-decoder trained in row bands with a
per-band loss (`memtile.rows.whole`) against ordinary training, same data: peaks, times, grads."""

from __future__ import annotations

import argparse
import copy
import math
import statistics

import torch
from torch import nn

from memtile.commands.common import console, print_json
from memtile.commands.train import (
    Side,
    batch_norms,
    freeze_norms,
    input_shape,
    judge,
)
from memtile.errors import MemtileError
from memtile.rows.whole import WholeBands, loss_function
from memtile.units import format_bytes

_NOT_WITH_LOSS = ("budget", "checkpoint", "forward_rows", "backward_rows", "stop_before")


def run_whole(args: argparse.Namespace) -> int:
    """The `--loss` path of `memtile train`."""
    from memtile import zoo

    given = [f"--{name.replace('_', '-')}" for name in _NOT_WITH_LOSS if getattr(args, name)]
    if given:
        raise MemtileError(f"--loss bands the whole model; {', '.join(given)} do not apply "
                           "(give --rows N for the bands, --strategy 2ps|overl for the scheme)")
    rows = None if args.rows is None else _bands(args.rows)
    model, inputs = zoo.get(args.model, batch=args.batch, input_shape=input_shape(args))
    norms = batch_norms(args, model)
    result = compare_whole(model, inputs[0], args.loss, rows, args.steps,
                           f64_check=not args.no_f64_check, strategy=args.strategy)
    result["model"] = args.model
    result["bn"] = "frozen" if norms else "none"
    if args.json:
        print_json(result)
    else:
        _print(result)
    return 0


def _bands(text: str) -> int:
    try:
        rows = int(text)
    except ValueError:
        rows = 0
    if rows < 1:
        raise MemtileError(f"--rows {text!r}: with --loss give a positive number of bands")
    return rows


def target_for(loss: str, out: torch.Tensor, seed: int) -> torch.Tensor:
    """A seeded random target for `loss` and an output like `out`: class indices (ce), 0/1
    labels (bce) or normal values (mse)."""
    gen = torch.Generator().manual_seed(seed)
    if loss == "ce" and out.shape[1] < 2:
        raise MemtileError(f"--loss ce needs at least 2 output channels (classes); this model "
                           f"has {out.shape[1]}, so its loss and gradients are all zero: use "
                           "--loss bce")
    if loss == "ce":
        return torch.randint(0, out.shape[1], (out.shape[0], *out.shape[2:]), generator=gen)
    if loss == "bce":
        return torch.randint(0, 2, out.shape, generator=gen).to(out.dtype)
    return torch.randn(out.shape, generator=gen, dtype=out.dtype)


def compare_whole(model: nn.Module, x: torch.Tensor, loss: str, rows: int | None,
                  steps: int = 1, f64_check: bool = True, strategy: str | None = None) -> dict:
    """Ordinary training (mean `loss` over the whole output) against `WholeBands`, copies of
    `model` with frozen norms, same data and targets; gradients compared on the first step."""
    base = copy.deepcopy(model).train()
    frozen = freeze_norms(base)
    with torch.no_grad():
        out = base(x)
    targets = [target_for(loss, out, seed) for seed in range(steps + 1)]
    total = targets[0].numel()
    fn = loss_function(loss)
    row_copy = copy.deepcopy(model).train()
    freeze_norms(row_copy)
    row_params = list(row_copy.parameters())
    banded = WholeBands(row_copy, loss, rows=rows, strategy=strategy)
    chosen = banded.chosen_strategy(x, targets[0])  # plans and checks before anything is timed
    base_side = Side(base, list(base.parameters()),
                     lambda m, x, seed: fn(m(x), targets[seed]) / total)
    row_side = Side(banded, row_params, lambda m, x, seed: m(x, targets[seed]))
    checks: dict[str, float | None] = {}
    for k in range(steps):
        base_side.timed_step(x, seed=k)
        row_side.timed_step(x, seed=k)
        if k == 0:
            checks = judge(model, x, lambda m, x: fn(m(x), _wide(targets[0])) / total,
                           lambda: banded_f64_grads(model, x, loss, rows, targets[0], chosen),
                           base_side, row_side, f64_check)
    base_m = base_side.measured_step(x, seed=steps)
    row_m = row_side.measured_step(x, seed=steps)
    check = banded.checks[tuple(x.shape[-2:])]
    base_s, row_s = statistics.median(base_side.seconds), statistics.median(row_side.seconds)
    return {
        "model": type(model).__name__,
        "batch": x.shape[0],
        "input_shape": list(x.shape[1:]),
        "loss": loss,
        "strategy": chosen,
        "strategy_note": banded.strategy_note,
        "banded": {
            "nodes": [n.name for n in banded.locality.order],
            "stopped_at": None,
            **_band_report(banded, x, targets[0], chosen),
            "alignment": list(banded.locality.alignment),
            "peak_ratio": row_m.peak_bytes / base_m.peak_bytes,
            "time_ratio": row_s / base_s,
        },
        "output_shape": list(out.shape[1:]),
        "baseline_peak_bytes": base_m.peak_bytes,
        "row_peak_bytes": row_m.peak_bytes,
        "baseline_activation_bytes": base_m.breakdown.get("activations"),
        "row_activation_bytes": row_m.breakdown.get("activations"),
        "parameter_bytes": base_m.parameter_bytes,
        "baseline_step_s": base_s,
        "row_step_s": row_s,
        **checks,
        "loss_baseline": base_side.losses,
        "loss_row": row_side.losses,
        "frozen_layers": frozen,
        "verify": {**check.as_json(), "step_fraction": check.seconds / row_s},
    }


def _band_report(banded: WholeBands, x: torch.Tensor, target: torch.Tensor,
                 strategy: str) -> dict:
    """`bands` (output rows, and OverL's input crop), OverL's `halo_rows` (input rows) and the
    nodes 2PS `recomputed` for the decoder."""
    if strategy == "2ps":
        engine = banded.engine(x, target)
        output = engine.graph.output
        return {"bands": [{"rows": list(b.new[output])} for b in engine.backward_plan.bands],
                "halo_rows": None, "recomputed": banded.recomputed[tuple(x.shape[-2:])]}
    plan = banded.plan(x, target)
    ratio = banded.locality.ratios[banded.locality.output][0]
    return {"bands": [{"rows": list(b.rows), "crop": list(b.crop)} for b in plan],
            "halo_rows": {"top": math.ceil(max(b.rows[0] / ratio - b.crop[0] for b in plan)),
                          "bottom": math.ceil(max(b.crop[1] - b.rows[1] / ratio for b in plan))},
            "recomputed": []}


def banded_f64_grads(model: nn.Module, x: torch.Tensor, loss: str, rows: int | None,
                     target: torch.Tensor, strategy: str | None = None) -> list:
    """First-step gradients of `model` banded whole in float64 (`rows` bands, `loss`,
    `strategy`), with no wrap-time check: what `judge` compares with ordinary float64 when
    float32 rounding leaves the two float32 runs apart."""
    wide = copy.deepcopy(model).double().train()
    freeze_norms(wide)
    WholeBands(wide, loss, rows=rows, strategy=strategy, verify=False)(
        x.double(), _wide(target)).backward()
    return [p.grad for p in wide.parameters()]


def _wide(target: torch.Tensor) -> torch.Tensor:
    return target.double() if target.is_floating_point() else target


def _print(r: dict) -> None:
    b = r["banded"]
    recomputed = (f" (the stem, {len(b['recomputed'])} nodes, recomputed for the decoder)"
                  if b["recomputed"] else "")
    scheme = (f"2PS: every row once, rows later bands read kept{recomputed}"
              if r["strategy"] == "2ps" else
              f"OverL crops on a {b['alignment'][0]}-row grid, halo up to "
              f"{b['halo_rows']['top']:g} rows above and {b['halo_rows']['bottom']:g} below")
    console.print(f"memtile train {r['model']} --loss {r['loss']}: batch {r['batch']}, input "
                  f"{'x'.join(map(str, r['input_shape']))}; the whole model in "
                  f"{len(b['bands'])} row bands ({len(b['nodes'])} nodes), {scheme}")
    if r["strategy_note"]:
        console.print(r["strategy_note"])
    console.print(f"measured peak: ordinary {format_bytes(r['baseline_peak_bytes'])}, banded "
                  f"{format_bytes(r['row_peak_bytes'])} ({b['peak_ratio']:.2f}x); step time "
                  f"{r['baseline_step_s']:.3f} s vs {r['row_step_s']:.3f} s "
                  f"({b['time_ratio']:.2f}x)")
    console.print(f"max relative gradient error {r['grad_max_rel_error']:.2e}; checked at wrap "
                  f"time on a {'x'.join(map(str, r['verify']['input_shape']))} crop "
                  f"({r['verify']['dtype']}): {r['verify']['max_rel_error']:.1e}")
